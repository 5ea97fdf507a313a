"""Trust what is loaded: every kind of saved result (factors, scores, self-influence, index) refuses to load
after each kind of change (the weights, a dataset's contents, a dataset's size, the arguments), naming what
changed; unchanged, it is loaded, not recomputed."""

import json
import os

import numpy as np
import pytest

import tf_influence as tfi
from tests import helpers as h
from tf_influence import provenance

KINDS = ("factors", "scores", "self_influence", "index")
CHANGES = ("weights", "contents", "size", "arguments")


@pytest.fixture(scope="module")
def models():
    pre, ft, _ = h.two_stage_mlps()
    return pre, ft


def data(x, y, b=8):
    return h.dataset(x, y, b)


def _arrays(seed=1, n=24):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 5)), rng.integers(0, 3, n)), (rng.normal(size=(16, 5)), rng.integers(0, 2, 16))


def _call(a, kind, P, F, variant=False):
    """The result named ``kind``; ``variant``: the same call with other arguments."""
    if kind == "factors":
        return a.fit_factors("r", data(*P), tfi.FactorArgs(fisher="empirical", seed=1 if variant else 0))
    if kind == "scores":
        args = tfi.InfluenceArgs(hessian_samples=None, seed=1 if variant else 0)
        return a.influence("r", data(*P), data(*F), data(F[0][:3], F[1][:3]), args=args)
    if kind == "self_influence":
        return a.self_influence("r", data(*P), method="per_example" if variant else "ghost")
    return a.build_index("r", data(*P), tfi.projection.ProjectionArgs(k=3 if variant else 2))


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_result_refuses_to_load_after_a_change(models, kind, change, tmp_path):
    pre, ft = models
    keep = [w.copy() for w in pre.get_weights()]
    task = tfi.Task(pre, ft, h.sce(), h.sce(), embedding=["embedding"])
    a = tfi.Analyzer(task, str(tmp_path), progress=False)
    P, F = _arrays()
    _call(a, kind, P, F)
    saved = json.loads((tmp_path / kind / "r" / provenance.PROVENANCE_FILE).read_text())
    assert saved["datasets"]["pretrain"]["size"] == 24 and saved["library"] == tfi.__version__
    _call(a, kind, P, F)                                   # unchanged: loaded (the check passes)
    try:
        if change == "weights":
            pre.set_weights([w + 0.01 for w in keep])
            match = "pretrain model's weights"
        elif change == "contents":
            P = (P[0] + 1.0, P[1])
            match = "pretrain data's contents"
        elif change == "size":
            P = (P[0][:20], P[1][:20])
            match = r"pretrain data's size \(24 → 20 examples\)"
        else:
            match = "other arguments"
        with pytest.raises(tfi.analyzer.AnalyzerError, match=match) as err:
            _call(a, kind, P, F, variant=change == "arguments")
        assert "overwrite=True" in str(err.value)
        if change != "arguments":
            assert isinstance(err.value, tfi.StaleResultError)
            _call_overwrite(a, kind, P, F)                  # the way out the message names
    finally:
        pre.set_weights(keep)


def _call_overwrite(a, kind, P, F):
    if kind == "factors":
        return a.fit_factors("r", data(*P), tfi.FactorArgs(fisher="empirical"), overwrite=True)
    if kind == "scores":
        return a.influence("r", data(*P), data(*F), data(F[0][:3], F[1][:3]),
                           args=tfi.InfluenceArgs(hessian_samples=None), overwrite=True)
    if kind == "self_influence":
        return a.self_influence("r", data(*P), overwrite=True)
    return a.build_index("r", data(*P), tfi.projection.ProjectionArgs(k=2), overwrite=True)


def test_factors_of_other_weights_are_refused_by_influence(models, tmp_path):
    pre, ft = models
    keep = [w.copy() for w in pre.get_weights()]
    a = tfi.Analyzer(tfi.Task(pre, ft, h.sce(), h.sce(), embedding=["embedding"]), str(tmp_path), progress=False)
    P, F = _arrays()
    a.fit_factors("f", data(*P), tfi.FactorArgs(fisher="empirical"))
    try:
        pre.set_weights([w * 1.01 for w in keep])
        with pytest.raises(tfi.StaleResultError, match="factors 'f'.*other weights"):
            a.influence("s", data(*P), data(*F), data(*F), factors_name="f")
    finally:
        pre.set_weights(keep)


def test_a_result_saved_before_provenance_is_not_trusted(models, tmp_path):
    pre, ft = models
    a = tfi.Analyzer(tfi.Task(pre, ft, h.sce(), h.sce(), embedding=["embedding"]), str(tmp_path), progress=False)
    P, _ = _arrays()
    a.self_influence("old", data(*P))
    os.remove(tmp_path / "self_influence" / "old" / provenance.PROVENANCE_FILE)
    with pytest.raises(tfi.StaleResultError, match="saved without a record"):
        a.self_influence("old", data(*P))


def test_dataset_fingerprint_is_the_counting_pass_and_ignores_batching():
    P, _ = _arrays()
    d8, d5 = data(*P, b=8), data(*P, b=5)
    assert provenance.dataset_fingerprint(d8) == provenance.dataset_fingerprint(d5)
    d3 = data(*P, b=3)
    tfi.count_examples(d3)                                 # the count records it: no second pass needed
    seen = provenance._SEEN[id(d3)][1]
    assert seen == provenance.dataset_fingerprint(d8)
    other = data(P[0], (P[1] + 1) % 3)
    assert provenance.dataset_fingerprint(other)["sha256"] != seen["sha256"]

"""The API a Keras user expects: compiled losses, one selection rule, serialisable parameter groups,
saved results, measurements, no retracing on repeated calls."""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence import scores_io, selection, tracin
from tf_influence.gradients import GradientKernels
from tf_influence.hessian import HvpKernels
from tests import helpers as h


def test_objective_defaults_to_the_compiled_loss():
    model = h.mlp()
    x, y = np.random.default_rng(0).normal(size=(6, 5)), np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="'mlp' was not compiled with a loss; pass loss="):
        tfi.Objective(model)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logits = model(x).numpy()
    by_hand = np.log(np.exp(logits).sum(1)) - logits[np.arange(6), y]  # cross-entropy from the logits
    np.testing.assert_allclose(tfi.Objective(model).per_example_losses(x, y).numpy(), by_hand, rtol=1e-10)


def test_sequence_losses_are_averaged_per_example():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,), dtype="int32")
    out = keras.layers.Dense(3, dtype="float64")(keras.layers.Embedding(7, 2, dtype="float64")(inp))
    model = keras.Model(inp, out)
    x = np.random.default_rng(1).integers(0, 7, size=(5, 4)).astype(np.int32)
    y = np.random.default_rng(2).integers(0, 3, size=(5, 4))
    obj = tfi.Objective(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None))
    logits = model(x).numpy()
    lse = np.log(np.exp(logits).sum(-1))
    by_hand = (lse - np.take_along_axis(logits, y[..., None], -1)[..., 0]).mean(axis=1)
    np.testing.assert_allclose(tfi.per_example_losses(obj, h.dataset(x, y, 2)), by_hand, rtol=1e-10)


def test_one_selection_rule_for_the_library_and_the_component():
    scores = np.array([0.5, 0.1, 0.1, 0.9, 0.1, 0.3])
    keys = [b"f", b"e", b"d", b"c", b"b", b"a"]  # reverse of the positions: the tie-break decides
    by_position = selection.select_kept(scores, "keep_lowest", 2)
    by_key = selection.select_kept(scores, "keep_lowest", 2, keys=keys)
    assert np.flatnonzero(by_position).tolist() == [1, 2] and np.flatnonzero(by_key).tolist() == [2, 4]
    table = dict(zip(keys, scores))
    for mode, value in (("keep_lowest", 2), ("keep_highest", 3), ("drop_top_fraction", 0.5), ("drop_above", 0.2)):
        lib = selection.select_kept(scores, mode, value, keys=keys)
        assert {k for k, m in zip(keys, lib) if m} == scores_io.select_kept(table, mode, value), mode
    assert selection.select_kept(scores, "keep_highest", 3).sum() == 3
    with pytest.raises(ValueError, match="unknown filter mode"):
        selection.select_kept(scores, "drop_all", 1)
    with pytest.raises(ValueError, match="integer 0 ≤ value ≤ 6"):
        selection.select_kept(scores, "keep_lowest", 7)
    with pytest.raises(ValueError, match="NaN"):
        selection.select_kept([0.1, np.nan], "keep_lowest", 1)


def test_presence_sequential_uses_the_same_rule_with_keys():
    model = h.mlp(n_out=3)
    x = np.tile(np.random.default_rng(0).normal(size=(2, 5)), (4, 1))  # 4 copies of 2 examples: tied scores
    y = np.tile([0, 1], 4)
    obj = tfi.Objective(model, h.sce())
    keys = [f"k{7 - i}".encode() for i in range(8)]
    res = tfi.presence_sequential(obj, h.dataset(x, y, 3), ["hidden"], keep=3, keys=keys)
    table = dict(zip(keys, tracin.self_influence(obj, h.dataset(x, y, 3), ["hidden"])))
    assert {keys[i] for i in res.kept} == scores_io.select_kept(table, "keep_lowest", 3)


def test_group_spec_round_trip_and_mismatch():
    pre, ft, _ = h.two_stage_mlps()
    group = tfi.concat_groups("(U,W)", tfi.group_from_layers(pre, ["U"]), tfi.group_from_layers(pre, ["embedding"]))
    spec = group.spec(pre)
    again = tfi.ParameterGroup.from_spec(pre, tfi.GroupSpec.from_json(json.loads(json.dumps(spec.to_json()))))
    assert [id(v) for v in again.tf_variables] == [id(v) for v in group.tf_variables]
    pre2, _, _ = h.two_stage_mlps(emb=4)  # same layer names, other shapes
    with pytest.raises(tfi.ParameterGroupError, match=r"#\d+ of model 'pretrain' is U/kernel \(4, 3\), the spec "
                                                      r"expects U/kernel \(3, 3\)"):
        tfi.ParameterGroup.from_spec(pre2, spec)
    with pytest.raises(tfi.ParameterGroupError, match="not a trainable variable of model 'finetune'"):
        group.spec(ft)
    with pytest.raises(tfi.ParameterGroupError, match="not a parameter group spec"):
        tfi.GroupSpec.from_json('{"name": "x"}')


def test_repeated_calls_do_not_retrace():
    rng = np.random.default_rng(0)
    model = h.mlp(l2=0.01)
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 3, 30)
    h.train(model, h.sce(), x, y, steps=100)

    def call():  # a new Objective and new datasets each time, as a user writes it
        return tfi.single_stage_influence(tfi.Objective(model, h.sce()), h.dataset(x, y, 8), h.dataset(x[:4], y[:4]),
                                          solver=tfi.SolverConfig("cg", damping=1e-3,
                                                                  iterative=tfi.IterativeOptions(max_iter=200)))

    def kernels():  # what a fresh call finds in the cache
        obj, group = tfi.Objective(model, h.sce()), tfi.ParameterGroup.from_model(model)
        return HvpKernels.get(obj, group, group, "fob"), GradientKernels.get(obj, group)

    first = call()
    hvp_kern, grad_kern = kernels()
    counts = [hvp_kern.batch.experimental_get_tracing_count(), grad_kern.jvp.experimental_get_tracing_count(),
              grad_kern.sum_grad.experimental_get_tracing_count()]
    assert min(counts) >= 1  # the first call traced them
    second = call()
    assert kernels() == (hvp_kern, grad_kern)  # the same compiled kernels serve a new Objective ...
    assert [hvp_kern.batch.experimental_get_tracing_count(), grad_kern.jvp.experimental_get_tracing_count(),
            grad_kern.sum_grad.experimental_get_tracing_count()] == counts  # ... without retracing
    np.testing.assert_allclose(first.scores, second.scores, rtol=1e-12)


def _clipped_cross_entropy(y, logits):
    """A loss with Python control flow on a tensor, as TF users write one: needs AutoGraph in a graph."""
    if tf.reduce_max(tf.abs(logits)) > 1e6:
        logits = tf.clip_by_value(logits, -1e6, 1e6)
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def test_kernels_trace_without_autograph_unless_the_loss_needs_it():
    """The kernels are traced without AutoGraph (their own code has no tensor control flow); a loss
    that branches on a tensor in Python makes them trace again with it, with the same per-example
    gradient products as the plain cross-entropy (the branch is never taken on this data). (Its
    second derivatives would not help: TensorFlow's forward-over-back differentiation of a tf.cond
    fails, with or without this library.)"""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    model = h.mlp(seed=3)
    group = tfi.ParameterGroup.from_model(model)
    v = rng.normal(size=(group.size, 2))
    products = {}
    for name, loss in (("plain", h.sce()), ("branchy", _clipped_cross_entropy)):
        obj = tfi.Objective(model, loss)
        products[name] = np.asarray(tfi.per_example_dot(obj, h.dataset(x, y, 8), group, v))
        assert GradientKernels.get(obj, group).jvp.autograph == (name == "branchy")   # k = 2: forward mode
    np.testing.assert_allclose(products["branchy"], products["plain"], rtol=1e-12)


def test_the_order_cut_keeps_what_select_kept_keeps():
    """ScoreFilter's bounded-memory rule (one cut of the (score, key) order, boundary found on the
    smaller side) keeps exactly the examples of ``select_kept`` on the whole table, ties included."""
    S = selection
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 30))
        scores = np.round(rng.normal(size=n), 1)  # many ties
        keys = [f"k{i:03d}".encode() for i in rng.permutation(n)]
        mode = str(rng.choice(["drop_top_fraction", "keep_lowest", "keep_highest"]))
        value = float(rng.random()) if mode == "drop_top_fraction" else int(rng.integers(0, n + 1))
        keep_first, q = S.order_cut(mode, value, n)
        side, k = S.first_set_boundary(q, n)
        ordered = sorted(zip(scores.tolist(), keys))
        boundary = None if k == 0 else (max(ordered[:k]) if side == "smallest" else min(ordered[n - k:]))
        got = [S.kept_by_cut(s, key, keep_first, side, boundary) for s, key in zip(scores, keys)]
        assert got == S.select_kept(scores, mode, value, keys).tolist(), (mode, value, n)


@pytest.mark.parametrize("old, new", [
    ("tf_influence.tracin.presence_sequential", "tf_influence.presence.sequential.presence_sequential"),
    ("tf_influence.tracin.FilterResult", "tf_influence.presence.sequential.FilterResult"),
    ("tf_influence.kfac.GhostNorms", "tf_influence.ghost_norms.GhostNorms"),
])
def test_moved_names_warn_and_resolve(old, new):
    import importlib
    mod, name = old.rsplit(".", 1)
    new_mod, new_name = new.rsplit(".", 1)
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} is deprecated: use {re.escape(new)} \(it is removed in 0\.4\)"):
        got = getattr(importlib.import_module(mod), name)
    assert got is getattr(importlib.import_module(new_mod), new_name)


@pytest.mark.parametrize("old, new", [("experiments.digits", "model_zoo.digits"), ("experiments.models", "model_zoo.cnn"),
                                      ("experiments.text", "model_zoo.text"),
                                      ("tf_influence.kfac.capture", "tf_influence.capture")])
def test_moved_modules_warn(old, new):
    import importlib
    import sys
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"module {re.escape(old)} is deprecated: use module {re.escape(new)}"):
        got = importlib.import_module(old)
    assert got is importlib.import_module(new)

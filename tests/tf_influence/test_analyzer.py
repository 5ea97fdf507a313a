"""The front door: Task + Analyzer give exactly the scores of the functions under them, keep them by
name (reloaded, not recomputed; a name computed with other arguments refuses), fit factors once and
reuse them, and score self-influence — on our MLPs and on a keras-hub GPT-2 a user brings."""

import os

import numpy as np
import pytest

import tf_influence as tfi
from tests import helpers as h
from tf_influence import MultiStageInfluence, analyzer as an, kfac


@pytest.fixture(scope="module")
def world():
    pre, ft, _ = h.two_stage_mlps()
    rng = np.random.default_rng(1)
    xp, yp = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    xf, yf = rng.normal(size=(30, 5)), rng.integers(0, 2, 30)
    h.train(pre, h.sce(), xp, yp, steps=200)
    h.train(ft, h.sce(), xf, yf, steps=0)
    return pre, ft, (xp, yp), (xf, yf)


def data(xy, b=16):
    return h.dataset(*xy, b)


def test_analyzer_equals_the_function_and_keeps_results_by_name(world, tmp_path, monkeypatch):
    pre, ft, P, F = world
    task = tfi.Task(pre, ft, h.sce(), h.sce(), embedding=["embedding"])
    args = tfi.InfluenceArgs(hessian_samples=None, test_target="each")
    a = tfi.Analyzer(task, str(tmp_path), args=args, progress=False)
    res = a.influence("t4", data(P), data(F), data((F[0][:4], F[1][:4])))
    ref = tfi.multi_stage_influence(tfi.Objective(pre, h.sce()), data(P), tfi.Objective(ft, h.sce()), data(F),
                                    data((F[0][:4], F[1][:4])), ["embedding"], args=args)
    assert res.scores.shape == (40, 4)
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-10)
    assert os.path.exists(tmp_path / "scores" / "t4" / "influence_args.json")
    # asked again: loaded, not recomputed (a recompute would call MultiStageInfluence)
    monkeypatch.setattr(MultiStageInfluence, "__call__", lambda *a, **k: pytest.fail("recomputed"))
    again = a.influence("t4", data(P), data(F), data((F[0][:4], F[1][:4])))
    np.testing.assert_array_equal(again.scores, res.scores)
    np.testing.assert_array_equal(tfi.Analyzer(task, str(tmp_path)).load_scores("t4").scores, res.scores)
    # the same name with other arguments is refused, not answered with the old scores
    with pytest.raises(an.AnalyzerError, match="computed with other arguments"):
        a.influence("t4", data(P), data(F), data(F), args=tfi.InfluenceArgs(hessian_samples=None, seed=1))
    with pytest.raises(an.AnalyzerError, match="result name '../up'"):
        a.influence("../up", data(P), data(F), data(F))


def test_fitted_factors_are_saved_once_and_invert_the_pretraining_hessian(world, tmp_path):
    pre, ft, P, F = world
    a = tfi.Analyzer(tfi.Task(pre, ft, h.sce(), h.sce(), embedding=["embedding"]), str(tmp_path), progress=False)
    factors = a.fit_factors("ek", data(P), tfi.FactorArgs(fisher="empirical"))
    assert a.fit_factors("ek", data(P), tfi.FactorArgs(fisher="empirical")).num_examples == factors.num_examples
    with pytest.raises(an.AnalyzerError, match="factors 'ek'.*other arguments"):
        a.fit_factors("ek", data(P), tfi.FactorArgs(fisher="true"))
    args = tfi.InfluenceArgs(hessian_samples=None, pretrain_solver=tfi.SolverConfig("auto", damping=1e-2))
    res = a.influence("with_factors", data(P), data(F), data(F), args=args, factors_name="ek")
    assert res.solves["pretrain"]["method"] == "ekfac"
    g = tfi.Objective(pre, h.sce())
    own = kfac.fit_factors(g, data(P), a.pretrain_group(), fisher="empirical")
    ref = tfi.multi_stage_influence(g, data(P), tfi.Objective(ft, h.sce()), data(F), data(F), ["embedding"],
                                    args=tfi.InfluenceArgs(hessian_samples=None,
                                                           pretrain_solver=tfi.SolverConfig(
                                                               "ekfac", damping=1e-2,
                                                               kronecker=tfi.KroneckerOptions(factors=own))))
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-8)


def test_factor_hessian_samples_are_the_hessians_random_subset(world, tmp_path):
    """``FactorArgs.hessian_samples``: the factors are fitted on the examples that
    ``InfluenceArgs.hessian_samples`` would draw (the one rule, ``objective.subsample_mask``), picked
    here by numpy indexing; factors saved before the field existed still load."""
    import json as json_
    from tf_influence.objective import subsample_mask
    pre, ft, P, F = world
    a = tfi.Analyzer(tfi.Task(pre, ft, h.sce(), h.sce(), embedding=["embedding"]), str(tmp_path), progress=False)
    got = a.fit_factors("sub", data(P), tfi.FactorArgs(fisher="empirical", hessian_samples=15, seed=3))
    keep = subsample_mask(40, 15, seed=3)
    ref = kfac.fit_factors(tfi.Objective(pre, h.sce()), data((P[0][keep], P[1][keep])), a.pretrain_group(),
                           fisher="empirical")
    assert got.num_examples == 15
    for name, blk in ref.blocks.items():
        np.testing.assert_allclose(got.blocks[name]["eig"], blk["eig"], rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        tfi.FactorArgs(hessian_samples=5, max_examples=5)
    a.fit_factors("ek_old", data(P), tfi.FactorArgs(fisher="empirical"))
    old_dir = tmp_path / "factors" / "ek_old" / "factor_args.json"
    legacy = json_.loads(old_dir.read_text())
    del legacy["hessian_samples"]                       # as written before the field existed
    old_dir.write_text(json_.dumps(legacy))
    assert a.fit_factors("ek_old", data(P), tfi.FactorArgs(fisher="empirical")).num_examples == 40


def test_self_influence_over_the_named_layer_set_or_every_layer(world, tmp_path):
    pre, ft, P, _ = world
    a = tfi.Analyzer(tfi.Task(pre, ft, h.sce(), h.sce(), embedding=["embedding"], si_layers=["embedding"]),
                     str(tmp_path), progress=False)
    si = a.self_influence("emb", data(P))
    g = tfi.Objective(pre, h.sce())
    np.testing.assert_allclose(si, tfi.self_influence(g, data(P), ["embedding"]), rtol=1e-10)
    grads = h.one_at_a_time_gradients(g, *P, tfi.group_from_layers(pre, ["embedding"]))
    np.testing.assert_allclose(si, np.sum(grads ** 2, axis=1), rtol=1e-8)   # independent: one at a time
    np.testing.assert_array_equal(a.load_self_influence("emb"), si)
    # without si_layers (an embedding or not) every parameter of the pretraining model, as in the library
    whole = tfi.Analyzer(tfi.Task(pre, ft, h.sce(), h.sce(), embedding=["embedding"]), str(tmp_path / "b"),
                         progress=False)
    np.testing.assert_allclose(whole.self_influence("all", data(P)),
                               tfi.self_influence(g, data(P), tfi.ParameterGroup.from_model(pre)), rtol=1e-10)
    # a budget reaches the planned passes: refused before the pass, nothing saved
    from tf_influence.memory import MemoryBudgetError
    with pytest.raises(MemoryBudgetError, match="ghost-norm self-influence need"):
        whole.self_influence("tight", data(P), memory_budget=1000)
    with pytest.raises(MemoryBudgetError, match="projection budget's calibration pass need"):
        whole.build_index("tight", data(P), memory_budget=1000)
    assert not (tmp_path / "b" / "self_influence" / "tight").exists()
    assert not (tmp_path / "b" / "index" / "tight" / "index.json").exists()


def test_a_gradient_index_through_the_front_door(world, tmp_path, monkeypatch):
    """``build_index`` indexes the pretraining examples over (W, U); ``query_index`` with the saved
    influence result answers with that result's scores (identity projection: exactly) and top-k; a
    rebuild with the same arguments is loaded, with other arguments refused."""
    from tf_influence.projection import ProjectionArgs
    pre, ft, P, F = world
    task = tfi.Task(pre, ft, h.sce(), h.sce(), embedding=["embedding"])
    a = tfi.Analyzer(task, str(tmp_path), args=tfi.InfluenceArgs(hessian_samples=None, test_target="each"),
                     progress=False)
    res = a.influence("t3", data(P), data(F), data((F[0][:3], F[1][:3])))
    exact = ProjectionArgs(k=1000, k_other=1000, dtype="float32")
    index = a.build_index("corpus", data(P), exact)
    assert index.count == 40 and (tmp_path / "index" / "corpus" / "index_args.json").exists()
    top = a.query_index("corpus", a.load_scores("t3"), tfi.QueryArgs(top_k=5, all_scores=True))
    order = np.argsort([int(k) for k in top.keys])
    np.testing.assert_allclose(top.scores[:, order].T, res.scores, rtol=1e-4, atol=1e-6 * np.abs(res.scores).max())
    for q in range(3):
        assert [int(k) for k in top.harmful_keys[q]] == list(np.argsort(-res.scores[:, q])[:5])
    monkeypatch.setattr("tf_influence.index.build_index", lambda *a, **k: pytest.fail("rebuilt"))
    assert a.build_index("corpus", data(P), exact).count == 40                            # loaded, not rebuilt
    with pytest.raises(an.AnalyzerError, match="other arguments"):
        a.build_index("corpus", data(P), ProjectionArgs(k=2))


def test_bad_tasks_say_what_is_missing(world, tmp_path):
    pre, ft, P, F = world
    with pytest.raises(an.AnalyzerError, match="no pretrain_loss given and the pretrain model 'pretrain' is not "
                                               "compiled"):
        tfi.Analyzer(tfi.Task(pre, ft, embedding=["embedding"]), str(tmp_path)).influence("x", data(P), data(F),
                                                                                          data(F))
    with pytest.raises(an.AnalyzerError, match="Task.embedding"):
        tfi.Analyzer(tfi.Task(pre, ft, h.sce(), h.sce()), str(tmp_path)).influence("x", data(P), data(F), data(F))
    with pytest.raises(TypeError, match="needs a tf_influence.Task"):
        tfi.Analyzer(pre, str(tmp_path))
    with pytest.raises(ValueError, match="FactorArgs.kind"):
        tfi.FactorArgs(kind="kfc")


def test_a_keras_hub_lm_through_the_front_door(tmp_path):
    pytest.importorskip("keras_hub")
    from tests import hub_models as hm
    c = hm.build("gpt2", **hm.TINY)
    g, f = hm.objectives(c)
    task = tfi.Task(c.pretrain, c.finetune, g, f, embedding=c.backbone)
    a = tfi.Analyzer(task, str(tmp_path), progress=False)
    res = a.influence("gpt2", c.pretrain_data, c.finetune_data, c.test_data)
    ref = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding=c.backbone)
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-6)
    assert res.solves["pretrain"]["auto"]["chose"] == "dense_squared"
    si = a.self_influence("tok", c.pretrain_data, si_layers=["backbone/token_embedding"])
    np.testing.assert_allclose(si, tfi.self_influence(g, c.pretrain_data, ["backbone/token_embedding"]), rtol=1e-6)

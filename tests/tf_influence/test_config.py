"""Typed configuration: every default declared once, unknown or inapplicable options raise, JSON
round trips, and the configuration reaches the solvers whole."""

import dataclasses
import inspect
import json

import numpy as np
import pytest

import tf_influence as tfi
from tf_influence import influence, solvers


def test_every_default_is_declared_once():
    pre, ft = tfi.default_solvers("fixed")
    args = tfi.InfluenceArgs()
    assert (pre, ft) == (args.pretrain_solver, args.finetune_solver)
    assert pre.damping == tfi.DEFAULT_PRETRAIN_DAMPING and ft.damping == tfi.DEFAULT_FINETUNE_DAMPING
    assert tfi.SolverConfig().method == pre.method == ft.method == "auto"
    assert tfi.SolverConfig().damping == tfi.DEFAULT_PRETRAIN_DAMPING
    # the solver functions' own defaults for the options the config passes agree with the config's
    cfg = {f.name: f.default for cls in solvers.FAMILIES.values() for f in dataclasses.fields(cls)
           if f.default is not dataclasses.MISSING}
    for name in ("fisher", "relative_damping", "max_examples", "seed", "factors"):
        assert inspect.signature(solvers.kronecker).parameters[name].default == cfg[name], name
        assert inspect.signature(solvers.auto).parameters[name].default == cfg[name], name
    assert inspect.signature(solvers.auto).parameters["dense_max"].default == cfg["dense_max"] == solvers.AUTO_DENSE_MAX
    assert inspect.signature(solvers.dense).parameters["max_params"].default == cfg["max_params"]
    # MultiStageInfluence and the functional forms take their options from InfluenceArgs only (no second copy
    # of a default in a signature: the fields as keywords are the deprecated **keywords)
    from tf_influence.baselines import identity_hessian_influence
    for fn in (influence.MultiStageInfluence.__init__, influence.multi_stage_influence, identity_hessian_influence):
        sig = inspect.signature(fn).parameters
        assert not set(sig) & {f.name for f in dataclasses.fields(tfi.InfluenceArgs)}, fn
        assert sig["args"].default is None


def test_presence_defaults_once_and_the_trainer_reads_them(tmp_path):
    from tf_influence.presence import PresenceArgs, PresenceModel, TwoStageSchedule, presence_weights
    args = PresenceArgs()
    two = inspect.signature(TwoStageSchedule.__init__).parameters
    assert (args.tau1, args.tau2) == (two["tau1"].default, two["tau2"].default) == (1.0, -1.0)
    pm = inspect.signature(PresenceModel.__init__).parameters
    assert (args.num_microbatches, args.eps, args.relative_eps, args.memory_budget) == (
        pm["num_microbatches"].default, pm["eps"].default, pm["relative_eps"].default, pm["memory_budget"].default)
    with pytest.raises(ValueError, match="memory"):
        PresenceArgs(memory_budget="lots")
    assert inspect.signature(presence_weights).parameters["eps"].default == args.eps
    # the pipeline's trainer module reads the whole object: an unknown key is refused by name
    assert PresenceArgs.from_json(PresenceArgs(tau1=-1.0, si_layers=["embedding"]).to_json()) == PresenceArgs(
        tau1=-1.0, si_layers=("embedding",))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['tau_1'\]"):
        PresenceArgs.from_dict({"tau_1": 1.0})
    with pytest.raises(ValueError, match="switch_fraction"):
        PresenceArgs(switch_fraction=1.5)
    sched = PresenceArgs(switch_fraction=0.25).schedule(total_steps=8)
    assert [sched(i) for i in range(1, 5)] == [1.0, 1.0, -1.0, -1.0]


def test_no_solver_swallows_unknown_options():
    for name, fn in solvers.SOLVERS.items():
        params = inspect.signature(fn).parameters.values()
        if name in ("dense_squared", "ekfac", "kfac"):
            continue  # thin lambdas over dense / kronecker, checked through them
        assert not any(p.kind is p.VAR_KEYWORD for p in params), name
    for fn in (solvers.dense, solvers.kronecker, solvers.identity):
        assert not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    with pytest.raises(TypeError):
        solvers.dense(tfi.DenseOperator(np.eye(2)), np.ones(2), fisher="empirical")
    with pytest.raises(TypeError, match="unexpected keyword argument 'dampng'"):
        tfi.SolverConfig("cg", dampng=1e-3)
    with pytest.raises(ValueError, match=r"the kronecker options \(fisher\) do not apply to 'cg'"):
        tfi.SolverConfig("cg", kronecker=tfi.KroneckerOptions(fisher="empirical"))
    with pytest.raises(ValueError, match=r"the auto options \(dense_max\) do not apply to 'ekfac'"):
        tfi.SolverConfig("ekfac", auto=tfi.AutoOptions(dense_max=10))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['fishr'\]"):
        tfi.SolverConfig("ekfac", options={"fishr": "empirical"})
    with pytest.raises(ValueError, match="fisher must be 'true' or 'empirical'"):
        tfi.SolverConfig("ekfac", kronecker=tfi.KroneckerOptions(fisher="emprical"))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['maxiter'\]"):
        tfi.SolverConfig.from_json(json.dumps({"method": "cg", "maxiter": 3}))
    with pytest.raises(ValueError, match=r"InfluenceArgs: unknown field\(s\) \['hessian_sample'\]"):
        tfi.InfluenceArgs.from_dict({"hessian_sample": 3})
    with pytest.raises(ValueError, match="hessian_samples must be ≥ 1"):
        tfi.InfluenceArgs(hessian_samples=0)
    with pytest.raises(ValueError, match="needs alpha > 0"):
        tfi.InfluenceArgs(case="updated", alpha=0.0)


def test_json_round_trip_keeps_every_field():
    import tensorflow as tf
    cfg = tfi.SolverConfig("cg_squared", damping=3e-4, tol=1e-7,
                           on_nonconvergence="raise", curvature_iterations=4,
                           iterative=tfi.IterativeOptions(max_iter=17, dtype=tf.float64))
    back = tfi.SolverConfig.from_json(cfg.to_json())
    assert back.to_dict() == cfg.to_dict() and back.iterative.dtype == "float64"
    args = tfi.InfluenceArgs(case="updated", alpha=0.05, hessian_samples=None, seed=3, test_target="each",
                             pretrain_solver=tfi.SolverConfig(
                                 "ekfac", kronecker=tfi.KroneckerOptions(fisher="empirical", max_examples=50)),
                             finetune_solver=cfg)
    again = tfi.InfluenceArgs.from_json(args.to_json())
    assert again.to_dict() == args.to_dict()
    assert again.pretrain_solver.kronecker.fisher == "empirical" and again.hessian_samples is None
    from tf_influence import kfac
    with pytest.raises(ValueError, match="save it"):
        factors = kfac.KFACFactors("ekfac", "true", 1, None, {}, {})
        tfi.SolverConfig("ekfac", kronecker=tfi.KroneckerOptions(factors=factors)).to_json()


def test_options_reach_the_solver():
    """A field set on the config changes the solve (it is not dropped on the way)."""
    A = np.diag([1.0, 2.0, 50.0])
    b = np.ones(3)
    few = tfi.solve(tfi.DenseOperator(A), b, tfi.SolverConfig("cg", damping=0.0, tol=1e-12,
                                                              on_nonconvergence="ignore", curvature_iterations=0,
                                                              iterative=tfi.IterativeOptions(max_iter=1)))
    assert few.iterations == 1 and not few.converged
    lissa = tfi.solve(tfi.DenseOperator(A), b, tfi.SolverConfig("lissa", damping=0.0,
                                                                tol=1e-10, curvature_iterations=0,
                                                                iterative=tfi.IterativeOptions(scale=30.0,
                                                                                               max_iter=3000)))
    assert lissa.extra["scale"] == 30.0
    np.testing.assert_allclose(lissa.x, 1.0 / np.diag(A), rtol=1e-8)
    with pytest.raises(ValueError, match="refuses a 3×3 system"):
        tfi.solve(tfi.DenseOperator(A), b, tfi.SolverConfig("dense", dense=tfi.DenseOptions(max_params=2)))


def test_multistage_keywords_override_args_with_a_deprecation(tmp_path):
    """The fields of InfluenceArgs as keywords (the pre-0.3 form) still apply over ``args``, each with a
    DeprecationWarning naming ``args=InfluenceArgs(...)``; the results equal the typed form's."""
    from tests import helpers as h
    pre, ft, _ = h.two_stage_mlps()
    rng = np.random.default_rng(1)
    xp, yp = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    xf, yf = rng.normal(size=(30, 5)), rng.integers(0, 2, 30)
    g, f = tfi.Objective(pre, h.sce()), tfi.Objective(ft, h.sce())
    args = tfi.InfluenceArgs(hessian_samples=None, pretrain_solver=tfi.SolverConfig("dense_squared", damping=1e-2))
    with pytest.warns(DeprecationWarning, match=r"MultiStageInfluence\(seed=\.\.\.\) is deprecated: use "
                                                r"MultiStageInfluence\(args=InfluenceArgs\(seed=\.\.\.\)\)"):
        ms = tfi.MultiStageInfluence(g, h.dataset(xp, yp), f, h.dataset(xf, yf), ["embedding"], args=args, seed=4)
    assert ms.args.seed == 4 and ms.args.hessian_samples is None and ms.pretrain_solver.damping == 1e-2
    a = ms(h.dataset(xf[:4], yf[:4])).scores
    b = tfi.multi_stage_influence(g, h.dataset(xp, yp), f, h.dataset(xf, yf), h.dataset(xf[:4], yf[:4]),
                                  ["embedding"],
                                  args=tfi.InfluenceArgs(hessian_samples=None,
                                                         pretrain_solver=tfi.SolverConfig("dense_squared", damping=1e-2))).scores
    np.testing.assert_allclose(a, b, rtol=1e-10)
    with pytest.warns(DeprecationWarning, match=r"multi_stage_influence\(hessian_samples=\.\.\.\)"):
        c = tfi.multi_stage_influence(g, h.dataset(xp, yp), f, h.dataset(xf, yf), h.dataset(xf[:4], yf[:4]),
                                      ["embedding"], args=tfi.InfluenceArgs(pretrain_solver=args.pretrain_solver),
                                      hessian_samples=None).scores
    np.testing.assert_allclose(c, b, rtol=1e-10)
    with pytest.raises(TypeError, match="unexpected keyword argument 'hessian_sample'"):
        tfi.MultiStageInfluence(g, h.dataset(xp, yp), f, h.dataset(xf, yf), ["embedding"], hessian_sample=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'test_target'"):   # a call's argument there
        tfi.MultiStageInfluence(g, h.dataset(xp, yp), f, h.dataset(xf, yf), ["embedding"], test_target="each")
    with pytest.raises(ValueError, match="case must be 'fixed'"):
        tfi.MultiStageInfluence(g, h.dataset(xp, yp), f, h.dataset(xf, yf), ["embedding"],
                                args=tfi.InfluenceArgs(case="fxed"))


def test_solver_options_live_in_their_family():
    """Each family's options are a small class of their own; a family the solver does not read must stay at its
    defaults; the 0.2 spellings (flat keywords, reading ``cfg.max_iter``, ``dataclasses.replace`` with a flat
    name, flat JSON) still work — each with a ``DeprecationWarning`` naming the family form — and give the same
    configuration as the family form."""
    import dataclasses
    import tensorflow as tf
    new = tfi.SolverConfig("cg_squared", damping=1e-4, iterative=tfi.IterativeOptions(max_iter=17, dtype=tf.float64))
    assert new.kwargs() == {"damping": 1e-4, "tol": 1e-5, "on_nonconvergence": "warn", "memory_budget": None,
                            "max_iter": 17, "dtype": tf.float64}
    assert set(tfi.SolverConfig("ekfac").kwargs()) == {"damping", "tol", "on_nonconvergence", "memory_budget",
                                                       "fisher", "relative_damping", "factors", "max_examples",
                                                       "seed", "dense_factor_max", "covariance_max_examples", "product_dtype"}
    assert "scale" in tfi.SolverConfig("lissa").kwargs() and "scale" not in tfi.SolverConfig("cg").kwargs()
    assert tfi.SolverConfig("identity").kwargs() == {}
    with pytest.raises(ValueError, match=r"the dense options \(max_params\) do not apply to 'ekfac'"):
        tfi.SolverConfig("ekfac", dense=tfi.DenseOptions(max_params=3))
    # max_iter / dtype are shared (the other solvers ignore them): a configuration can switch its method
    assert tfi.SolverConfig("ekfac", iterative=tfi.IterativeOptions(max_iter=3)).kwargs()["fisher"] == "true"
    with pytest.raises(ValueError, match="scale is LiSSA's alone"):
        tfi.SolverConfig("cg", iterative=tfi.IterativeOptions(scale=2.0))
    with pytest.raises(TypeError, match="must be a KroneckerOptions"):
        tfi.SolverConfig("ekfac", kronecker=tfi.IterativeOptions())
    with pytest.warns(DeprecationWarning, match=r"SolverConfig\(max_iter=, dtype=\) is deprecated: use "
                                                r"SolverConfig\(iterative=IterativeOptions\(max_iter=\.\.\., dtype"):
        old = tfi.SolverConfig("cg_squared", damping=1e-4, max_iter=17, dtype=tf.float64)
    assert old == new
    with pytest.warns(DeprecationWarning, match=r"SolverConfig.max_iter is deprecated: use "
                                                r"SolverConfig.iterative.max_iter"):
        assert new.max_iter == 17
    with pytest.warns(DeprecationWarning, match="max_iter"):
        assert dataclasses.replace(new, max_iter=5).iterative == tfi.IterativeOptions(max_iter=5, dtype=tf.float64)
    assert new.replace(max_iter=5, damping=0.1) == tfi.SolverConfig(
        "cg_squared", damping=0.1, iterative=tfi.IterativeOptions(max_iter=5, dtype=tf.float64))
    flat_json = json.dumps({"method": "ekfac", "damping": 0.01, "fisher": "empirical", "max_examples": 8})
    with pytest.warns(DeprecationWarning, match="kronecker=KroneckerOptions"):
        from_flat = tfi.SolverConfig.from_json(flat_json)
    assert from_flat == tfi.SolverConfig("ekfac", damping=0.01,
                                         kronecker=tfi.KroneckerOptions(fisher="empirical", max_examples=8))
    assert json.loads(from_flat.to_json())["kronecker"]["fisher"] == "empirical"
    with pytest.raises(AttributeError, match="no attribute 'maxiter'"):
        new.maxiter

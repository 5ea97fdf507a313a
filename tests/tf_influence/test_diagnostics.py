"""Curvature diagnostics (Lanczos extreme eigenvalues, warnings) against numpy's eigenvalues."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h
from tf_influence import diagnostics


def _matrix(eigs, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


def test_lanczos_extremes_equal_numpy():
    eigs = np.concatenate([[-0.7], np.geomspace(1e-3, 30.0, 39)])
    op = tfi.DenseOperator(_matrix(eigs))
    lo, hi, steps = tfi.lanczos_extremes(op, num_iterations=40)
    assert steps == 40
    np.testing.assert_allclose([lo, hi], [-0.7, 30.0], rtol=1e-8)
    # a few steps: λ_max already accurate, the smallest Ritz value an upper bound on λ_min
    lo10, hi10, _ = tfi.lanczos_extremes(op, num_iterations=10)
    assert abs(hi10 - 30.0) / 30.0 < 1e-3
    assert -0.7 - 1e-9 <= lo10
    # an invariant subspace stops early and is exact
    lo2, hi2, steps2 = tfi.lanczos_extremes(tfi.DenseOperator(np.diag([2.0, 2.0, 2.0, 5.0])), num_iterations=4)
    assert steps2 == 2 and (lo2, hi2) == pytest.approx((2.0, 5.0))


def test_warnings_for_indefinite_hessian_and_dominating_damping():
    A = _matrix(np.array([-2.0, 0.5, 1.0, 4.0, 8.0]))
    b = np.ones(5)
    with pytest.warns(tfi.CurvatureWarning, match="indefinite: eigenvalue -2"):
        res = tfi.solve(tfi.DenseOperator(A), b, tfi.SolverConfig("cg_squared", damping=1e-3, tol=1e-10))
    c = res.extra["curvature"]
    assert c["indefinite"] and not c["damping_dominates"]
    assert c["lambda_min"] == pytest.approx(-2.0) and c["lambda_max"] == pytest.approx(8.0)
    assert c["damping_over_scale"] == pytest.approx(1e-3 / 64.0)          # λ / λ_max² for the squared system
    assert res.summary()["curvature"]["lanczos_steps"] == 5

    spd = _matrix(np.array([0.5, 1.0, 4.0, 8.0, 9.0]))
    with pytest.warns(tfi.CurvatureWarning, match="the damping 10 of the cg solve .* ≥ λ_max"):
        res = tfi.solve(tfi.DenseOperator(spd), b, tfi.SolverConfig("cg", damping=10.0, tol=1e-10))
    assert res.extra["curvature"]["damping_dominates"] and not res.extra["curvature"]["indefinite"]
    assert res.extra["curvature"]["damping_over_scale"] == pytest.approx(10.0 / 9.0)

    with warnings.catch_warnings():  # healthy: no warning; identity and curvature_iterations=0: no diagnostics
        warnings.simplefilter("error")
        assert not tfi.solve(tfi.DenseOperator(spd), b, tfi.SolverConfig("cg", damping=1e-3, tol=1e-10)
                             ).extra["curvature"]["warnings"]
        assert "curvature" not in tfi.solve(tfi.DenseOperator(A), b, tfi.SolverConfig("identity")).extra
        assert "curvature" not in tfi.solve(tfi.DenseOperator(A), b, tfi.SolverConfig(
            "cg_squared", damping=1e-3, tol=1e-10, curvature_iterations=0)).extra


def test_influence_results_carry_the_diagnostics_of_every_hessian():
    """A model with a known Hessian: linear least squares, H = 2/n XᵀX in closed form; then a
    two-stage model, whose result reports both inverted Hessians."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)).astype("float64")
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=30)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False, dtype="float64")])
    obj = tfi.Objective(model, "mse")
    ds = tf.data.Dataset.from_tensor_slices((x, y[:, None])).batch(8)
    res = tfi.single_stage_influence(obj, ds, ds.take(1), solver=tfi.SolverConfig("cg", damping=1e-4, tol=1e-10))
    exact = np.linalg.eigvalsh(2.0 / 30 * x.T @ x)
    c = res.solves["hessian"]["curvature"]
    np.testing.assert_allclose([c["lambda_min"], c["lambda_max"]], [exact[0], exact[-1]], rtol=1e-6)
    assert c["lanczos_steps"] == 3 and not c["warnings"]
    # a HessianOperator over more examples than `samples` is diagnosed on a fixed subset of them
    H = tfi.HessianOperator(obj, ds, tfi.ParameterGroup.from_model(model))
    sub = diagnostics.curvature_diagnostics(H, "cg", 1e-4, samples=10, warn=False)
    assert sub["lambda_max"] != pytest.approx(c["lambda_max"]) and sub["lambda_max"] > 0

    pre, ft, _ = h.two_stage_mlps()
    rng = np.random.default_rng(1)
    xp, yp = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    xf, yf = rng.normal(size=(30, 5)), rng.integers(0, 2, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model: indefinite, as the diagnostics say
        res = tfi.multi_stage_influence(tfi.Objective(pre, h.sce()), h.dataset(xp, yp), tfi.Objective(ft, h.sce()),
                                        h.dataset(xf, yf), h.dataset(xf[:4], yf[:4]), ["embedding"],
                                        args=tfi.InfluenceArgs(hessian_samples=None))
    for stage, group in (("pretrain", "(W,U)"), ("finetune", "Θ")):
        c = res.solves[stage]["curvature"]  # the default solves are dense: their exact spectrum, no Lanczos
        assert c["source"] == "dense" and c["lanczos_steps"] == 0, (stage, group)
    exact = np.linalg.eigvalsh(h.explicit_hessian(tfi.Objective(pre, h.sce()), xp, yp,
                                                  tfi.ParameterGroup.from_model(pre)))
    np.testing.assert_allclose([res.solves["pretrain"]["curvature"][k] for k in ("lambda_min", "lambda_max")],
                               [exact[0], exact[-1]], rtol=1e-6, atol=1e-9)

"""Inverse-HVP solvers against numpy.linalg.solve."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h


def spd(p=12, cond=50.0, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    return q @ np.diag(np.geomspace(1.0, cond, p)) @ q.T


def indefinite(p=12, seed=1):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    eig = np.geomspace(0.5, 20.0, p) * np.where(np.arange(p) % 3 == 0, -1.0, 1.0)
    return q @ np.diag(eig) @ q.T


RHS = np.random.default_rng(7).normal(size=(12, 3))


@pytest.mark.parametrize("method,kw", [("cg", {}), ("cg_squared", {}), ("lissa", {"max_iter": 5000}), ("dense", {}),
                                       ("dense_squared", {})])
def test_spd_systems(method, kw):
    A = spd()
    op = tfi.DenseOperator(A)
    res = tfi.solve(op, RHS, tfi.SolverConfig(method=method, damping=0.0, tol=1e-10,
                                              on_nonconvergence="raise",
                                              iterative=tfi.IterativeOptions(max_iter=kw.get("max_iter", 500))))
    np.testing.assert_allclose(res.x.numpy(), np.linalg.solve(A, RHS), rtol=1e-6, atol=1e-8)
    assert res.converged and res.relative_residual.shape == (3,)
    # single right-hand side keeps the vector shape
    r1 = tfi.solve(op, RHS[:, 0], tfi.SolverConfig(method=method, damping=0.0, tol=1e-10,
                                                   iterative=tfi.IterativeOptions(max_iter=kw.get("max_iter", 500))))
    assert r1.x.shape == (12,)
    np.testing.assert_allclose(r1.x.numpy(), np.linalg.solve(A, RHS[:, 0]), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["cg", "cg_squared", "lissa", "dense"])
def test_damping(method):
    A, lam = spd(), 0.7
    res = tfi.solve(tfi.DenseOperator(A), RHS, tfi.SolverConfig(method=method, damping=lam, tol=1e-10,
                                                                iterative=tfi.IterativeOptions(max_iter=5000)))
    if method == "cg_squared":  # eq. 16 with damping: (H² + λI) x = H b
        expected = np.linalg.solve(A @ A + lam * np.eye(12), A @ RHS)
    else:
        expected = np.linalg.solve(A + lam * np.eye(12), RHS)
    np.testing.assert_allclose(res.x.numpy(), expected, rtol=1e-6, atol=1e-8)


def test_indefinite_needs_the_squared_route():
    A = indefinite()
    op = tfi.DenseOperator(A)
    for method in ("cg_squared", "dense_squared", "dense"):
        res = tfi.solve(op, RHS, tfi.SolverConfig(method=method, damping=0.0, tol=1e-10,
                                                  iterative=tfi.IterativeOptions(max_iter=500)))
        np.testing.assert_allclose(res.x.numpy(), np.linalg.solve(A, RHS), rtol=1e-6, atol=1e-8)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        tfi.cg(op, RHS, tol=1e-10, max_iter=500)


def test_float32_operator_solved_in_float64():
    A = spd(cond=1e3).astype(np.float32)
    op = tfi.DenseOperator(A)
    r64 = tfi.cg(op, RHS.astype(np.float32), tol=1e-5, max_iter=500, dtype=tf.float64)
    assert r64.converged
    assert r64.x.dtype == tf.float32  # returned in the operator's dtype
    np.testing.assert_allclose(r64.x.numpy(), np.linalg.solve(A.astype(np.float64), RHS), rtol=1e-4)


def test_nonconvergence_is_reported():
    A = spd(cond=1e6, p=40)
    op = tfi.DenseOperator(A)
    b = np.random.default_rng(0).normal(size=40)
    with pytest.warns(tfi.SolverNotConvergedWarning, match="did not converge: relative residual"):
        res = tfi.cg(op, b, tol=1e-12, max_iter=3)
    assert not res.converged and res.iterations == 3 and res.relative_residual[0] > 1e-12
    with pytest.raises(tfi.SolverNotConvergedError, match="relative residual"):
        tfi.cg_squared(op, b, tol=1e-12, max_iter=3, on_nonconvergence="raise")
    with pytest.raises(tfi.SolverNotConvergedError):
        tfi.lissa(op, b, tol=1e-12, max_iter=20, on_nonconvergence="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tfi.cg(op, b, tol=1e-12, max_iter=3, on_nonconvergence="ignore")


def test_dense_refuses_large_systems():
    with pytest.raises(ValueError, match="dense solver refuses"):
        tfi.dense(tfi.DenseOperator(np.eye(50)), np.ones(50), max_params=10)


def test_bad_right_hand_sides():
    op = tfi.DenseOperator(spd())
    with pytest.raises(tfi.NonFiniteError):
        tfi.cg(op, np.full(12, np.nan))
    with pytest.raises(ValueError, match="expects 12 rows"):
        tfi.cg(op, np.ones(5))
    with pytest.raises(ValueError, match="unknown solver"):
        tfi.SolverConfig(method="newton")


def test_solvers_on_a_real_hessian_operator():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    model = h.mlp(l2=0.05)
    h.train(model, h.sce(), x, y, steps=200)
    obj = tfi.Objective(model, h.sce())
    g = tfi.ParameterGroup.from_model(model, "all")
    H = h.explicit_hessian(obj, x, y, g)
    op = tfi.HessianOperator(obj, h.dataset(x, y), g)
    b = rng.normal(size=(g.size, 2))
    exact = np.linalg.solve(H, b)
    for method in ("cg_squared", "dense"):
        res = tfi.solve(op, b, tfi.SolverConfig(method=method, damping=0.0, tol=1e-10,
                                                iterative=tfi.IterativeOptions(max_iter=1000)))
        np.testing.assert_allclose(res.x.numpy(), exact, rtol=1e-5, atol=1e-7)

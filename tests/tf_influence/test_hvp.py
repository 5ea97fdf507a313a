"""HVP (forward-over-back and reverse-over-reverse) against explicit Hessians."""

import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h


@pytest.fixture(scope="module")
def mlp_setup():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(37, 5)), rng.integers(0, 3, 37)
    model = h.mlp(l2=0.01)
    obj = tfi.Objective(model, h.sce())
    return model, obj, x, y


@pytest.mark.parametrize("mode", ["fob", "rr"])
def test_hvp_matches_explicit_hessian_mlp(mlp_setup, mode):
    model, obj, x, y = mlp_setup
    g = tfi.ParameterGroup.from_model(model, "all")
    H = h.explicit_hessian(obj, x, y, g)
    V = np.random.default_rng(1).normal(size=(g.size, 3))
    op = tfi.HessianOperator(obj, h.dataset(x, y, 8), g, mode=mode)  # 37 = 4 full batches + a partial one
    np.testing.assert_allclose(op.matvec(V).numpy(), H @ V, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(op.matvec(V[:, 0]).numpy(), H @ V[:, 0], rtol=1e-10, atol=1e-12)


def test_small_data_held_in_memory_large_data_streamed(mlp_setup, monkeypatch):
    """A dataset under ``CACHE_BYTES`` is read once and its batches held; above it every product
    streams the dataset. Both (and their transposes) equal the explicit Hessian."""
    from tf_influence import hessian
    model, obj, x, y = mlp_setup
    g = tfi.ParameterGroup.from_model(model, "all")
    H = h.explicit_hessian(obj, x, y, g)
    V = np.random.default_rng(3).normal(size=(g.size, 2))
    held = tfi.HessianOperator(obj, h.dataset(x, y, 8), g)
    assert held._held is not None and held.num_examples == 37
    monkeypatch.setattr(hessian, "CACHE_BYTES", 0)
    streamed = tfi.HessianOperator(obj, h.dataset(x, y, 8), g)
    assert streamed._held is None and streamed.num_examples == 37
    for op in (held, streamed, held.transpose(), streamed.transpose()):
        np.testing.assert_allclose(op.matvec(V).numpy(), H @ V, rtol=1e-10, atol=1e-12)
    monkeypatch.undo()
    data = h.dataset(x, y, 8)                       # operators over one dataset share one held copy ...
    a, b = tfi.HessianOperator(obj, data, g), tfi.HessianOperator(obj, data, g, mode="rr")
    assert a._held is b._held
    import gc
    import weakref
    ref = weakref.ref(a._held)
    del a, b
    gc.collect()
    assert ref() is None                            # ... freed with them, though the dataset lives on
    assert data is not None


@pytest.mark.parametrize("mode", ["fob", "rr"])
def test_hvp_matches_explicit_hessian_cnn(mode):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 6, 6, 1)), rng.integers(0, 3, 20)
    model = h.small_cnn()
    obj = tfi.Objective(model, h.sce())
    g = tfi.ParameterGroup.from_model(model, "all")
    H = h.explicit_hessian(obj, x, y, g)
    v = rng.normal(size=g.size)
    op = tfi.HessianOperator(obj, h.dataset(x, y, 6), g, mode=mode)
    np.testing.assert_allclose(op.matvec(v).numpy(), H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["fob", "rr"])
def test_mixed_block_and_transpose(mlp_setup, mode):
    model, obj, x, y = mlp_setup
    W = tfi.group_from_layers(model, ["hidden"], name="W")
    T = tfi.group_from_layers(model, ["out"], name="T")
    full = tfi.concat_groups("all", W, T)
    H = h.explicit_hessian(obj, x, y, full)
    iW, iT = full.slices(W), full.slices(T)
    H_WT = H[np.ix_(iW, iT)]
    op = tfi.HessianOperator(obj, h.dataset(x, y), W, T, mode=mode)
    v = np.random.default_rng(3).normal(size=T.size)
    np.testing.assert_allclose(op.matvec(v).numpy(), H_WT @ v, rtol=1e-10, atol=1e-12)
    u = np.random.default_rng(4).normal(size=W.size)
    np.testing.assert_allclose(op.transpose().matvec(u).numpy(), H_WT.T @ u, rtol=1e-10, atol=1e-12)
    # helper functions agree with the operator
    np.testing.assert_allclose(tfi.mixed_hvp(obj, h.dataset(x, y), W, T, v, mode=mode).numpy(), H_WT @ v,
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tfi.hvp(obj, h.dataset(x, y), T, v, mode=mode).numpy(),
                               H[np.ix_(iT, iT)] @ v, rtol=1e-10, atol=1e-12)


def logistic_loss(y, logits):
    """softplus(u) − y·u: the exact logistic loss (Keras' BinaryCrossentropy clips at 1e-7)."""
    return tf.nn.softplus(logits[:, 0]) - y[:, 0] * logits[:, 0]


def test_logistic_regression_closed_form_hessian():
    """H = Xᵀ diag(σ(1−σ)) X / n + 2λI for L2-regularised logistic regression."""
    import keras
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 4))
    y = (rng.random(50) < 0.5).astype(np.float64)
    lam = 0.03125  # Keras casts the L2 factor through float32: use a value exact in float32
    inp = keras.Input((4,), dtype="float64")
    model = keras.Model(inp, keras.layers.Dense(1, use_bias=False, dtype="float64",
                                                kernel_regularizer=keras.regularizers.L2(lam))(inp))
    obj = tfi.Objective(model, logistic_loss)
    w = model.trainable_variables[0].numpy()[:, 0]
    s = 1 / (1 + np.exp(-x @ w))
    H = x.T @ (x * (s * (1 - s))[:, None]) / len(x) + 2 * lam * np.eye(4)
    g = tfi.ParameterGroup.from_model(model, "w")
    v = rng.normal(size=4)
    for mode in ("fob", "rr"):
        np.testing.assert_allclose(tfi.hvp(obj, h.dataset(x, y[:, None]), g, v, mode).numpy(), H @ v, rtol=1e-10)


def test_subsampled_hessian_is_hessian_of_the_subset(mlp_setup):
    model, obj, x, y = mlp_setup
    g = tfi.ParameterGroup.from_model(model, "all")
    op = tfi.HessianOperator(obj, h.dataset(x, y, 8), g, hessian_samples=10, seed=3)
    assert op.num_examples == 10
    xs, ys = [], []
    for bx, by in op.dataset:
        xs.append(bx.numpy())
        ys.append(by.numpy())
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    assert len(xs) == 10 and len({tuple(r) for r in xs}) == 10
    v = np.random.default_rng(0).normal(size=g.size)
    np.testing.assert_allclose(op.matvec(v).numpy(), h.explicit_hessian(obj, xs, ys, g) @ v, rtol=1e-10)
    # deterministic for a seed, different for another
    op2 = tfi.HessianOperator(obj, h.dataset(x, y, 8), g, hessian_samples=10, seed=3)
    np.testing.assert_allclose(op2.matvec(v).numpy(), op.matvec(v).numpy())
    op3 = tfi.HessianOperator(obj, h.dataset(x, y, 8), g, hessian_samples=10, seed=4)
    assert not np.allclose(op3.matvec(v).numpy(), op.matvec(v).numpy())


def test_extra_diagonal(mlp_setup):
    model, obj, x, y = mlp_setup
    g = tfi.ParameterGroup.from_model(model, "all")
    d = np.linspace(0.1, 1.0, g.size)
    op = tfi.HessianOperator(obj, h.dataset(x, y), g, extra_diagonal=d)
    v = np.ones(g.size)
    np.testing.assert_allclose(op.matvec(v).numpy(), h.explicit_hessian(obj, x, y, g) @ v + d * v, rtol=1e-10)


def test_to_dense_refuses_large(mlp_setup):
    model, obj, x, y = mlp_setup
    g = tfi.ParameterGroup.from_model(model, "all")
    op = tfi.HessianOperator(obj, h.dataset(x, y), g)
    with pytest.raises(ValueError, match="refusing to build the dense"):
        op.to_dense(max_params=10)
    H = h.explicit_hessian(obj, x, y, g)
    np.testing.assert_allclose(op.to_dense(), H, rtol=1e-10, atol=1e-12)
    # vectorised column blocks (with a partial last block), regularisation included
    np.testing.assert_allclose(op.to_dense(block_size=7), H, rtol=1e-10, atol=1e-12)
    mixed = tfi.HessianOperator(obj, h.dataset(x, y), tfi.group_from_layers(model, ["out"]),
                                tfi.group_from_layers(model, ["hidden"]))
    rows, cols = g.slices(mixed.rows), g.slices(mixed.cols)
    np.testing.assert_allclose(mixed.to_dense(block_size=5), H[np.ix_(rows, cols)], rtol=1e-10, atol=1e-12)

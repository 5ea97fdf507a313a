"""Every engine path on the layers text models use: Embedding (sparse IndexedSlices gradients),
MultiHeadAttention / EinsumDense, LayerNormalization, Dropout (inference mode), integer tokens and
dict inputs with a padding mask — against explicit dense computations on a tiny transformer."""

import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence import presence, tracin
from tests import helpers as h


def ds(x, y, batch=3):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


@pytest.fixture(scope="module")
def world():
    pre, ft, enc = h.two_stage_transformers(dict_inputs=True)
    xp, yp = h.token_data(24, n_classes=3, seed=1, with_mask=True)
    xf, yf = h.token_data(16, n_classes=2, seed=2, with_mask=True)
    xt, yt = h.token_data(5, n_classes=2, seed=3, with_mask=True)
    h.train(pre, h.sce(), xp, yp, steps=60)
    enc.trainable = False
    h.train(ft, h.sce(), xf, yf, steps=60)
    enc.trainable = True
    g = tfi.ParameterGroup.from_model(pre)
    H_pre = h.explicit_hessian(tfi.Objective(pre, h.sce()), xp, yp, g)  # independent: nested jacobians
    return dict(pre=pre, ft=ft, xp=xp, yp=yp, xf=xf, yf=yf, xt=xt, yt=yt, g=g, H_pre=H_pre)


@pytest.mark.slow   # make test-slow: HVPs against explicit Hessians run in make test on MLPs / CNNs (test_hvp.py)
def test_hvp_equals_the_explicit_hessian(world):
    obj = tfi.Objective(world["pre"], h.sce())
    g, H = world["g"], world["H_pre"]
    V = np.random.default_rng(0).normal(size=(g.size, 2))
    W = tfi.group_from_layers(world["pre"], ["embedding"])
    U = tfi.group_from_layers(world["pre"], ["U"])
    iW, iU = g.slices(W), g.slices(U)
    for mode in ("fob", "rr"):
        op = tfi.HessianOperator(obj, ds(world["xp"], world["yp"], 7), g, mode=mode)
        np.testing.assert_allclose(op.matvec(V[:, 0]).numpy(), H @ V[:, 0], rtol=1e-9, atol=1e-11)
        # the mixed block embedding × head, and its transpose
        mixed = tfi.HessianOperator(obj, ds(world["xp"], world["yp"], 7), W, U, mode=mode)
        np.testing.assert_allclose(mixed.matvec(V[iU, 0]).numpy(), H[np.ix_(iW, iU)] @ V[iU, 0], rtol=1e-9,
                                   atol=1e-11)
        np.testing.assert_allclose(mixed.transpose().matvec(V[iW, 0]).numpy(), H[np.ix_(iU, iW)] @ V[iW, 0],
                                   rtol=1e-9, atol=1e-11)
    # several vectors at once: the vectorised block product
    np.testing.assert_allclose(op.matvec(V).numpy(), H @ V, rtol=1e-9, atol=1e-11)


def test_per_example_gradients_and_products_through_embeddings(world):
    obj = tfi.Objective(world["pre"], h.sce())
    g = tfi.ParameterGroup.from_model(world["pre"])
    x, y = world["xp"], world["yp"]
    ref = h.one_at_a_time_gradients(obj, x, y, g)
    got = tfi.stack_per_example_gradients(obj, ds(x, y, 5), g, chunk_size=4).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    emb = tfi.group_from_layers(world["pre"], ["tok_emb"])
    assert np.count_nonzero(got[:, g.slices(emb)]) > 0  # the embedding rows of the tokens used
    V = np.random.default_rng(1).normal(size=(g.size, 3))
    for method in ("jvp", "jacobian"):
        np.testing.assert_allclose(tfi.per_example_dot(obj, ds(x, y, 5), g, V, method=method), ref @ V,
                                   rtol=1e-9, atol=1e-11)


def test_multi_stage_influence_equals_a_dense_computation(world):
    """Case 1 on a transformer: eq. 11 with explicit Hessians and numpy solves of the eq. 16 systems."""
    pre, ft = world["pre"], world["ft"]
    pre_obj, ft_obj = tfi.Objective(pre, h.sce()), tfi.Objective(ft, h.sce())
    lam_g, lam_f = 1e-3, 1e-4
    cfg = lambda lam: tfi.SolverConfig("cg_squared", damping=lam, tol=1e-12,  # noqa: E731
                                       on_nonconvergence="raise", iterative=tfi.IterativeOptions(max_iter=3000))
    res = tfi.multi_stage_influence(pre_obj, ds(world["xp"], world["yp"], 8), ft_obj,
                                    ds(world["xf"], world["yf"], 8), ds(world["xt"], world["yt"], 2),
                                    embedding=["embedding"],
                                    args=tfi.InfluenceArgs(hessian_samples=None, pretrain_solver=cfg(lam_g),
                                                           finetune_solver=cfg(lam_f)))
    W_pre = tfi.group_from_layers(pre, ["embedding"])
    W_ft = tfi.group_from_layers(ft, ["embedding"])
    U, T = tfi.complement_group(pre, W_pre), tfi.complement_group(ft, W_ft)
    WU, TW = tfi.concat_groups("WU", W_pre, U), tfi.concat_groups("TW", T, W_ft)
    H_F = h.explicit_hessian(ft_obj, world["xf"], world["yf"], TW)
    iT, iW = TW.slices(T), TW.slices(W_ft)
    H_TT, H_WT = H_F[np.ix_(iT, iT)], H_F[np.ix_(iW, iT)]
    iWU = world["g"].slices(WU)
    H_G = world["H_pre"][np.ix_(iWU, iWU)]
    sq = lambda H, b, lam: np.linalg.solve(H @ H + lam * np.eye(len(H)), H @ b)  # noqa: E731  (eq. 16)
    b_T = h.loss_gradient(ft_obj, world["xt"], world["yt"], T)
    b_W = h.loss_gradient(ft_obj, world["xt"], world["yt"], W_ft)
    v = b_W - H_WT @ sq(H_TT, b_T, lam_f)
    s = -sq(H_G, np.r_[v, np.zeros(U.size)], lam_g)
    G = h.one_at_a_time_gradients(pre_obj, world["xp"], world["yp"], WU)
    np.testing.assert_allclose(res.scores, G @ s, rtol=1e-6, atol=1e-9 * np.abs(G @ s).max())
    assert np.abs(res.scores).max() > 0


def test_self_influence_and_presence_on_a_transformer(world):
    obj = tfi.Objective(world["pre"], h.sce())
    x, y = world["xp"], world["yp"]
    K = tfi.group_from_layers(world["pre"], ["tok_emb", "attention"])
    ref = np.sum(h.one_at_a_time_gradients(obj, x, y, K) ** 2, axis=1)
    np.testing.assert_allclose(tracin.self_influence(obj, ds(x, y, 5), ["tok_emb", "attention"]), ref, rtol=1e-9)
    # PRESENCE microbatch self-influence (eq. 11) = squared norm of each microbatch's mean-loss gradient
    n = 4
    si = tracin.microbatch_self_influence(obj, x, y, ["tok_emb", "attention"], n)
    size = len(y) // n
    ref_mb = []
    for i in range(n):
        xi = {k: v[i * size:(i + 1) * size] for k, v in x.items()}
        g = h.loss_gradient(obj, xi, y[i * size:(i + 1) * size], K, reduction="mean")
        ref_mb.append(np.sum(g ** 2))
    np.testing.assert_allclose(si, ref_mb, rtol=1e-9)
    weights = presence.presence_weights(si, 1.0).numpy()
    assert weights.argmax() == np.argmax(ref_mb)

"""Multi-stage influence (both cases) and the identity baseline against dense computations of
eq. 11 and eq. 13–15 on small nonlinear models (explicit Hessians, numpy inverses)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    xp, yp = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    xf, yf = rng.normal(size=(30, 5)), rng.integers(0, 2, 30)
    xt, yt = rng.normal(size=(7, 5)), rng.integers(0, 2, 7)
    pre, ft, emb = h.two_stage_mlps()
    h.train(pre, h.sce(), xp, yp, steps=300)
    # case 1: finetune only Θ
    emb.trainable = False
    h.train(ft, h.sce(), xf, yf, steps=300)
    emb.trainable = True
    return dict(pre=pre, ft=ft, xp=xp, yp=yp, xf=xf, yf=yf, xt=xt, yt=yt)


def groups(m):
    pre, ft = m["pre"], m["ft"]
    W_pre = tfi.group_from_layers(pre, ["embedding"])
    W_ft = tfi.group_from_layers(ft, ["embedding"])
    U = tfi.complement_group(pre, W_pre)
    T = tfi.complement_group(ft, W_ft)
    return W_pre, U, W_ft, T


def dense_case1(m, test_cols, damping_pre=0.0, measurement=None):
    pre_obj, ft_obj = tfi.Objective(m["pre"], h.sce()), tfi.Objective(m["ft"], h.sce())
    meas_obj = ft_obj if measurement is None else tfi.Objective(m["ft"], measurement, include_model_losses=False)
    W_pre, U, W_ft, T = groups(m)
    WU = tfi.concat_groups("WU", W_pre, U)
    TW = tfi.concat_groups("TW", T, W_ft)
    H_F = h.explicit_hessian(ft_obj, m["xf"], m["yf"], TW)
    iT, iW = TW.slices(T), TW.slices(W_ft)
    H_TT, H_WT = H_F[np.ix_(iT, iT)], H_F[np.ix_(iW, iT)]
    H_G = h.explicit_hessian(pre_obj, m["xp"], m["yp"], WU)
    G = h.one_at_a_time_gradients(pre_obj, m["xp"], m["yp"], WU)
    out = []
    for xt, yt in test_cols:
        b_T = h.loss_gradient(meas_obj, xt, yt, T)
        b_W = h.loss_gradient(meas_obj, xt, yt, W_ft)
        v = b_W - H_WT @ np.linalg.solve(H_TT, b_T)
        x = np.linalg.solve(H_G + damping_pre * np.eye(WU.size), np.r_[v, np.zeros(U.size)])
        out.append(-G @ x)
    return np.stack(out, axis=1)


def run(m, **kw):
    pre_obj, ft_obj = tfi.Objective(m["pre"], h.sce()), tfi.Objective(m["ft"], h.sce())
    kw.setdefault("pretrain_solver", tfi.SolverConfig("cg_squared", damping=0.0, tol=1e-11,
                                                      on_nonconvergence="raise",
                                                      iterative=tfi.IterativeOptions(max_iter=2000)))
    kw.setdefault("finetune_solver", tfi.SolverConfig("cg_squared", damping=0.0, tol=1e-11,
                                                      on_nonconvergence="raise",
                                                      iterative=tfi.IterativeOptions(max_iter=2000)))
    kw.setdefault("hessian_samples", None)
    xt, yt = kw.pop("test", (m["xt"], m["yt"]))
    measurement = kw.pop("measurement", None)
    return tfi.multi_stage_influence(pre_obj, h.dataset(m["xp"], m["yp"], 16), ft_obj,
                                     h.dataset(m["xf"], m["yf"], 16), h.dataset(xt, yt, 4),
                                     embedding=["embedding"], measurement=measurement, args=tfi.InfluenceArgs(**kw))


@pytest.mark.parametrize("mode", ["fob", "rr"])
def test_case1_sum_equals_dense(models, mode):
    res = run(models, hvp_mode=mode)
    expected = dense_case1(models, [(models["xt"], models["yt"])])[:, 0]
    np.testing.assert_allclose(res.scores, expected, rtol=1e-6, atol=1e-9)
    assert res.scores.shape == (40,)
    assert res.solves["pretrain"]["converged"] and res.solves["finetune"]["converged"]


def test_case1_matrix_equals_dense_per_test_point(models):
    res = run(models, test_target="each")
    cols = [(models["xt"][j:j + 1], models["yt"][j:j + 1]) for j in range(7)]
    np.testing.assert_allclose(res.scores, dense_case1(models, cols), rtol=1e-6, atol=1e-9)
    assert res.scores.shape == (40, 7)


def margin(y_true, logits):
    """A test measurement other than the training loss: the correct-class logit minus the other one."""
    onehot = tf.one_hot(tf.cast(y_true, tf.int32), 2, dtype=logits.dtype)
    return tf.reduce_sum(onehot * logits, -1) - tf.reduce_sum((1 - onehot) * logits, -1)


def test_case1_with_a_measurement_equals_dense(models, tmp_path):
    ref = dense_case1(models, [(models["xt"], models["yt"])], measurement=margin)[:, 0]
    res = run(models, measurement=margin)
    np.testing.assert_allclose(res.scores, ref, rtol=1e-6, atol=1e-9)
    assert not np.allclose(res.scores, run(models).scores, rtol=1e-2)  # the measurement changes the scores
    # saved and loaded: scores, test vector and the group spec that rebuilds (W, U) on the model
    res.save(str(tmp_path / "r"))
    back = tfi.InfluenceResult.load(str(tmp_path / "r"))
    np.testing.assert_array_equal(back.scores, res.scores)
    np.testing.assert_array_equal(back.test_vector.numpy(), res.test_vector.numpy())
    assert (back.method, back.num_train, back.solves) == (res.method, res.num_train, res.solves)
    rebuilt = tfi.ParameterGroup.from_spec(models["pre"], back.group_spec)
    assert [id(v) for v in rebuilt.tf_variables] == [id(v) for v in res.group.tf_variables]
    with pytest.raises(FileNotFoundError, match="no saved InfluenceResult"):
        tfi.InfluenceResult.load(str(tmp_path))


def test_case1_with_damping_and_dense_solver(models):
    lam = 0.05
    res = run(models, pretrain_solver=tfi.SolverConfig("dense", damping=lam),
              finetune_solver=tfi.SolverConfig("dense", damping=0.0))
    expected = dense_case1(models, [(models["xt"], models["yt"])], damping_pre=lam)[:, 0]
    np.testing.assert_allclose(res.scores, expected, rtol=1e-8, atol=1e-10)


def test_identity_baseline_equals_dense(models):
    m = models
    pre_obj, ft_obj = tfi.Objective(m["pre"], h.sce()), tfi.Objective(m["ft"], h.sce())
    W_pre, U, W_ft, T = groups(m)
    TW = tfi.concat_groups("TW", T, W_ft)
    H_F = h.explicit_hessian(ft_obj, m["xf"], m["yf"], TW)
    H_WT = H_F[np.ix_(TW.slices(W_ft), TW.slices(T))]
    v = h.loss_gradient(ft_obj, m["xt"], m["yt"], W_ft) - H_WT @ h.loss_gradient(ft_obj, m["xt"], m["yt"], T)
    WU = tfi.concat_groups("WU", W_pre, U)
    expected = -h.one_at_a_time_gradients(pre_obj, m["xp"], m["yp"], WU) @ np.r_[v, np.zeros(U.size)]
    res = tfi.identity_hessian_influence(pre_obj, h.dataset(m["xp"], m["yp"]), ft_obj, h.dataset(m["xf"], m["yf"]),
                                         h.dataset(m["xt"], m["yt"]), embedding=["embedding"])
    np.testing.assert_allclose(res.scores, expected, rtol=1e-8, atol=1e-10)
    losses = tfi.pretraining_loss_scores(pre_obj, h.dataset(m["xp"], m["yp"]))
    np.testing.assert_allclose(losses, pre_obj.per_example_losses(m["xp"], m["yp"]).numpy(), rtol=1e-12)


def test_subsampled_pretrain_hessian_equals_dense_on_that_subset(models):
    m = models
    res = run(m, hessian_samples=15, seed=5)
    # rebuild the subset the operator used and redo the dense computation with it
    pre_obj = tfi.Objective(m["pre"], h.sce())
    sub = tfi.subsample(h.dataset(m["xp"], m["yp"], 16), 15, seed=5)
    xs = np.concatenate([b[0].numpy() for b in sub])
    ys = np.concatenate([b[1].numpy() for b in sub])
    W_pre, U, W_ft, T = groups(m)
    WU = tfi.concat_groups("WU", W_pre, U)
    ft_obj = tfi.Objective(m["ft"], h.sce())
    TW = tfi.concat_groups("TW", T, W_ft)
    H_F = h.explicit_hessian(ft_obj, m["xf"], m["yf"], TW)
    iT, iW = TW.slices(T), TW.slices(W_ft)
    v = h.loss_gradient(ft_obj, m["xt"], m["yt"], W_ft) - H_F[np.ix_(iW, iT)] @ np.linalg.solve(
        H_F[np.ix_(iT, iT)], h.loss_gradient(ft_obj, m["xt"], m["yt"], T))
    x = np.linalg.solve(h.explicit_hessian(pre_obj, xs, ys, WU), np.r_[v, np.zeros(U.size)])
    expected = -h.one_at_a_time_gradients(pre_obj, m["xp"], m["yp"], WU) @ x
    np.testing.assert_allclose(res.scores, expected, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def case2_models(models):
    """Separate finetune model whose embedding was also finetuned (W* ≠ W̄)."""
    m = dict(models)
    pre = m["pre"]
    _, ft, emb = h.two_stage_mlps(seed=0)
    # start the finetune model from the pretrained embedding and the case-1 head, then finetune all
    for dst, src in zip(emb.weights, tfi.group_from_layers(pre, ["embedding"]).variables):
        dst.assign(src)
    ft.get_layer("theta").set_weights(m["ft"].get_layer("theta").get_weights())
    h.train(ft, h.sce(), m["xf"], m["yf"], steps=100, lr=0.02)
    m["ft"] = ft
    return m


@pytest.mark.parametrize("alpha", [0.01, 0.5])
def test_case2_equals_dense_eq15(case2_models, alpha):
    m = case2_models
    pre_obj, ft_obj = tfi.Objective(m["pre"], h.sce()), tfi.Objective(m["ft"], h.sce())
    W_pre, U, W_ft, T = groups(m)
    assert not np.allclose(W_pre.values().numpy(), W_ft.values().numpy())
    TW = tfi.concat_groups("TW", T, W_ft)
    WU = tfi.concat_groups("WU", W_pre, U)
    K = h.explicit_hessian(ft_obj, m["xf"], m["yf"], TW)
    iT, iW = TW.slices(T), TW.slices(W_ft)
    K[np.ix_(iW, iW)] += 2 * alpha * np.eye(W_ft.size)
    # eq. 15: [dΘ; dW] = K⁻¹ [0; −2αI] [H_G⁻¹ ∇g(z)]_W ; eq. 13: I = [∇_Θ f; ∇_W f] · [dΘ; dW]
    H_G = h.explicit_hessian(pre_obj, m["xp"], m["yp"], WU)
    G = h.one_at_a_time_gradients(pre_obj, m["xp"], m["yp"], WU)
    b = np.r_[h.loss_gradient(ft_obj, m["xt"], m["yt"], T), h.loss_gradient(ft_obj, m["xt"], m["yt"], W_ft)]
    iWU = WU.slices(W_pre)
    expected = []
    for z in range(len(G)):
        dWbar = -np.linalg.solve(H_G, G[z])[iWU]
        rhs = np.zeros(TW.size)
        rhs[iW] = 2 * alpha * dWbar
        expected.append(b @ np.linalg.solve(K, rhs))
    res = run(m, case="updated", alpha=alpha)
    np.testing.assert_allclose(res.scores, np.array(expected), rtol=1e-6, atol=1e-10)
    assert res.method == "multi_stage_updated"


def test_case1_refuses_a_finetuned_embedding(case2_models):
    with pytest.raises(tfi.ParameterGroupError, match="use case='updated'"):
        run(case2_models, case="fixed")

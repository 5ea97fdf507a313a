"""Influence on convex problems against exact implicit-function derivatives and exact
leave-one-out retraining (everything on the reference side is closed-form numpy).

Removal follows the paper's definition: ε = −1/m on the removed example's loss, the other
examples keep their 1/m weight and the regulariser is unchanged (eq. 4).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h

LAM = 2.0 ** -5  # exact in float32 (Keras casts L2 factors through float32)


def sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def softplus(u):
    return np.logaddexp(0.0, u)


def logistic_loss(y, logits):
    return tf.nn.softplus(logits[:, 0]) - y[:, 0] * logits[:, 0]


def newton_logistic(Phi, y, weights, l2_diag, w0, iters=60):
    """argmin Σ_i weights_i·(softplus(Φ_i w) − y_i Φ_i w) + Σ_k l2_diag_k w_k² by Newton."""
    w = w0.copy()
    for _ in range(iters):
        s = sigmoid(Phi @ w)
        grad = Phi.T @ (weights * (s - y)) + 2 * l2_diag * w
        if np.linalg.norm(grad) < 1e-14:
            break
        H = Phi.T @ (Phi * (weights * s * (1 - s))[:, None]) + np.diag(2 * l2_diag)
        w = w - np.linalg.solve(H, grad)
    return w


def logistic_sum(Phi, y, w):
    u = Phi @ w
    return float(np.sum(softplus(u) - y * u))


def pearson(a, b):
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------------------------------------
# single stage: L2-regularised logistic regression
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def logreg():
    rng = np.random.default_rng(0)
    n, d = 80, 4
    w_true = rng.normal(size=d)
    x, xt = rng.normal(size=(n, d)), rng.normal(size=(30, d))
    y = (rng.random(n) < sigmoid(x @ w_true)).astype(float)
    yt = (rng.random(30) < sigmoid(xt @ w_true)).astype(float)
    ones = np.ones(n) / n
    w = newton_logistic(x, y, ones, np.full(d, LAM), np.zeros(d))
    inp = keras.Input((d,), dtype="float64")
    model = keras.Model(inp, keras.layers.Dense(1, use_bias=False, dtype="float64",
                                                kernel_regularizer=keras.regularizers.L2(LAM))(inp))
    model.trainable_variables[0].assign(w[:, None])
    return dict(x=x, y=y, xt=xt, yt=yt, w=w, model=model, obj=tfi.Objective(model, logistic_loss))


def test_single_stage_equals_exact_implicit_derivative_and_loo(logreg):
    x, y, xt, yt, w = (logreg[k] for k in ("x", "y", "xt", "yt", "w"))
    n, d = x.shape
    train, test = h.dataset(x, y[:, None], 16), h.dataset(xt, yt[:, None], 16)
    res = tfi.single_stage_influence(logreg["obj"], train, test,
                                     solver=tfi.SolverConfig("cg", damping=0.0, tol=1e-12,
                                                             iterative=tfi.IterativeOptions(max_iter=100)))
    # exact: I(z) = −∇L_test · H⁻¹ ∇l(z)
    s = sigmoid(x @ w)
    H = x.T @ (x * (s * (1 - s))[:, None]) / n + 2 * LAM * np.eye(d)
    grad_test = xt.T @ (sigmoid(xt @ w) - yt)
    grads = x * (s - y)[:, None]
    exact = -grads @ np.linalg.solve(H, grad_test)
    np.testing.assert_allclose(res.scores, exact, rtol=1e-8, atol=1e-12)
    # actual leave-one-out retraining to the optimum
    base = logistic_sum(xt, yt, w)
    true = []
    for i in range(n):
        wts = np.ones(n) / n
        wts[i] = 0.0
        true.append(logistic_sum(xt, yt, newton_logistic(x, y, wts, np.full(d, LAM), w)) - base)
    pred = res.predicted_loss_change_on_removal()
    assert pearson(pred, true) > 0.99
    slope = np.polyfit(pred, true, 1)[0]
    assert 0.9 < slope < 1.1
    # the matrix form (one column per test point) sums to the test-set-sum form
    each = tfi.single_stage_influence(logreg["obj"], train, test, test_target="each",
                                      solver=tfi.SolverConfig("cg", damping=0.0, tol=1e-12,
                                                              iterative=tfi.IterativeOptions(max_iter=100)))
    assert each.scores.shape == (n, 30)
    np.testing.assert_allclose(each.scores.sum(axis=1), res.scores, rtol=1e-8, atol=1e-12)
    # harmful = positive score: removing the top-harmful example lowers the test loss
    i = res.top_harmful(1)[0]
    assert res.scores[i] > 0 and true[i] < 0


# ---------------------------------------------------------------------------------------------
# two stages: ridge-regression embedding (stage 1), logistic head on the fixed embedding (stage 2)
# ---------------------------------------------------------------------------------------------
D, Q, HID = 4, 2, 3


class TwoStageLinear:
    """Pretrain: t ≈ K_Wᵀ x + K_Uᵀ s (ridge, convex jointly in (W, U)); finetune: logistic
    regression on the embedding e = K_Wᵀ x with head Θ = (θ, β), W fixed (case 1)."""

    def __init__(self, seed=0, m=120, n=50, k=25):
        rng = np.random.default_rng(seed)
        self.xp, self.sp = rng.normal(size=(m, D)), rng.normal(size=(m, Q))
        Wt, Ut = rng.normal(size=(D, HID)), rng.normal(size=(Q, HID))
        self.tp = self.xp @ Wt + self.sp @ Ut + 0.5 * rng.normal(size=(m, HID))
        # a few mislabelled pretraining targets give clearly harmful examples
        self.tp[:5] = -self.tp[:5]
        v = rng.normal(size=HID)
        self.xf, self.xt = rng.normal(size=(n, D)), rng.normal(size=(k, D))
        self.yf = (rng.random(n) < sigmoid(self.xf @ Wt @ v)).astype(float)
        self.yt = (rng.random(k) < sigmoid(self.xt @ Wt @ v)).astype(float)
        self.A = np.concatenate([self.xp, self.sp], axis=1)
        self.m, self.n = m, n
        self.K = self.ridge(np.ones(m) / m)
        self.theta = self.finetune(self.K[:D], np.zeros(HID + 1))

    def ridge(self, wts):
        M = self.A.T @ (self.A * wts[:, None]) + 2 * LAM * np.eye(D + Q)
        return np.linalg.solve(M, self.A.T @ (self.tp * wts[:, None]))

    def phi(self, x, KW):
        return np.concatenate([x @ KW, np.ones((len(x), 1))], axis=1)

    def finetune(self, KW, theta0):
        l2 = np.r_[np.full(HID, LAM), 0.0]
        return newton_logistic(self.phi(self.xf, KW), self.yf, np.ones(self.n) / self.n, l2, theta0)

    def test_loss(self, K, theta):
        return logistic_sum(self.phi(self.xt, K[:D]), self.yt, theta)

    def keras_models(self):
        reg = keras.regularizers.L2(LAM)
        emb = keras.layers.Dense(HID, use_bias=False, dtype="float64", name="embedding", kernel_regularizer=reg)
        xin, sin = keras.Input((D,), dtype="float64"), keras.Input((Q,), dtype="float64")
        u = keras.layers.Dense(HID, use_bias=False, dtype="float64", name="pretrain_head", kernel_regularizer=reg)
        pre = keras.Model([xin, sin], keras.layers.Add(dtype="float64")([emb(xin), u(sin)]), name="pretrain")
        xin2 = keras.Input((D,), dtype="float64")
        head = keras.layers.Dense(1, dtype="float64", name="finetune_head", kernel_regularizer=reg)
        ft = keras.Model(xin2, head(emb(xin2)), name="finetune")
        emb.kernel.assign(self.K[:D])
        u.kernel.assign(self.K[D:])
        head.kernel.assign(self.theta[:HID, None])
        head.bias.assign(self.theta[HID:])
        return pre, ft

    def datasets(self):
        pre = tf.data.Dataset.from_tensor_slices(((self.xp, self.sp), self.tp)).batch(16)
        return pre, h.dataset(self.xf, self.yf[:, None], 16), h.dataset(self.xt, self.yt[:, None], 16)

    def exact_scores(self):
        """Case 1 by dense linear algebra: eq. 11 with closed-form Hessians."""
        KW, th = self.K[:D], self.theta[:HID]
        Phi = self.phi(self.xf, KW)
        s = sigmoid(Phi @ self.theta)
        r, r1 = s - self.yf, s * (1 - s)
        H_TT = Phi.T @ (Phi * r1[:, None]) / self.n + np.diag(np.r_[np.full(HID, 2 * LAM), 0.0])
        # H_ΘW[k, (a, j)] = mean_i r'_i Φ_ik x_ia θ_j + r_i x_ia δ_jk   (k < HID)
        H_TW = np.einsum("i,ik,ia,j->kaj", r1, Phi, self.xf, th) / self.n
        H_TW[:HID] += np.einsum("i,ia,jk->kaj", r, self.xf, np.eye(HID)) / self.n
        H_TW = H_TW.reshape(HID + 1, D * HID)
        Pt = self.phi(self.xt, KW)
        rt = sigmoid(Pt @ self.theta) - self.yt
        b_T = Pt.T @ rt
        b_W = np.einsum("t,ta,j->aj", rt, self.xt, th).reshape(-1)
        v_W = b_W - H_TW.T @ np.linalg.solve(H_TT, b_T)
        M = self.A.T @ self.A / self.m + 2 * LAM * np.eye(D + Q)
        H_G = np.kron(M, np.eye(HID))
        x = np.linalg.solve(H_G, np.r_[v_W, np.zeros(Q * HID)])
        res = self.A @ self.K - self.tp                                  # pretrain residuals
        grads = np.einsum("za,zj->zaj", self.A, res).reshape(self.m, -1)  # ∇_(W,U) g(z), row-major
        return -grads @ x

    def perturbed_test_loss(self, i, eps):
        wts = np.ones(self.m) / self.m
        wts[i] += eps
        K = self.ridge(wts)
        return self.test_loss(K, self.finetune(K[:D], self.theta))


@pytest.fixture(scope="module")
def two_stage():
    return TwoStageLinear()


@pytest.mark.parametrize("method", ["cg", "cg_squared", "dense"])
def test_case1_equals_dense_eq11(two_stage, method):
    pre, ft = two_stage.keras_models()
    pre_ds, ft_ds, test_ds = two_stage.datasets()
    mse = lambda y, p: 0.5 * tf.reduce_sum(tf.square(p - y), axis=-1)  # noqa: E731
    cfg = tfi.SolverConfig(method, damping=0.0, tol=1e-12, on_nonconvergence="raise",
                           iterative=tfi.IterativeOptions(max_iter=300))
    res = tfi.multi_stage_influence(tfi.Objective(pre, mse), pre_ds, tfi.Objective(ft, logistic_loss), ft_ds,
                                    test_ds, embedding=["embedding"],
                                    args=tfi.InfluenceArgs(case="fixed", pretrain_solver=cfg, finetune_solver=cfg,
                                                           hessian_samples=None))
    exact = two_stage.exact_scores()
    np.testing.assert_allclose(res.scores, exact, rtol=1e-7, atol=1e-10)


def test_dense_eq11_is_the_true_derivative(two_stage):
    """Central differences of the exact two-stage solution map agree with the dense eq. 11."""
    exact = two_stage.exact_scores()
    eps = 1e-5
    for i in (0, 7, 30):
        fd = (two_stage.perturbed_test_loss(i, eps) - two_stage.perturbed_test_loss(i, -eps)) / (2 * eps)
        np.testing.assert_allclose(fd, exact[i], rtol=1e-5, atol=1e-8)


def test_case1_predicts_leave_one_out(two_stage):
    """First-order prediction vs exact LOO. Influence is asymptotic in 1/m: on this problem
    Pearson r is 0.990 at m = 60 and 0.999 at m = 120 (the size used here)."""
    pre, ft = two_stage.keras_models()
    pre_ds, ft_ds, test_ds = two_stage.datasets()
    mse = lambda y, p: 0.5 * tf.reduce_sum(tf.square(p - y), axis=-1)  # noqa: E731
    res = tfi.multi_stage_influence(tfi.Objective(pre, mse), pre_ds, tfi.Objective(ft, logistic_loss), ft_ds,
                                    test_ds, embedding=["embedding"],
                                    args=tfi.InfluenceArgs(pretrain_solver=tfi.SolverConfig("cg_squared", damping=0.0, tol=1e-10),
                                                           finetune_solver=tfi.SolverConfig("cg_squared", damping=0.0, tol=1e-10),
                                                           hessian_samples=None))
    base = two_stage.test_loss(two_stage.K, two_stage.theta)
    true = np.array([two_stage.perturbed_test_loss(i, -1.0 / two_stage.m) - base for i in range(two_stage.m)])
    pred = res.predicted_loss_change_on_removal()
    r = pearson(pred, true)
    assert r > 0.99, r
    assert 0.8 < np.polyfit(pred, true, 1)[0] < 1.2
    # removing each of the 5 predicted-most-harmful examples really lowers the test loss,
    # and the truly most harmful example is among them
    assert np.all(true[res.top_harmful(5)] < 0)
    assert np.argmin(true) in set(res.top_harmful(5))

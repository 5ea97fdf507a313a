"""Second derivatives and influence formulas on keras-hub models (BERT, GPT-2 with its tied
ReversibleEmbedding, Llama), in the default environment (oneDNN on), against independent computations
(the float32 paths — EK-FAC, ghost norms, PRESENCE — are in test_hub_models.py):

* second derivatives of every supported layer type against float64 central finite differences of
  the gradient (not autodiff against autodiff), and the LayerNormalization bug they catch;
* multi-stage influence (both cases) and single-stage influence equal to dense numpy formulas built
  from explicit Hessians and one-at-a-time gradients (float64 tiny models);
* EK-FAC's corrected eigenvalues (tied and untied ReversibleEmbedding blocks included) equal to the
  exact Fisher diagonal in the block's eigenbasis; ghost-norm self-influence equal to one-at-a-time
  gradient norms; PRESENCE's microbatch gradients equal to one-at-a-time microbatch gradients;
* frozen backbones, layer objects and Keras paths, save / load, the causal-LM measurement.
"""

import contextlib

import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h
from tests import hub_models as hm
from tf_influence import lm, objective as objective_module
from tf_influence.evaluation import derivative_check as dc

pytest.importorskip("keras_hub")

from tests.hub_models import TINY  # noqa: E402
#: float64 comparisons formula vs formula; Llama's RMS norms compute in float32 by design
#: (keras-hub casts), so its float64 numbers carry float32 rounding in different summation orders
RTOL = 2e-5
#: Llama: that float32 rounding (≈ 1e-7 relative) goes through the eq. 16 systems (H² + λI, λ = 1e-3), whose
#: conditioning grew with the real-shaped vocabulary (37 tokens at width 4): measured 8e-5 on one score of ten
RTOL_LLAMA = 2e-4


def rtol(case) -> float:
    return RTOL_LLAMA if case.name == "llama" else RTOL


# -- second derivatives -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", dc.LAYER_CASES)
def test_hvp_equals_central_finite_differences_float64(case):
    with dc.float64_throughout():
        model, loss, data = dc.layer_case(case)
        err = dc.hvp_fd_error(dc.objective_for(model, loss), data, tfi.ParameterGroup.from_model(model))
    assert err < 1e-6, f"{case}: HVP vs central differences relative error {err:.3g}"


def test_layer_norm_second_derivative_is_wrong_without_exact_moments(monkeypatch):
    """The reference catches the bug: with Keras' own moments (tf.nn.moments' stop_gradient(mean)) the
    HVP through a LayerNormalization is off by percent; the library's exact moments fix it."""
    monkeypatch.setattr(objective_module, "exact_moments", contextlib.nullcontext)
    model, loss, data = dc.layer_case("layer_norm")
    err = dc.hvp_fd_error(tfi.Objective(model, loss), data, tfi.ParameterGroup.from_model(model))
    assert err > 1e-3, f"expected the stop_gradient error, got {err:.3g} (did Keras change tf.nn.moments?)"


# -- dense references -------------------------------------------------------------------------------------
def _sq(H, r, lam):
    """The eq. 16 system: (H² + λI)⁻¹ H r."""
    return np.linalg.solve(H @ H + lam * np.eye(len(H)), H @ r)


_DENSE = {}


def _dense_parts(case, g, f, measurement):
    """Explicit Hessians and one-at-a-time gradients of a case, computed once per case (the module's
    tests share the float64 models)."""
    key = (id(case), measurement)
    if key not in _DENSE:
        (xp, yp), (xf, yf), (xt, yt) = case.arrays["pre"], case.arrays["ft"], case.arrays["test"]
        W_pre = tfi.group_from_layers(case.pretrain, ["backbone"])
        W_ft = tfi.group_from_layers(case.finetune, ["backbone"])
        U = tfi.complement_group(case.pretrain, W_pre, allow_empty=True)
        T = tfi.complement_group(case.finetune, W_ft)
        WU = tfi.concat_groups("WU", W_pre, *([U] if U is not None else []))
        TW = tfi.concat_groups("TW", T, W_ft)
        meas = f if measurement is None else tfi.Objective(case.finetune, measurement, include_model_losses=False)
        _DENSE[key] = (case, U, T, W_ft, TW, h.explicit_hessian(g, xp, yp, WU), h.one_at_a_time_gradients(g, xp, yp, WU),
                       h.explicit_hessian(f, xf, yf, TW), h.loss_gradient(meas, xt, yt, TW))
    return _DENSE[key][1:]


def dense_multistage(case, g, f, case_kind, lam_pre, lam_ft, alpha=0.01, measurement=None):
    U, T, W_ft, TW, H_G, G, H_F, b = _dense_parts(case, g, f, measurement)
    iT, iW = TW.slices(T), TW.slices(W_ft)
    if case_kind == "fixed":
        v = b[iW] - H_F[np.ix_(iW, iT)] @ _sq(H_F[np.ix_(iT, iT)], b[iT], lam_ft)
    else:
        K = H_F + np.diag(np.r_[np.zeros(T.size), np.full(W_ft.size, 2 * alpha)])
        v = 2 * alpha * _sq(K, b, lam_ft)[iW]
    u = 0 if U is None else U.size
    return -G @ _sq(H_G, np.r_[v, np.zeros(u)], lam_pre), U


@pytest.fixture(scope="module", params=hm.kinds(slow=("bert", "llama")))   # float64 dense references: GPT-2's
def tiny64(request):                                                           # tied table is the hard case
    case = hm.build(request.param, dtype="float64", **TINY)
    return case


@pytest.fixture(scope="module")
def tiny64_updated():
    return {k: hm.build(k, dtype="float64", updated=True, **TINY) for k in ("gpt2",)}


def test_multistage_fixed_defaults_equal_dense_formula(tiny64):
    """Case 1 with a frozen backbone passed as a layer object, every argument at its default
    (solver "auto": an exact eq. 16 solve at this size), against eq. 11 assembled in numpy."""
    c = tiny64
    g, f = hm.objectives(c)
    assert not c.backbone.trainable
    res = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding=c.backbone,
                                    args=tfi.InfluenceArgs(hessian_samples=None))
    expected, U = dense_multistage(c, g, f, "fixed", tfi.DEFAULT_PRETRAIN_DAMPING, tfi.DEFAULT_FINETUNE_DAMPING)
    np.testing.assert_allclose(res.scores, expected, rtol=rtol(c), atol=1e-8 * np.abs(expected).max())
    assert res.solves["pretrain"]["auto"]["chose"] == "dense_squared"
    assert res.solves["finetune"]["method"] == "dense_squared"
    # GPT-2's and Llama's LM heads are the backbone's ReversibleEmbedding (tied / untied): U is empty
    assert (U is None) == (c.name in ("gpt2", "llama"))


def test_multistage_cg_squared_equals_dense_formula_on_tied_gpt2(tiny64):
    if tiny64.name != "gpt2":
        pytest.skip("the iterative solve is checked on the tied GPT-2")
    c = tiny64
    g, f = hm.objectives(c)
    # damping 0.1: (H² + λI) well enough conditioned that CG reaches 1e-10 in tens of products, not thousands
    cfg = tfi.SolverConfig("cg_squared", damping=1e-1, tol=1e-10, on_nonconvergence="raise",
                           curvature_iterations=0, iterative=tfi.IterativeOptions(max_iter=3000))
    res = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding="backbone",
                                    args=tfi.InfluenceArgs(pretrain_solver=cfg, finetune_solver=cfg,
                                                           hessian_samples=None))
    expected, _ = dense_multistage(c, g, f, "fixed", 1e-1, 1e-1)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())


def test_multistage_updated_equals_dense_formula(tiny64_updated):
    c = tiny64_updated["gpt2"]
    g, f = hm.objectives(c)
    cfg = tfi.SolverConfig("dense_squared", damping=1e-3, curvature_iterations=0)
    res = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding="backbone",
                                    args=tfi.InfluenceArgs(case="updated", pretrain_solver=cfg, finetune_solver=cfg,
                                                           hessian_samples=None))
    expected, _ = dense_multistage(c, g, f, "updated", 1e-3, 1e-3)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_single_stage_default_equals_dense_formula():
    c = hm.build("bert", dtype="float64", **TINY)
    _, f = hm.objectives(c)
    res = tfi.single_stage_influence(f, c.finetune_data, c.test_data)
    (xf, yf), (xt, yt) = c.arrays["ft"], c.arrays["test"]
    group = tfi.ParameterGroup.from_model(c.finetune)     # frozen backbone included
    H = h.explicit_hessian(f, xf, yf, group)
    expected = -h.one_at_a_time_gradients(f, xf, yf, group) @ _sq(
        H, h.loss_gradient(f, xt, yt, group), tfi.DEFAULT_FINETUNE_DAMPING)
    np.testing.assert_allclose(res.scores, expected, rtol=rtol(c), atol=1e-8 * np.abs(expected).max())


def test_completion_log_probability_measurement():
    """log p(completion | prompt) of a causal LM equals a numpy log-softmax over the completion tokens
    only, and its influence equals the dense formula with that measurement."""
    c = hm.build("gpt2", dtype="float64", **TINY)
    ids, mask = hm._tokens(3, 5, TINY["length"], TINY["vocab"])
    x, labels = lm.causal_lm_examples(ids, mask, prompt_lengths=[2, 3, 1])
    logits = c.pretrain(x).numpy()
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = []
    for i in range(3):
        keep = [t for t in range(ids.shape[1] - 1) if mask[i, t + 1] and t + 1 >= [2, 3, 1][i]]
        expected.append(sum(logp[i, t, ids[i, t + 1]] for t in keep))
    got = lm.completion_log_probability()(tf.constant(labels), tf.constant(logits)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    per_token = lm.completion_log_probability(per_token=True)(tf.constant(labels), tf.constant(logits)).numpy()
    np.testing.assert_allclose(per_token, np.array(expected) / (labels >= 0).sum(1), rtol=1e-6)
    # single-stage influence on the LM itself, measured by the completion's log-probability
    g = tfi.Objective(c.pretrain, lm.CausalLMLoss())
    test = tf.data.Dataset.from_tensor_slices((x, labels)).batch(3)
    res = tfi.single_stage_influence(g, c.pretrain_data, test, measurement=lm.completion_log_probability())
    xp, yp = c.arrays["pre"]
    group = tfi.ParameterGroup.from_model(c.pretrain)
    H = h.explicit_hessian(g, xp, yp, group)
    meas = tfi.Objective(c.pretrain, lm.completion_log_probability(), include_model_losses=False)
    ref = -h.one_at_a_time_gradients(g, xp, yp, group) @ _sq(H, h.loss_gradient(meas, x, labels, group),
                                                            tfi.DEFAULT_FINETUNE_DAMPING)
    np.testing.assert_allclose(res.scores, ref, rtol=rtol(c), atol=1e-8 * np.abs(ref).max())
    # a log-probability is a quantity to raise: the harmful examples are those whose removal raises it
    # (predicted change −score/m > 0: the most negative scores), and a saved result keeps knowing it
    assert res.higher_is_better and not tfi.single_stage_influence(g, c.pretrain_data, test).higher_is_better
    assert list(res.top_harmful(3)) == list(np.argsort(ref)[:3])
    assert list(res.top_helpful(3)) == list(np.argsort(-ref)[:3])
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        back = tfi.InfluenceResult.load(res.save(d))
    assert back.higher_is_better and list(back.top_harmful(3)) == list(res.top_harmful(3))


def test_causal_lm_examples_rejects_sequences_without_targets():
    with pytest.raises(ValueError, match="sequence 0 has no labelled position"):
        lm.causal_lm_examples(np.array([[3, 4, 0]]), np.array([[1, 0, 0]]))

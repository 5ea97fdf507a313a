"""keras-hub models users bring (BERT, GPT-2 with its tied ReversibleEmbedding, Llama), in the default
environment (oneDNN on), against independent computations:

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

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h
from tests import hub_models as hm
from tf_influence import kfac, lm, objective as objective_module
from tf_influence.evaluation import derivative_check as dc

pytest.importorskip("keras_hub")

KINDS = ("bert", "gpt2", "llama")
TINY = dict(vocab=31, width=8, layers=1, length=6, n_pre=12, n_ft=10, n_test=3, batch=6)
#: float64 comparisons formula vs formula; Llama's RMS norms compute in float32 by design
#: (keras-hub casts), so its float64 numbers carry float32 rounding in different summation orders
RTOL = 2e-5


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


def dense_multistage(case, g, f, case_kind, lam_pre, lam_ft, alpha=0.01, measurement=None):
    (xp, yp), (xf, yf), (xt, yt) = case.arrays["pre"], case.arrays["ft"], case.arrays["test"]
    W_pre = tfi.group_from_layers(case.pretrain, ["backbone"])
    W_ft = tfi.group_from_layers(case.finetune, ["backbone"])
    U = tfi.complement_group(case.pretrain, W_pre, allow_empty=True)
    T = tfi.complement_group(case.finetune, W_ft)
    WU = tfi.concat_groups("WU", W_pre, *([U] if U is not None else []))
    TW = tfi.concat_groups("TW", T, W_ft)
    meas = f if measurement is None else tfi.Objective(case.finetune, measurement, include_model_losses=False)
    H_G = h.explicit_hessian(g, xp, yp, WU)
    G = h.one_at_a_time_gradients(g, xp, yp, WU)
    H_F = h.explicit_hessian(f, xf, yf, TW)
    b = h.loss_gradient(meas, xt, yt, TW)
    iT, iW = TW.slices(T), TW.slices(W_ft)
    if case_kind == "fixed":
        v = b[iW] - H_F[np.ix_(iW, iT)] @ _sq(H_F[np.ix_(iT, iT)], b[iT], lam_ft)
    else:
        K = H_F + np.diag(np.r_[np.zeros(T.size), np.full(W_ft.size, 2 * alpha)])
        v = 2 * alpha * _sq(K, b, lam_ft)[iW]
    u = 0 if U is None else U.size
    return -G @ _sq(H_G, np.r_[v, np.zeros(u)], lam_pre), U


@pytest.fixture(scope="module", params=KINDS)
def tiny64(request):
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
                                    hessian_samples=None)
    expected, U = dense_multistage(c, g, f, "fixed", tfi.DEFAULT_PRETRAIN_DAMPING, tfi.DEFAULT_FINETUNE_DAMPING)
    np.testing.assert_allclose(res.scores, expected, rtol=RTOL, atol=1e-8 * np.abs(expected).max())
    assert res.solves["pretrain"]["auto"]["chose"] == "dense_squared"
    assert res.solves["finetune"]["method"] == "dense_squared"
    # GPT-2's and Llama's LM heads are the backbone's ReversibleEmbedding (tied / untied): U is empty
    assert (U is None) == (c.name in ("gpt2", "llama"))


def test_multistage_cg_squared_equals_dense_formula_on_tied_gpt2():
    c = hm.build("gpt2", dtype="float64", **TINY)
    g, f = hm.objectives(c)
    cfg = tfi.SolverConfig("cg_squared", damping=1e-2, tol=1e-10, max_iter=3000, on_nonconvergence="raise",
                           curvature_iterations=0)
    res = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding="backbone",
                                    pretrain_solver=cfg, finetune_solver=cfg, hessian_samples=None)
    expected, _ = dense_multistage(c, g, f, "fixed", 1e-2, 1e-2)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())


def test_multistage_updated_equals_dense_formula(tiny64_updated):
    c = tiny64_updated["gpt2"]
    g, f = hm.objectives(c)
    cfg = tfi.SolverConfig("dense_squared", damping=1e-3, curvature_iterations=0)
    res = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding="backbone",
                                    case="updated", pretrain_solver=cfg, finetune_solver=cfg, hessian_samples=None)
    expected, _ = dense_multistage(c, g, f, "updated", 1e-3, 1e-3)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_single_stage_default_equals_dense_formula(tiny64):
    c = tiny64
    _, f = hm.objectives(c)
    res = tfi.single_stage_influence(f, c.finetune_data, c.test_data)
    (xf, yf), (xt, yt) = c.arrays["ft"], c.arrays["test"]
    group = tfi.ParameterGroup.from_model(c.finetune)     # frozen backbone included
    H = h.explicit_hessian(f, xf, yf, group)
    expected = -h.one_at_a_time_gradients(f, xf, yf, group) @ _sq(
        H, h.loss_gradient(f, xt, yt, group), tfi.DEFAULT_FINETUNE_DAMPING)
    np.testing.assert_allclose(res.scores, expected, rtol=RTOL, atol=1e-8 * np.abs(expected).max())


def test_completion_log_probability_measurement():
    """log p(completion | prompt) of a causal LM equals a numpy log-softmax over the completion tokens
    only, and its influence equals the dense formula with that measurement."""
    c = hm.build("llama", dtype="float64", **TINY)
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
    np.testing.assert_allclose(res.scores, ref, rtol=RTOL, atol=1e-8 * np.abs(ref).max())


def test_causal_lm_examples_rejects_sequences_without_targets():
    with pytest.raises(ValueError, match="sequence 0 has no labelled position"):
        lm.causal_lm_examples(np.array([[3, 4, 0]]), np.array([[1, 0, 0]]))


# -- float32, default environment: EK-FAC, ghost norms, PRESENCE --------------------------------------
@pytest.fixture(scope="module", params=KINDS)
def hub32(request):
    return hm.build(request.param)


def test_ekfac_eigenvalues_are_the_exact_fisher_diagonal_incl_reversible_embeddings(hub32):
    from tests.test_kfac import per_example_block_matrices
    c = hub32
    g, _ = hm.objectives(c)
    group = tfi.ParameterGroup.from_model(c.pretrain)
    factors = kfac.fit_factors(g, c.pretrain_data, group, kind="ekfac", fisher="empirical")
    blocks, diagonal = kfac.kronecker_blocks(c.pretrain, group)
    kinds = {b.name: b.kind for b in blocks}
    if c.name == "gpt2":
        assert kinds["token_embedding"] == "tied"
    if c.name == "llama":
        assert kinds["token_embedding"] == "embedding" and kinds["token_embedding/reverse"] == "dense"
    attention = [n for n in kinds if "attention" in n and n.endswith("/query")]
    assert len(attention) == 2, kinds          # keras-hub's own attention classes are factored too
    xp, yp = c.arrays["pre"]
    x64 = xp
    for b in blocks:
        if b.name not in ("token_embedding", "token_embedding/reverse") and b is not blocks[2]:
            continue
        f = factors.blocks[b.name]
        Gs = per_example_block_matrices(g, b, x64, yp)
        ref = (np.mean([(G @ f["QS"]) ** 2 for G in Gs], axis=0) if b.kind == "embedding" else
               np.mean([(f["QA"].T @ G @ f["QS"]) ** 2 for G in Gs], axis=0))
        np.testing.assert_allclose(f["eig"], ref, rtol=2e-3, atol=1e-6 * np.abs(ref).max(), err_msg=b.name)


def test_multistage_ekfac_and_default_solvers_run_on_hub_models(hub32):
    c = hub32
    g, f = hm.objectives(c)
    ekfac = tfi.SolverConfig("ekfac", damping=1e-3)
    res = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding=c.backbone,
                                    pretrain_solver=ekfac, finetune_solver=ekfac)
    assert res.scores.shape == (24,) and np.all(np.isfinite(res.scores))
    assert res.solves["pretrain"]["method"] == res.solves["finetune"]["method"] == "ekfac"
    single = tfi.single_stage_influence(f, c.finetune_data, c.test_data, solver=ekfac)
    assert np.all(np.isfinite(single.scores))
    # these calls used to kill the process (oneDNN + pfor); "auto" picks by size and reports it
    default = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding=c.backbone)
    assert default.solves["pretrain"]["auto"]["chose"] == "cg_squared"     # 2,048 < p < 20,000
    assert default.solves["finetune"]["auto"]["chose"] == "dense_squared"  # the classifier head


def _one_at_a_time_sq_norms(obj, case, group):
    xp, yp = case.arrays["pre"]
    G = h.one_at_a_time_gradients(obj, xp, yp, group)
    return np.sum(G.astype(np.float64) ** 2, axis=1)


@pytest.mark.parametrize("layers", ["token_embedding", "all"])
def test_ghost_norm_self_influence_equals_one_at_a_time_gradient_norms(hub32, layers):
    c = hub32
    g, _ = hm.objectives(c)
    si_layers = ["backbone/token_embedding"] if layers == "token_embedding" else [c.backbone] + (
        ["lm_head"] if c.name == "bert" else [])
    group = tfi.tracin.layer_set(c.pretrain, si_layers)
    si = tfi.self_influence(g, c.pretrain_data, si_layers)
    ref = _one_at_a_time_sq_norms(g, c, group)
    np.testing.assert_allclose(si, ref, rtol=2e-4)
    per_example = tfi.self_influence(g, c.pretrain_data, si_layers, method="per_example")
    np.testing.assert_allclose(per_example, ref, rtol=2e-4)


def test_presence_microbatch_gradients_equal_one_at_a_time(hub32):
    from tf_influence.presence import microbatch_gradients
    c = hub32
    g, _ = hm.objectives(c)
    x, y = next(iter(c.pretrain_data))
    variables = tfi.ParameterGroup.from_model(c.pretrain).variables
    group = tfi.ParameterGroup("all", tuple(variables))
    losses, grads = microbatch_gradients(g, x, y, variables, num_microbatches=4)
    for i in range(4):
        xs = tf.nest.map_structure(lambda t: t[2 * i:2 * i + 2], x)
        ref = h.loss_gradient(g, xs, y[2 * i:2 * i + 2], group) / 2.0
        got = group.flatten([t[i] for t in grads]).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_presence_model_trains_a_hub_lm():
    c = hm.build("gpt2", freeze=False)
    model = tfi.presence.PresenceModel(c.pretrain, num_microbatches=2, si_layers=["token_embedding"], tau=-1.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=lm.CausalLMLoss())
    before = c.backbone.get_layer("token_embedding").embeddings.numpy().copy()
    hist = model.fit(c.pretrain_data, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    assert not np.allclose(before, c.backbone.get_layer("token_embedding").embeddings.numpy())
    w = model.presence_last_weights.numpy()
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)


# -- groups, names, frozen layers, save / load ------------------------------------------------------------
def test_frozen_and_unfrozen_backbone_give_the_same_groups_and_scores():
    c = hm.build("bert")
    g, f = hm.objectives(c)
    frozen = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding=c.backbone,
                                       hessian_samples=None)
    c.backbone.trainable = True
    W_names = tfi.group_from_layers(c.finetune, "backbone").variable_names
    unfrozen = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding="backbone",
                                         hessian_samples=None)
    c.backbone.trainable = False
    assert tfi.group_from_layers(c.finetune, c.backbone).variable_names == W_names
    np.testing.assert_allclose(frozen.scores, unfrozen.scores, rtol=1e-5, atol=1e-7 * np.abs(unfrozen.scores).max())


def test_layer_references_objects_names_and_paths():
    c = hm.build("gpt2")
    emb = c.backbone.get_layer("token_embedding")
    by_object = tfi.group_from_layers(c.pretrain, emb)
    for ref in ("token_embedding", "backbone/token_embedding", "gpt2_causal_lm/backbone/token_embedding"
                if False else "backbone/token_embedding"):
        assert tfi.group_from_layers(c.pretrain, ref).variable_names == by_object.variable_names
    assert by_object.variable_names == ["token_embedding/embeddings"]
    with pytest.raises(tfi.ParameterGroupError, match="no layer named 'backbone/nope'"):
        tfi.group_from_layers(c.pretrain, "backbone/nope")
    other = keras.layers.Dense(2)
    other.build((None, 3))
    with pytest.raises(tfi.ParameterGroupError, match="is not part of model"):
        tfi.group_from_layers(c.pretrain, other)


def test_saved_and_loaded_hub_lm_scores_the_same(tmp_path):
    c = hm.build("gpt2", freeze=False)
    g, _ = hm.objectives(c)
    path = str(tmp_path / "lm.keras")
    c.pretrain.save(path)
    loaded = keras.models.load_model(path)
    g2 = tfi.Objective(loaded, lm.CausalLMLoss())
    a = tfi.self_influence(g, c.pretrain_data, ["token_embedding"])
    b = tfi.self_influence(g2, c.pretrain_data, ["token_embedding"])
    np.testing.assert_allclose(a, b, rtol=1e-6)
    spec = tfi.ParameterGroup.from_model(c.pretrain).spec(c.pretrain)
    assert tfi.ParameterGroup.from_spec(loaded, spec).variable_names == [v for _, v, _ in spec.variables]

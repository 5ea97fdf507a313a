"""keras-hub models users bring (BERT, GPT-2 with its tied ReversibleEmbedding, Llama) in float32, in
the default environment (oneDNN on), against independent computations: EK-FAC's corrected eigenvalues
(tied and untied ReversibleEmbedding blocks included) equal to the exact Fisher diagonal in the block's
eigenbasis; ghost-norm self-influence equal to one-at-a-time gradient norms; PRESENCE's microbatch
gradients equal to one-at-a-time microbatch gradients; frozen backbones, layer objects and paths,
save / load. Second derivatives and the dense influence formulas: test_hub_derivatives.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h
from tests import hub_models as hm
from tests.hub_models import TINY
from tf_influence import kfac, lm

pytest.importorskip("keras_hub")


# -- float32, default environment: EK-FAC, ghost norms, PRESENCE --------------------------------------
# BERT's untied Dense(vocab) head and its LayerNorms / position embeddings are checked in make test by
# test_large_vocab (the head's block, exact in its basis) and here through GPT-2 (captured norms and
# positions); BERT here runs in make test-slow
@pytest.fixture(scope="module", params=hm.kinds(slow=("bert",)))
def hub32(request):
    return hm.build(request.param, n_pre=16)


def test_ekfac_eigenvalues_are_the_exact_fisher_diagonal_incl_reversible_embeddings(hub32):
    from tests.tf_influence.test_kfac import per_example_block_matrices
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
    # the diagonal variables (norms, keras-hub's PositionEmbedding, RMS scales) are the exact mean
    # squared per-example gradient; position embeddings and LayerNorms come from captured records
    norms, rest = kfac.norm_blocks(c.pretrain, diagonal)
    if c.name in ("gpt2", "bert"):
        assert any(nb.kind == "position" for nb in norms)
        assert not any("position_embedding" in v.path for v in rest)
    dgroup = tfi.ParameterGroup("diagonal", tuple(diagonal))
    G2 = np.mean(h.one_at_a_time_gradients(g, xp, yp, dgroup).astype(np.float64) ** 2, axis=0)
    got = np.concatenate([factors.diagonal[v.path].ravel() for v in diagonal])
    np.testing.assert_allclose(got, G2, rtol=2e-3, atol=1e-6 * G2.max())


@pytest.mark.slow   # make test-slow: Llama's float32 EK-FAC fit (with the fallback) runs in make test above
@pytest.mark.parametrize("kind", ["llama"])
def test_multistage_and_single_stage_ekfac_run_on_float32_hub_models(kind):
    """These calls used to kill the process (oneDNN + pfor over the attention's einsums): multi-stage and
    single-stage influence with EK-FAC on a float32 Llama, in the default environment. Its RMS-norm scales
    come from captured records (``kfac.blocks.RMS_NORM_CLASSES``), like GPT-2's and BERT's LayerNorms and
    position embeddings, so no keras-hub kind reaches the vectorised per-example fallback any more (a layer
    of a kind the library does not know still does: ``test_kfac`` covers it)."""
    c = hm.build(kind, **TINY)
    _, rest = kfac.norm_blocks(c.pretrain, kfac.kronecker_blocks(c.pretrain,
                                                                 tfi.ParameterGroup.from_model(c.pretrain))[1])
    assert not rest, [v.path for v in rest]
    g, f = hm.objectives(c)
    ekfac = tfi.SolverConfig("ekfac", damping=1e-3, curvature_iterations=0)
    res = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding=c.backbone,
                                    args=tfi.InfluenceArgs(pretrain_solver=ekfac, finetune_solver=ekfac))
    assert res.scores.shape == (TINY["n_pre"],) and np.all(np.isfinite(res.scores))
    assert res.solves["pretrain"]["method"] == res.solves["finetune"]["method"] == "ekfac"
    single = tfi.single_stage_influence(f, c.finetune_data, c.test_data, solver=ekfac)
    assert np.all(np.isfinite(single.scores))


def test_auto_solver_choice_by_size():
    from tf_influence.solvers import auto_choice
    c = hm.build("gpt2", **TINY)
    g, _ = hm.objectives(c)
    op = tfi.HessianOperator(g, c.pretrain_data, tfi.ParameterGroup.from_model(c.pretrain))
    assert auto_choice(op)[0] == "dense_squared"                        # p ≤ 2,048
    assert auto_choice(op, dense_max=10, kronecker_min=10 ** 9)[0] == "cg_squared"
    assert auto_choice(op, dense_max=10, kronecker_min=20)[0] == "ekfac"
    assert auto_choice(op, dense_max=10)[0] == "ekfac"                  # the default: EK-FAC above dense_max
    dense_op = tfi.DenseOperator(np.eye(30_000 // 1000))
    assert auto_choice(dense_op, dense_max=10, kronecker_min=20)[0] == "cg_squared"   # no model block
    res = tfi.solve(op, tf.ones([op.shape[0]]), tfi.SolverConfig("auto", damping=1e-2, curvature_iterations=0,
                                                                 auto=tfi.AutoOptions(dense_max=10, kronecker_min=20)))
    assert res.method == "ekfac" and res.extra["auto"]["chose"] == "ekfac"


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
    c = hm.build("bert", dtype="float64", **TINY)
    g, f = hm.objectives(c)
    frozen = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding=c.backbone,
                                       args=tfi.InfluenceArgs(hessian_samples=None))
    c.backbone.trainable = True
    W_names = tfi.group_from_layers(c.finetune, "backbone").variable_names
    unfrozen = tfi.multi_stage_influence(g, c.pretrain_data, f, c.finetune_data, c.test_data, embedding="backbone",
                                         args=tfi.InfluenceArgs(hessian_samples=None))
    c.backbone.trainable = False
    assert tfi.group_from_layers(c.finetune, c.backbone).variable_names == W_names
    np.testing.assert_allclose(frozen.scores, unfrozen.scores, rtol=1e-9, atol=1e-12 * np.abs(unfrozen.scores).max())


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

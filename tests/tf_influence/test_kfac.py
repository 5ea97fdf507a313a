"""K-FAC / EK-FAC (tf_influence.kfac) against exact computations: the corrected eigenvalues are the
exact Fisher diagonal in the Kronecker eigenbasis (Dense, EinsumDense attention projections,
Embedding); K-FAC is exact on one example; the true Fisher's label sampling has the right
covariance; the solver plugs into single- and multi-stage influence; factors save and load."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import tf_influence as tfi
from tf_influence import kfac
from tests import helpers as h


def ds(x, y, batch=7):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def per_example_block_matrices(obj, block, x, y):
    """``G_n`` of every example from one-at-a-time gradients (independent of the captured activations)."""
    bg = tfi.ParameterGroup("block", tuple(block.variables))
    return [block.to_matrix(bg.unflatten(tf.constant(g))).numpy() for g in h.one_at_a_time_gradients(obj, x, y, bg)]


def conv1d_lm(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,), dtype="int32")
    z = keras.layers.Embedding(7, 3, dtype="float64", name="emb")(inp)
    z = keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="relu", dtype="float64", name="c1")(z)
    z = keras.layers.Conv1D(3, 2, strides=2, dtype="float64", name="c2")(z)
    return keras.Model(inp, keras.layers.Dense(5, dtype="float64", name="out")(z))


def two_block_lm(seed=0):
    """Two attention blocks: their sub-layers share names (``query``, ``key``, …), not paths."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,), dtype="int32")
    z = keras.layers.Embedding(9, 4, dtype="float64", name="emb")(inp)
    for i in range(2):
        a = keras.layers.MultiHeadAttention(2, key_dim=2, dtype="float64", name=f"attention{i}")(
            z, z, use_causal_mask=True)
        z = keras.layers.LayerNormalization(dtype="float64", name=f"norm{i}")(z + a)
    return keras.Model(inp, keras.layers.Dense(6, dtype="float64", name="out")(z))


@pytest.mark.parametrize("which", ["mlp", "cnn", "conv1d", "transformer", "two_blocks"])
def test_ekfac_eigenvalues_are_the_exact_fisher_diagonal_in_the_kronecker_basis(which):
    rng = np.random.default_rng(0)
    if which == "mlp":
        model = h.mlp(l2=0.01)
        x, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    elif which == "cnn":
        model = h.small_cnn()
        x, y = rng.normal(size=(12, 6, 6, 1)), rng.integers(0, 3, 12)
    elif which == "conv1d":  # per-position labels: a sequence loss averaged per example
        model = conv1d_lm()
        x, y = rng.integers(0, 7, size=(10, 6)).astype(np.int32), rng.integers(0, 5, size=(10, 3))
    elif which == "two_blocks":
        model = two_block_lm()
        x, y = rng.integers(0, 9, size=(8, 5)).astype(np.int32), rng.integers(0, 6, size=(8, 5))
    else:
        model, _, _ = h.two_stage_transformers(dict_inputs=True)
        x, y = h.token_data(14, n_classes=3, seed=1, with_mask=True)
    obj = tfi.Objective(model, h.sce())
    group = tfi.ParameterGroup.from_model(model)
    factors = kfac.fit_factors(obj, ds(x, y), group, kind="ekfac", fisher="empirical")
    blocks, _ = kfac.kronecker_blocks(model, group)
    kinds = {b.kind for b in blocks}
    assert kinds == {"mlp": {"dense"}, "cnn": {"conv", "dense"}, "conv1d": {"embedding", "conv", "dense"},
                     "transformer": {"dense", "einsum", "embedding"},
                     "two_blocks": {"dense", "einsum", "embedding"}}[which]
    assert len(factors.blocks) == len(blocks)  # one factor per layer, also where layer names repeat
    for b in blocks:
        f = factors.blocks[b.name]
        Gs = per_example_block_matrices(obj, b, x, y)
        if b.kind == "embedding":
            ref = np.mean([(G @ f["QS"]) ** 2 for G in Gs], axis=0)
        else:
            ref = np.mean([(f["QA"].T @ G @ f["QS"]) ** 2 for G in Gs], axis=0)
        np.testing.assert_allclose(f["eig"], ref, rtol=1e-9, atol=1e-14 * np.abs(ref).max())
    if which == "transformer":  # LayerNormalization has no Kronecker block: diagonal, and reported
        assert factors.summary()["diagonal_variables"] == ["norm/beta", "norm/gamma"]
        # its diagonal (from the captured input and output gradient) = the exact Fisher diagonal
        norm = tfi.group_from_layers(model, ["norm"])
        G = h.one_at_a_time_gradients(obj, x, y, norm)
        for v, part in zip(norm.variables, np.split(G, np.cumsum(norm.sizes)[:-1], axis=1)):
            np.testing.assert_allclose(factors.diagonal[v.path], np.mean(part ** 2, axis=0), rtol=1e-9)


def test_covariance_max_examples_fits_the_bases_on_the_first_examples_and_corrects_on_all():
    """``covariance_max_examples=8``: the eigenbases are those of a fit on the first 8 examples (the batch of 7
    and one example of the next, cut), and the corrected eigenvalues are the exact second moments of all 20
    examples' per-example gradients (one-at-a-time, not captured) in those bases — not the first 8's."""
    rng = np.random.default_rng(0)
    model = h.mlp(l2=0.01)
    x, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    obj = tfi.Objective(model, h.sce())
    group = tfi.ParameterGroup.from_model(model)
    fit = lambda **kw: kfac.fit_factors(obj, ds(x, y), group, kind="ekfac", fisher="empirical", **kw)  # noqa: E731
    capped, first, full = fit(covariance_max_examples=8), fit(max_examples=8), fit()
    blocks, _ = kfac.kronecker_blocks(model, group)
    for b in blocks:
        f = capped.blocks[b.name]
        for side in ("QA", "QS"):
            np.testing.assert_array_equal(f[side], first.blocks[b.name][side])
        assert not np.allclose(np.abs(f["QA"]), np.abs(full.blocks[b.name]["QA"]), atol=1e-3)   # the cap acted
        Gs = per_example_block_matrices(obj, b, x, y)
        ref = np.mean([(f["QA"].T @ G @ f["QS"]) ** 2 for G in Gs], axis=0)                 # all 20 examples
        np.testing.assert_allclose(f["eig"], ref, rtol=1e-9, atol=1e-14 * np.abs(ref).max())
        first8 = np.mean([(f["QA"].T @ G @ f["QS"]) ** 2 for G in Gs[:8]], axis=0)
        assert not np.allclose(f["eig"], first8, rtol=1e-3)
    # a cap at or above the data changes nothing; with max_examples the smaller cap rules the covariances
    same = fit(covariance_max_examples=50)
    for b in blocks:
        np.testing.assert_array_equal(same.blocks[b.name]["eig"], full.blocks[b.name]["eig"])
    both = fit(max_examples=12, covariance_max_examples=8)
    np.testing.assert_array_equal(both.blocks[blocks[0].name]["QA"], first.blocks[blocks[0].name]["QA"])
    with pytest.raises(ValueError, match="covariance_max_examples must be a positive"):
        fit(covariance_max_examples=0)
    with pytest.raises(ValueError, match="applies to kind='ekfac'"):
        kfac.fit_factors(obj, ds(x, y), group, kind="kfac", covariance_max_examples=8)
    # the configurations that reach it: FactorArgs (Analyzer.fit_factors) and the EK-FAC solver's options
    assert tfi.FactorArgs.from_json(tfi.FactorArgs(covariance_max_examples=8).to_json()).covariance_max_examples == 8
    with pytest.raises(ValueError, match="applies to kind='ekfac'"):
        tfi.FactorArgs(kind="kfac", covariance_max_examples=8)
    cfg = tfi.SolverConfig("ekfac", kronecker=tfi.KroneckerOptions(covariance_max_examples=8))
    assert cfg.kwargs()["covariance_max_examples"] == 8
    assert tfi.SolverConfig.from_json(cfg.to_json()).kronecker.covariance_max_examples == 8


class _Scale(keras.layers.Layer):
    """``x · w``, a learned elementwise scale of a kind the library does not know: the per-example fallback."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w


def test_rms_norm_scales_are_captured_and_unknown_layers_take_the_fallback():
    """The Fisher diagonal of a keras-hub RMS norm's scale (captured input and output gradient) and of an
    unknown layer's weight (vectorised per-example gradients) both equal the mean squared one-at-a-time
    gradient, in float64."""
    pytest.importorskip("keras_hub")
    from keras_hub.src.models.gemma.rms_normalization import RMSNormalization
    from keras_hub.src.models.llama.llama_layernorm import LlamaLayerNorm
    keras.utils.set_random_seed(3)
    inp = keras.Input((4, 6), dtype="float64")
    hdn = keras.layers.Dense(6, dtype="float64", name="d1")(inp)
    hdn = _Scale(dtype="float64", name="scale")(hdn)
    hdn = LlamaLayerNorm(dtype="float64", name="rms")(hdn)
    hdn = keras.layers.Dense(6, dtype="float64", name="d2")(hdn)
    hdn = RMSNormalization(dtype="float64", name="gemma_rms")(hdn)      # x̂ · (1 + scale)
    out = keras.layers.Dense(3, dtype="float64", name="out")(keras.layers.GlobalAveragePooling1D()(hdn))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(4)
    model.get_layer("rms").scale.assign(1.0 + 0.3 * rng.standard_normal(6))
    model.get_layer("gemma_rms").scale.assign(0.3 * rng.standard_normal(6))
    x, y = rng.normal(size=(10, 4, 6)), rng.integers(0, 3, 10)
    obj, group = tfi.Objective(model, h.sce()), tfi.ParameterGroup.from_model(model)
    _, diagonal = kfac.kronecker_blocks(model, group)
    norms, rest = kfac.norm_blocks(model, diagonal)
    assert [type(b).__name__ for b in norms] == ["_RMSNormBlock"] * 2 and [v.path for v in rest] == ["scale/w"]
    factors = kfac.fit_factors(obj, ds(x, y, 4), group, fisher="empirical")
    dgroup = tfi.ParameterGroup("diagonal", tuple(diagonal))
    G2 = np.mean(h.one_at_a_time_gradients(obj, x, y, dgroup) ** 2, axis=0)
    got = np.concatenate([factors.diagonal[v.path].ravel() for v in diagonal])
    # the RMS norm computes in float32 whatever the model's dtype (as keras-hub's does): float32 agreement
    np.testing.assert_allclose(got, G2, rtol=2e-6, atol=1e-14)


def test_kfac_is_exact_on_one_example():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(3, dtype="float64", name="out")])
    obj = tfi.Objective(model, h.sce())
    group = tfi.ParameterGroup.from_model(model)
    x, y = np.random.default_rng(0).normal(size=(1, 4)), np.array([2])
    g = h.loss_gradient(obj, x, y, group)
    F = np.outer(g, g)  # the empirical Fisher of one example = its GGN-free curvature: vec(G) vec(G)ᵀ
    v = np.random.default_rng(1).normal(size=group.size)
    for kind in ("kfac", "ekfac"):
        factors = kfac.fit_factors(obj, ds(x, y), group, kind=kind, fisher="empirical")
        inv = kfac.KFACInverse(factors, model, group, damping=0.3)
        np.testing.assert_allclose(inv(v).numpy(), np.linalg.solve(F + 0.3 * np.eye(group.size), v), rtol=1e-10)
        # the spectrum the diagnostics read is that of F (rank one: 0 and |g|²), without the damping
        np.testing.assert_allclose(inv.spectrum(), (0.0, g @ g), atol=1e-10)


def test_factors_fitted_in_microbatches_equal_the_whole_batches(logreg, monkeypatch):
    """A batch whose products exceed the per-step limit is split into microbatches: the fitted (E)K-FAC
    factors are sums over examples, so they equal the whole-batch fit (the empirical Fisher: no sampling);
    the plan sizes the step by the microbatch and says so."""
    model, x, y = logreg
    obj, group = tfi.Objective(model, h.sce()), tfi.ParameterGroup.from_model(model)
    whole = kfac.fit_factors(obj, ds(x, y, 40), group, fisher="empirical")
    stats = kfac.FactorStatistics(obj, group)
    one = max(tfi.memory._factor_batch_bytes(stats, 1, 1))          # linear in the batch for a small layer
    assert tfi.memory.factor_microbatch(stats, (40, 1)) == 40          # fits: the batch as it is
    monkeypatch.setattr(kfac.statistics, "FACTOR_BATCH_BYTES", 7 * one)   # about 7 examples' products
    # the fewest microbatches of ≤ 7 are 6 (of 7, …, 5); equal ones of 5 (a divisor of 40) are preferred
    assert tfi.memory.factor_microbatch(stats, (40, 1)) == 5
    assert tfi.memory.factor_microbatch(stats, (41, 1)) == 7             # 41 is prime: 6 of 7 and one of 6
    plan = tfi.memory.factor_plan(stats, ds(x, y, 40))
    item = next(i for i in plan.items if i.name == "per-batch products (first pass)")
    assert "microbatches of 5" in item.what and item.nbytes == tfi.memory._factor_batch_bytes(stats, 5, 1)[0]
    for split in (None, 3):
        got = kfac.fit_factors(obj, ds(x, y, 40), group, fisher="empirical", microbatch=split)
        assert got.num_examples == whole.num_examples == 120
        for name, f in whole.blocks.items():
            for key in ("QA", "QS", "eig"):
                a, b = np.abs(f[key]), np.abs(got.blocks[name][key])   # eigenvectors up to sign
                np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12, err_msg=f"{split} {name}/{key}")
    with pytest.raises(ValueError, match="microbatch"):
        kfac.fit_factors(obj, ds(x, y, 40), group, microbatch=0)


def test_inverse_applied_a_column_at_a_time_in_place_is_the_dense_inverse(logreg, monkeypatch):
    """The inverse transforms one host copy of the columns in place, a few columns per block at a time: with
    one column per chunk, many columns give the explicit dense inverse column by column, and the caller's
    array is left as it was."""
    model, x, y = logreg
    obj, group = tfi.Objective(model, h.sce()), tfi.ParameterGroup.from_model(model)
    inv = kfac.KFACInverse(kfac.fit_factors(obj, ds(x, y, 40), group), model, group, damping=1e-2)
    dense = np.linalg.inv(inv(tf.eye(group.size, dtype=tf.float64)).numpy())   # the matrix it inverts
    V = np.random.default_rng(2).standard_normal((group.size, 5))
    before = V.copy()
    monkeypatch.setattr(kfac.inverse, "APPLY_CHUNK_BYTES", 1)              # one column per chunk
    got = inv(V).numpy()
    np.testing.assert_array_equal(V, before)
    np.testing.assert_allclose(got, np.linalg.solve(dense, V), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(inv(tf.constant(V[:, 3])).numpy(), got[:, 3], rtol=1e-12)


def test_a_constant_extra_diagonal_is_added_to_the_eigenvalues(logreg):
    """Case 2's 2α diagonal holds one number on every block: the inverse adds it to the corrected eigenvalues
    instead of projecting it into the bases. The matrix is the one the projection gives (a diagonal one entry of
    which differs by 1e-9 takes that path) and the one a damping of that size gives."""
    model, x, y = logreg
    obj, group = tfi.Objective(model, h.sce()), tfi.ParameterGroup.from_model(model)
    f = kfac.fit_factors(obj, ds(x, y, 40), group)
    c = 0.37
    d = np.full(group.size, c)
    const = kfac.KFACInverse(f, model, group, damping=1e-2, extra_diagonal=tf.constant(d),
                             include_regularizers=False)
    d[0] += 1e-9
    projected = kfac.KFACInverse(f, model, group, damping=1e-2, extra_diagonal=tf.constant(d),
                                 include_regularizers=False)
    as_damping = kfac.KFACInverse(f, model, group, damping=1e-2 + c, include_regularizers=False)
    eye = tf.eye(group.size, dtype=tf.float64)
    got = const(eye).numpy()
    np.testing.assert_allclose(got, as_damping(eye).numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got, projected(eye).numpy(), rtol=1e-7, atol=1e-8)   # the 1e-9 moves it by less
    assert kfac.inverse._one_value([0.5, np.full((2, 3), 0.5)]) == 0.5
    assert kfac.inverse._one_value([0.5, np.array([0.5, 0.25])]) is None and kfac.inverse._one_value([0.0, 1.0]) is None


def test_ekfac_solve_diagnoses_the_spectrum_of_the_matrix_it_inverts(logreg):
    """The curvature an EK-FAC solve reports (no Lanczos) is the extreme eigenvalues of the matrix it
    inverts — read back densely as ``inverse(I)⁻¹`` — with the L2 regulariser's diagonal included."""
    model, x, y = logreg
    obj, group = tfi.Objective(model, h.sce()), tfi.ParameterGroup.from_model(model)
    op = tfi.HessianOperator(obj, ds(x, y, 40), group)
    res = tfi.solve(op, tf.ones([group.size], tf.float64), tfi.SolverConfig("ekfac", damping=1e-3))
    inv = kfac.KFACInverse(kfac.fit_factors(obj, ds(x, y, 40), group), model, group)
    M = np.linalg.inv(inv(tf.eye(group.size, dtype=tf.float64)).numpy())
    eig = np.linalg.eigvalsh(0.5 * (M + M.T))
    c = res.extra["curvature"]
    assert c["source"] == "ekfac" and c["lanczos_steps"] == 0
    np.testing.assert_allclose([c["lambda_min"], c["lambda_max"]], [eig[0], eig[-1]], rtol=1e-8)
    assert eig[0] >= 2e-2 - 1e-12  # the regulariser's 2·1e-2 is in the diagonal
    # asked for, Lanczos runs on the Hessian itself instead
    lz = tfi.solve(op, tf.ones([group.size], tf.float64), tfi.SolverConfig("ekfac", damping=1e-3,
                                                                             curvature_iterations=4))
    assert lz.extra["curvature"]["source"] == "lanczos" and lz.extra["curvature"]["lanczos_steps"] == 4


def test_true_fisher_samples_labels_from_the_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(4, use_bias=False, dtype="float64", name="out")])
    obj = tfi.Objective(model, h.sce())
    x = np.tile(np.random.default_rng(0).normal(size=(1, 3)), (4000, 1))
    factors = kfac.fit_factors(obj, ds(x, np.zeros(4000, np.int64), 500), tfi.ParameterGroup.from_model(model),
                               kind="kfac", fisher="true")
    p = tf.nn.softmax(model(x[:1]))[0].numpy()
    # every example is the same x, so A = x xᵀ (one non-zero eigenvalue |x|²) and the K-FAC eigenvalues
    # in that row are |x|² · eig(S); S = E_ŷ[g gᵀ] with g = softmax − onehot(ŷ) is diag(p) − p pᵀ,
    # estimated here from 4,000 sampled labels
    row = factors.blocks["out"]["eig"][-1] / float(x[0] @ x[0])  # eigh: the largest A eigenvalue last
    expected = np.linalg.eigvalsh(np.diag(p) - np.outer(p, p))
    np.testing.assert_allclose(np.sort(row), expected, atol=0.05 * expected.max())
    # the observed labels (all 0) would give a different, rank-one S: the sampling is what is measured
    emp = kfac.fit_factors(obj, ds(x[:500], np.zeros(500, np.int64)), tfi.ParameterGroup.from_model(model),
                           kind="kfac", fisher="empirical").blocks["out"]["eig"][-1] / float(x[0] @ x[0])
    assert np.sum(np.sort(emp) > 1e-9) == 1 and np.sum(np.sort(row) > 1e-3) == 3
    with pytest.raises(ValueError, match="fisher='empirical'"):
        kfac.fit_factors(tfi.Objective(model, "mse"), ds(x[:8], np.zeros((8, 4))), tfi.ParameterGroup.from_model(model),
                         fisher="true")


@pytest.fixture(scope="module")
def logreg():
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,), dtype="float64"),
                              keras.layers.Dense(3, dtype="float64", kernel_regularizer=keras.regularizers.L2(1e-2),
                                                 bias_regularizer=keras.regularizers.L2(1e-2), name="out")])
    x = rng.normal(size=(120, 6))
    y = np.argmax(x[:, :3] + 0.5 * rng.normal(size=(120, 3)), axis=1)
    h.train(model, h.sce(), x, y, steps=400)
    return model, x, y


def test_solver_plugs_into_single_stage_influence(logreg, tmp_path):
    model, x, y = logreg
    obj = tfi.Objective(model, h.sce())
    test = ds(x[:9], y[:9])
    exact = tfi.single_stage_influence(obj, ds(x, y, 40), test, solver=tfi.SolverConfig("dense"), test_target="each")
    res = tfi.single_stage_influence(obj, ds(x, y, 40), test, solver=tfi.SolverConfig("ekfac", damping=0.0),
                                     test_target="each")
    assert res.scores.shape == exact.scores.shape == (120, 9)
    r = stats.pearsonr(res.scores.ravel(), exact.scores.ravel())[0]
    ident = tfi.single_stage_influence(obj, ds(x, y, 40), test, solver=tfi.SolverConfig("identity"),
                                       test_target="each")
    r_ident = stats.pearsonr(ident.scores.ravel(), exact.scores.ravel())[0]
    assert r > 0.95 and r > r_ident
    assert res.solves["hessian"]["method"] == "ekfac" and res.solves["hessian"]["kronecker_blocks"] == {"out": [7, 3]}
    # the true Fisher recognises the loss however it is spelled: class, wrapped function (with from_logits)
    from keras.src.losses.losses import LossFunctionWrapper  # what Keras wraps function losses in
    wrapped = LossFunctionWrapper(keras.losses.sparse_categorical_crossentropy, from_logits=True)
    f_wrapped = kfac.fit_factors(tfi.Objective(model, wrapped), ds(x, y, 40), tfi.ParameterGroup.from_model(model))
    f_direct = kfac.fit_factors(obj, ds(x, y, 40), tfi.ParameterGroup.from_model(model))
    np.testing.assert_allclose(f_wrapped.blocks["out"]["eig"], f_direct.blocks["out"]["eig"], rtol=1e-10)
    # factors saved and reloaded give the same solve
    group = tfi.ParameterGroup.from_model(model)
    factors = kfac.fit_factors(obj, ds(x, y, 40), group)
    factors.save(str(tmp_path / "f"))
    again = tfi.single_stage_influence(obj, ds(x, y, 40), test, solver=tfi.SolverConfig(
        "ekfac", damping=0.0, kronecker=tfi.KroneckerOptions(factors=str(tmp_path / "f"))), test_target="each")
    direct = tfi.single_stage_influence(obj, ds(x, y, 40), test, solver=tfi.SolverConfig(
        "ekfac", damping=0.0, kronecker=tfi.KroneckerOptions(factors=factors)), test_target="each")
    np.testing.assert_allclose(again.scores, direct.scores, rtol=1e-12)
    with pytest.raises(FileNotFoundError, match="no K-FAC factors"):
        kfac.KFACFactors.load(str(tmp_path))


def test_bad_input(logreg):
    model, x, y = logreg
    obj = tfi.Objective(model, h.sce())
    group = tfi.ParameterGroup.from_model(model)
    kernel = tfi.ParameterGroup("kernel", (model.trainable_variables[0],))
    mixed = tfi.HessianOperator(obj, ds(x, y), group, kernel)
    with pytest.raises(ValueError, match="needs a square Hessian block"):
        tfi.solve(mixed, np.ones(kernel.size), tfi.SolverConfig("ekfac"))
    with pytest.raises(ValueError, match="square Hessian block"):
        tfi.solve(tfi.DenseOperator(np.eye(3)), np.ones(3), tfi.SolverConfig("kfac"))
    factors = kfac.fit_factors(obj, ds(x, y), group)
    with pytest.raises(tfi.ParameterGroupError, match="fitted for another parameter group"):
        kfac.KFACInverse(factors, model, kernel)
    with pytest.raises(ValueError, match="kind must be"):
        kfac.fit_factors(obj, ds(x, y), group, kind="shampoo")
    with pytest.raises(ValueError, match="max_examples must be a positive"):
        kfac.fit_factors(obj, ds(x, y), group, max_examples=0)


def test_max_examples_fits_on_the_first_examples(logreg):
    """The cap (a batch cut in the middle) equals fitting on exactly those examples; the solver passes it on."""
    model, x, y = logreg
    obj = tfi.Objective(model, h.sce())
    group = tfi.ParameterGroup.from_model(model)
    capped = kfac.fit_factors(obj, ds(x, y, 7), group, fisher="empirical", max_examples=17)
    first = kfac.fit_factors(obj, ds(x[:17], y[:17], 5), group, fisher="empirical")
    assert capped.num_examples == 17
    for name, blk in first.blocks.items():
        np.testing.assert_allclose(capped.blocks[name]["eig"], blk["eig"], rtol=1e-10, atol=1e-12 * blk["eig"].max())
    op = tfi.HessianOperator(obj, ds(x, y, 7), group)
    res = tfi.solve(op, np.ones(group.size),
                    tfi.SolverConfig("ekfac", kronecker=tfi.KroneckerOptions(fisher="empirical", max_examples=17)))
    assert res.extra["num_examples"] == 17
    with pytest.warns(DeprecationWarning, match="options=.* is deprecated"):   # the 0.2 spelling still works
        old = tfi.SolverConfig("ekfac", options={"fisher": "empirical", "max_examples": 17})
    assert old == tfi.SolverConfig("ekfac", kronecker=tfi.KroneckerOptions(fisher="empirical", max_examples=17))


def test_both_multi_stage_chains_take_ekfac():
    """Case 1 with EK-FAC on both inverses equals Algorithm 1 composed by hand from fitted factors:
    v_W = b_W − F_WΘ F̂_ΘΘ⁻¹ b_Θ (mixed block exact), s = −Ĝ⁻¹ [v_W, 0], I(z) = ∇g(z)·s."""
    rng = np.random.default_rng(0)
    pre, ft, emb = h.two_stage_mlps()
    xp, yp = rng.normal(size=(24, 5)), rng.integers(0, 3, 24)
    xf, yf = rng.normal(size=(16, 5)), rng.integers(0, 2, 16)
    xt, yt = rng.normal(size=(3, 5)), rng.integers(0, 2, 3)
    h.train(pre, h.sce(), xp, yp, steps=80)
    emb.trainable = False
    h.train(ft, h.sce(), xf, yf, steps=80)
    emb.trainable = True
    pre_obj, ft_obj = tfi.Objective(pre, h.sce()), tfi.Objective(ft, h.sce())
    cfg = tfi.SolverConfig("ekfac", damping=1e-3)
    res = tfi.multi_stage_influence(pre_obj, ds(xp, yp, 16), ft_obj, ds(xf, yf, 16), ds(xt, yt),
                                    embedding=["embedding"],
                                    args=tfi.InfluenceArgs(hessian_samples=None, pretrain_solver=cfg,
                                                           finetune_solver=cfg, test_target="each"))
    assert res.solves["pretrain"]["method"] == res.solves["finetune"]["method"] == "ekfac"
    W_pre, W_ft = tfi.group_from_layers(pre, ["embedding"]), tfi.group_from_layers(ft, ["embedding"])
    U, T = tfi.complement_group(pre, W_pre), tfi.complement_group(ft, W_ft)
    WU = tfi.concat_groups("WU", W_pre, U)
    G_inv = kfac.KFACInverse(kfac.fit_factors(pre_obj, ds(xp, yp, 16), WU), pre, WU, damping=1e-3)
    F_inv = kfac.KFACInverse(kfac.fit_factors(ft_obj, ds(xf, yf, 16), T), ft, T, damping=1e-3)
    H_WT = h.explicit_hessian(ft_obj, xf, yf, W_ft, T)
    G = h.one_at_a_time_gradients(pre_obj, xp, yp, WU)
    for j in range(len(yt)):
        b_T = h.loss_gradient(ft_obj, xt[j:j + 1], yt[j:j + 1], T)
        b_W = h.loss_gradient(ft_obj, xt[j:j + 1], yt[j:j + 1], W_ft)
        v = b_W - H_WT @ F_inv(b_T).numpy()
        s = -G_inv(np.r_[v, np.zeros(U.size)]).numpy()
        np.testing.assert_allclose(res.scores[:, j], G @ s, rtol=1e-6, atol=1e-10 * np.abs(G @ s).max())
    # solver "auto" above dense_max: EK-FAC on the pretraining Hessian, never on the case-1 head (its
    # inverse feeds the near-cancellation of v_W): cg_squared there, with the reason recorded; an explicit
    # kronecker_min still puts EK-FAC there
    auto = tfi.SolverConfig("auto", damping=1e-3, curvature_iterations=0, auto=tfi.AutoOptions(dense_max=4))
    res = tfi.multi_stage_influence(pre_obj, ds(xp, yp, 16), ft_obj, ds(xf, yf, 16), ds(xt, yt),
                                    embedding=["embedding"],
                                    args=tfi.InfluenceArgs(hessian_samples=None, pretrain_solver=auto,
                                                           finetune_solver=auto))
    assert res.solves["pretrain"]["auto"]["chose"] == "ekfac"
    assert res.solves["finetune"]["auto"]["chose"] == "cg_squared"
    assert "case 'fixed' head" in res.solves["finetune"]["auto"]["why"]
    explicit = tfi.SolverConfig("auto", damping=1e-3, curvature_iterations=0,
                                auto=tfi.AutoOptions(dense_max=4, kronecker_min=5))
    res = tfi.multi_stage_influence(pre_obj, ds(xp, yp, 16), ft_obj, ds(xf, yf, 16), ds(xt, yt),
                                    embedding=["embedding"],
                                    args=tfi.InfluenceArgs(hessian_samples=None, pretrain_solver=auto,
                                                           finetune_solver=explicit))
    assert res.solves["finetune"]["auto"]["chose"] == "ekfac"


@pytest.mark.parametrize("which", ["cnn", "conv1d", "transformer_with_norm", "two_blocks"])
def test_ghost_norms_equal_one_at_a_time_squared_gradient_norms(which):
    """Self-influence from ghost norms (no per-example gradients) = ‖one-at-a-time gradient‖² over K."""
    from tf_influence import tracin
    rng = np.random.default_rng(3)
    if which == "cnn":  # conv: explicit G_n (36 positions² > 10·2 rows·outputs); dense: the P² form
        model, K = h.small_cnn(), ["conv", "out"]
        x, y = rng.normal(size=(9, 6, 6, 1)), rng.integers(0, 3, 9)
    elif which == "conv1d":  # embedding + causal dilated / strided conv + dense, a per-position loss
        model, K = conv1d_lm(), ["emb", "c1", "c2", "out"]
        x, y = rng.integers(0, 7, size=(8, 6)).astype(np.int32), rng.integers(0, 5, size=(8, 3))
    elif which == "two_blocks":  # two attention layers whose sub-layers share their names
        model, K = two_block_lm(), ["attention0/query", "attention1/query", "attention1/value", "norm0", "out"]
        with pytest.raises(tfi.ParameterGroupError, match="2 layers named 'query'.*attention1/query"):
            tfi.group_from_layers(model, ["query"])
        x, y = rng.integers(0, 9, size=(8, 5)).astype(np.int32), rng.integers(0, 6, size=(8, 5))
    else:  # LayerNormalization: ∂l/∂γ = Σ_t g_t ⊙ x̂_t from the captured input, ghost norms for the rest
        model, _, _ = h.two_stage_transformers(dict_inputs=True)
        K = ["tok_emb", "query", "norm", "ffn"]
        x, y = h.token_data(8, n_classes=3, seed=4, with_mask=True)
    obj = tfi.Objective(model, h.sce() if which not in ("conv1d", "two_blocks") else keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None))
    group = tracin.layer_set(model, K)
    ref = (h.one_at_a_time_gradients(obj, x, y, group) ** 2).sum(axis=1)
    ghost = tracin.self_influence(obj, ds(x, y, 4), K, method="ghost")
    np.testing.assert_allclose(ghost, ref, rtol=1e-9)
    np.testing.assert_allclose(tracin.self_influence(obj, ds(x, y, 4), K, method="per_example"), ref, rtol=1e-9)
    with pytest.raises(ValueError, match="method must be one of"):
        tracin.self_influence(obj, ds(x, y, 4), K, method="exact")


def test_a_factor_fit_leaves_no_tensorflow_memory_behind():
    """The running sums of a fit are freed when they are taken, even while the compiled step that captured
    them lives on — TensorFlow keeps a traced step's graph, and every variable it captured, after the step
    is dropped (seen at GPT-2 scale, from C++, where no ``del`` or ``gc.collect`` reaches: each fit left its
    covariance sums allocated for the life of the process, 1.1 GB at GPT-2 small). The test holds the step
    itself, as TensorFlow does, and reads TensorFlow's own allocator statistics."""
    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, tf.errors.InvalidArgumentError):
        pytest.skip("this TensorFlow CPU allocator keeps no statistics")
    import gc
    from tf_influence.kfac import FactorStatistics
    keras.utils.set_random_seed(0)
    inp = keras.Input((256,))
    z = keras.layers.Dense(512, activation="tanh", name="d1")(inp)
    model = keras.Model(inp, keras.layers.Dense(10, name="d2")(z))
    obj = tfi.Objective(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    data = ds(rng.normal(size=(32, 256)).astype("float32"), rng.integers(0, 10, 32), batch=8)

    def in_use():
        gc.collect()
        return tf.config.experimental.get_memory_info("CPU:0")["current"]
    stats = FactorStatistics(obj, tfi.ParameterGroup.from_model(model))
    for step, (x, y) in enumerate(data):
        stats.add("covariances", x, y, step)
    held = stats._add                                       # what TensorFlow keeps of the compiled step
    before = in_use()
    sums = stats.take("covariances")
    dense = sum(a.nbytes for blk in sums["blocks"].values() for a in blk[:2] if a.ndim == 2)
    assert dense > 2 * 2 ** 20                              # the [257², 512²] + [513², 10²] covariances
    freed = before - in_use()
    assert freed > 0.9 * dense, f"{freed} of the sums' {dense} bytes freed"
    assert held is not None
    np.testing.assert_allclose(sums["n"], 32)


def test_blocks_reading_one_tensor_share_their_covariance_and_eigenbasis():
    """Query, key and value read one tensor: one ``A`` and one eigenbasis array for the three, which still
    diagonalises each block's exact activation covariance (from the layers' inputs, read off the model, not
    the captured activations); blocks of another input keep their own."""
    rng = np.random.default_rng(3)
    model = two_block_lm()
    x, y = rng.integers(0, 9, size=(8, 5)).astype(np.int32), rng.integers(0, 6, size=(8, 5))
    obj = tfi.Objective(model, h.sce())
    factors = kfac.fit_factors(obj, ds(x, y, batch=3), tfi.ParameterGroup.from_model(model), fisher="empirical")
    inputs = {"attention0": model.get_layer("emb").output, "attention1": model.get_layer("norm0").output,
              "out": model.get_layer("norm1").output}
    seen = {}
    for layer, tensor in inputs.items():
        acts = keras.Model(model.inputs[0], tensor)(x).numpy().reshape(-1, 4)
        acts = np.concatenate([acts, np.ones((len(acts), 1))], axis=1)      # the bias row
        A = acts.T @ acts / len(acts)
        names = [f"{layer}/{p}" for p in ("query", "key", "value")] if layer != "out" else ["out"]
        for name in names:
            QA = factors.blocks[name]["QA"]
            D = QA.T @ A @ QA
            np.testing.assert_allclose(D - np.diag(np.diag(D)), 0, atol=1e-10 * np.abs(D).max())
            np.testing.assert_allclose(np.sort(np.diag(D)), np.linalg.eigvalsh(A), rtol=1e-9, atol=1e-12)
        assert all(factors.blocks[n]["QA"] is factors.blocks[names[0]]["QA"] for n in names)
        seen[layer] = factors.blocks[names[0]]["QA"]
    assert len({id(q) for q in seen.values()}) == 3
    assert factors.blocks["attention0/attention_output"]["QA"] is not seen["attention0"]


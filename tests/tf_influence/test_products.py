"""The factor passes' dense products (tf_influence.kfac.products) against float64 NumPy, and a factor fit whose
covariances go through the tiled product against sums of the layers' inputs and one-at-a-time gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence import kfac
from tf_influence.kfac import products
from tests import helpers as h


def test_the_tiled_gram_is_the_exact_symmetric_product():
    rng = np.random.default_rng(0)
    for shape, block in (((3, 5, 7), 2), ((2, 4, 11), 3), ((6, 1100), 256), ((2, 2, 3, 9), 4)):
        x = rng.normal(size=shape)
        flat = x.reshape(-1, shape[-1])
        ref = flat.T @ flat
        for dtype in (tf.float64, tf.float32):
            out = products.token_gram(tf.constant(x, dtype), block).numpy()
            assert out.shape == ref.shape
            scale = np.abs(ref).max()
            np.testing.assert_allclose(out, ref, rtol=1e-12 if dtype == tf.float64 else 1e-5,
                                       atol=(1e-13 if dtype == tf.float64 else 1e-6) * scale)
            np.testing.assert_array_equal(out, out.T)          # the lower tiles are the upper ones transposed
    assert products._tiles(1100, 256) == [275] * 4 and products._tiles(11, 3) == [3, 3, 3, 2] and products._tiles(7, 2) == [2, 2, 2, 1]
    # a narrow side, or one of unknown width inside a compiled function, is one product
    fn = tf.function(lambda t: products.token_gram(t, 2), input_signature=[tf.TensorSpec([None, None], tf.float64)])
    x = rng.normal(size=(5, 6))
    np.testing.assert_allclose(fn(tf.constant(x)).numpy(), x.T @ x, rtol=1e-12)


def test_token_matmul_rotates_every_token():
    rng = np.random.default_rng(1)
    for shape in ((4, 5, 6), (2, 3, 4, 6), (7, 6)):
        x, m = rng.normal(size=shape), rng.normal(size=(6, 3))
        out = products.token_matmul(tf.constant(x), tf.constant(m)).numpy()
        np.testing.assert_allclose(out, x @ m, rtol=1e-12)
    fn = tf.function(products.token_matmul, input_signature=[tf.TensorSpec([None, None, None], tf.float64),
                                                              tf.TensorSpec([None, None], tf.float64)])
    x, m = rng.normal(size=(2, 3, 6)), rng.normal(size=(6, 4))
    np.testing.assert_allclose(fn(tf.constant(x), tf.constant(m)).numpy(), x @ m, rtol=1e-12)


def test_a_fit_through_the_tiled_product_has_the_exact_covariances(monkeypatch):
    """Tiles of 2 columns (every dense side of the model tiled, uneven where the width is odd): ``A`` equals the sum
    of the layer inputs' outer products (with the bias 1) and ``S`` the sum of the one-at-a-time bias gradients'."""
    monkeypatch.setattr(products, "GRAM_BLOCK", 2)
    model = h.mlp(n_in=5, n_hidden=7, n_out=4)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(13, 5)), rng.integers(0, 4, 13)
    obj = tfi.Objective(model, h.sce())
    group = tfi.ParameterGroup.from_model(model)
    stats = kfac.FactorStatistics(obj, group, fisher="empirical")
    sums = stats.covariances(tf.constant(x), tf.constant(y), 0)
    hidden = np.tanh(x @ model.get_layer("hidden").kernel.numpy() + model.get_layer("hidden").bias.numpy())
    for name, inputs in (("hidden", x), ("out", hidden)):
        a = np.concatenate([inputs, np.ones((len(x), 1))], axis=1)
        A, S, tokens = sums["blocks"][name]
        np.testing.assert_allclose(A, a.T @ a, rtol=1e-12)
        layer = tfi.group_from_layers(model, [name])
        G = h.one_at_a_time_gradients(obj, x, y, layer)
        bias = G[:, layer.sizes[0]:]                       # ∂l_n/∂bias = the output gradient g_n
        np.testing.assert_allclose(S, bias.T @ bias, rtol=1e-10)
        assert tokens == len(x)


def test_the_running_sums_add_upper_tiles_and_take_completes_them(monkeypatch):
    """``FactorStatistics.add`` keeps each dense covariance as its upper tiles (tiles of 2 columns here: every dense
    side tiled, uneven where the width is odd, the token counts of a small vocabulary's dense side cut into tiles
    too) and ``take`` completes them: the sums equal the per-batch API's whole matrices (``covariances``:
    :func:`token_gram` per batch, summed in float64; checked against NumPy above) to the last bits of a float64
    model and are exactly symmetric; the eigenvalue correction in their bases equals the per-batch API's too."""
    from tests import hub_models as hm
    from tf_influence.kfac import statistics
    monkeypatch.setattr(products, "GRAM_BLOCK", 2)
    c = hm.build("gpt2", dtype="float64", vocab=7, width=6, layers=1, length=4)
    g, _ = hm.objectives(c)
    stats = kfac.FactorStatistics(g, tfi.ParameterGroup.from_model(c.pretrain), fisher="empirical")
    assert any(not b.diag_in and b.kind != "dense" for b in stats.blocks)    # the tied table's token side: dense
    batches = list(c.pretrain_data)
    per_batch = None
    for i, (x, y) in enumerate(batches):
        stats.add("covariances", x, y, i)
        per_batch = statistics.add_statistics(per_batch, stats.covariances(x, y, i))
    tiles = stats._sums[1]["blocks"]
    assert all(isinstance(v, statistics._Tiles) for b in stats.blocks for v, diag in zip(tiles[b.name][:2],
               (b.diag_in, b.diag_out)) if not diag)
    widths = {n for b in stats.blocks for n, diag in ((b.rows, b.diag_in), (b.d_out, b.diag_out)) if not diag}
    assert {len(products.gram_tiles(n)) for n in widths} != {1}           # the sides are tiled
    sums = stats.take("covariances")
    for b in stats.blocks:
        for got, ref in zip(sums["blocks"][b.name], per_batch["blocks"][b.name]):
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
            if np.ndim(got) == 2:
                np.testing.assert_array_equal(got, got.T)
    bases = stats.eigenbases(sums)
    for i, (x, y) in enumerate(batches):
        stats.add("correction", x, y, i, bases)
    corr_in_graph = stats.take("correction")
    corr = None
    for i, (x, y) in enumerate(batches):
        corr = statistics.add_statistics(corr, stats.correction(x, y, i, bases))
    for k in corr:
        np.testing.assert_allclose(corr_in_graph[k], corr[k], rtol=1e-10, atol=1e-12 * np.abs(corr[k]).max())


# -- bfloat16 products (product_dtype) ----------------------------------------------------------------------------
def test_products_in_bfloat16_keep_the_input_dtype_and_bfloat16_accuracy():
    """``dtype=tf.bfloat16``: the product of the inputs rounded to bfloat16, in the inputs' dtype — within a few
    bfloat16 roundings (2⁻⁹ relative each; measured 0.0027–0.0029 in norm) of the float64 product, and not the float32
    product (so the bfloat16 kernels ran)."""
    rng = np.random.default_rng(5)
    x, m = rng.normal(size=(3, 40, 600)), rng.normal(size=(600, 70)) / 25
    flat = x.reshape(-1, 600)
    for got, ref, f32 in ((products.token_gram(tf.constant(x, tf.float32), dtype=tf.bfloat16), flat.T @ flat,
                           products.token_gram(tf.constant(x, tf.float32))),
                          (products.token_matmul(tf.constant(x, tf.float32), tf.constant(m, tf.float32),
                                                 dtype=tf.bfloat16), x @ m,
                           products.token_matmul(tf.constant(x, tf.float32), tf.constant(m, tf.float32)))):
        assert got.dtype == tf.float32
        err = np.linalg.norm(got.numpy() - ref) / np.linalg.norm(ref)
        err32 = np.linalg.norm(f32.numpy() - ref) / np.linalg.norm(ref)
        assert err < 2 ** -7, err
        assert err > 100 * err32, (err, err32)


def test_product_dtype_resolves_by_width_model_dtype_and_hardware(monkeypatch):
    monkeypatch.setattr(products, "native_bfloat16", lambda: True)
    assert products.product_dtype("auto", products.BFLOAT16_MIN, tf.float32) == tf.bfloat16
    assert products.product_dtype("auto", products.BFLOAT16_MIN - 1, tf.float32) is None
    assert products.product_dtype("auto", 4096, tf.float64) is None            # a float64 model keeps float64
    assert products.product_dtype("bfloat16", 4096, tf.float64) is None
    assert products.product_dtype("bfloat16", 3, tf.float32) == tf.bfloat16
    assert products.product_dtype("model", 4096, tf.float32) is None
    monkeypatch.setattr(products, "native_bfloat16", lambda: False)
    assert products.product_dtype("auto", 4096, tf.float32) is None            # emulated bfloat16 is slower
    with pytest.raises(ValueError, match=r"FactorArgs.product_dtype must be one of .*'float16'"):
        tfi.FactorArgs(product_dtype="float16")
    with pytest.raises(ValueError, match=r"KroneckerOptions.product_dtype must be one of"):
        tfi.KroneckerOptions(product_dtype="fp16")
    cfg = tfi.SolverConfig("ekfac", kronecker=tfi.KroneckerOptions(product_dtype="model"))
    assert tfi.SolverConfig.from_json(cfg.to_json()).kronecker.product_dtype == "model"
    assert tfi.FactorArgs.from_json(tfi.FactorArgs(product_dtype="bfloat16").to_json()).product_dtype == "bfloat16"


def _wide_model():
    """float32: 6 inputs → Dense(1024, tanh) → Dense(3): sides of 7, 1,024 (hidden's outputs), 1,025 (out's
    inputs with the bias) and 3."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    hid = keras.layers.Dense(products.BFLOAT16_MIN, activation="tanh", name="hidden")(inp)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(hid))


def test_auto_fits_the_wide_sides_in_bfloat16_within_its_rounding_and_records_it(monkeypatch, tmp_path):
    """``product_dtype="auto"`` on hardware with native bfloat16 (patched on): the 1,024- and 1,025-column sides are
    multiplied in bfloat16, the narrow ones in float32, the factors say so (and keep it when saved); the
    eigenvalues are within bfloat16 rounding of the float32 fit's in the same bases, and differ from them. Without
    native bfloat16, ``auto`` is the float32 fit bit for bit."""
    model = _wide_model()
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 3, 40)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    obj, group = tfi.Objective(model, h.sce()), tfi.ParameterGroup.from_model(model)
    fit = lambda dtype: kfac.fit_factors(obj, data, group, fisher="empirical", product_dtype=dtype)  # noqa: E731
    monkeypatch.setattr(products, "native_bfloat16", lambda: False)
    f32, plain_auto = fit("model"), fit("auto")
    for name, blk in f32.blocks.items():
        for key in ("QA", "QS", "eig"):
            np.testing.assert_array_equal(plain_auto.blocks[name][key], blk[key])
    assert plain_auto.summary()["bfloat16_products"] == []
    monkeypatch.setattr(products, "native_bfloat16", lambda: True)
    low = fit("auto")
    assert low.products == {"hidden": {"in": "float32", "out": "bfloat16", "per_example": "bfloat16"},
                            "out": {"in": "bfloat16", "out": "float32", "per_example": "bfloat16"}}
    assert low.summary()["bfloat16_products"] == ["hidden/out", "hidden/per_example", "out/in", "out/per_example"]
    assert kfac.KFACFactors.load(low.save(str(tmp_path / "f"))).products == low.products
    # the eigenvalue correction of the bfloat16 fit against the float32 one, both in the bfloat16 fit's bases
    stats32 = kfac.FactorStatistics(obj, group, fisher="empirical", product_dtype="model")
    stats16 = kfac.FactorStatistics(obj, group, fisher="empirical", product_dtype="auto")
    bases = {k: {"QA": v["QA"], "QS": v["QS"]} for k, v in low.blocks.items()}
    c32, c16 = (s.correction(tf.constant(x), tf.constant(y), 0, bases) for s in (stats32, stats16))
    # the same with each example's G_n on its own (the branch a vocabulary-sized block takes)
    from tf_influence.kfac import statistics
    monkeypatch.setattr(statistics, "PER_EXAMPLE_BATCHED_MAX", 0)
    stats_one = kfac.FactorStatistics(obj, group, fisher="empirical", product_dtype="auto")
    c16_one = stats_one.correction(tf.constant(x), tf.constant(y), 0, bases)
    for name in ("hidden", "out"):
        ref = np.asarray(c32[name], np.float64)
        for got in (np.asarray(c16[name], np.float64), np.asarray(c16_one[name], np.float64)):
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert 1e-6 < rel < 2 ** -7, (name, rel)
    # and the bases: the bfloat16 fit's eigenbasis diagonalises the float32 covariance up to bfloat16 rounding
    # (its leading eigenvectors of nearly equal eigenvalues may turn among themselves: the off-diagonal mass is
    # what tells a wrong basis)
    sums = stats32.covariances(tf.constant(x), tf.constant(y), 0)["blocks"]
    for name, side, which in (("hidden", "QS", 1), ("out", "QA", 0)):
        C, Q = np.asarray(sums[name][which], np.float64), low.blocks[name][side].astype(np.float64)
        R = Q.T @ C @ Q
        off = np.linalg.norm(R - np.diag(np.diag(R))) / np.linalg.norm(R)
        assert off < 2 ** -7, (name, off)

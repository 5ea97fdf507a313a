"""The factor passes' dense products (tf_influence.kfac.products) against float64 NumPy, and a factor fit whose
covariances go through the tiled product against sums of the layers' inputs and one-at-a-time gradients."""

import numpy as np
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

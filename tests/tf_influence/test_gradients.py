"""Per-example gradients and gradient·vector products against one-example-at-a-time gradients."""

import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as h


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(23, 5)), rng.integers(0, 3, 23)
    model = h.mlp(l2=0.01)
    return model, tfi.Objective(model, h.sce()), x, y


def test_per_example_gradients_equal_one_at_a_time(setup):
    model, obj, x, y = setup
    g = tfi.ParameterGroup.from_model(model, "all")
    ref = h.one_at_a_time_gradients(obj, x, y, g)
    got = tfi.stack_per_example_gradients(obj, h.dataset(x, y, 10), g).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    # chunking inside a batch gives the same blocks, in order
    chunked = tfi.stack_per_example_gradients(obj, h.dataset(x, y, 23), g, chunk_size=4).numpy()
    np.testing.assert_allclose(chunked, ref, rtol=1e-12, atol=1e-14)
    blocks = list(tfi.per_example_gradients(obj, h.dataset(x, y, 23), g, chunk_size=4))
    assert max(b.shape[0] for b in blocks) == 4


def test_restricted_to_a_layer(setup):
    model, obj, x, y = setup
    W = tfi.group_from_layers(model, ["hidden"])
    ref = h.one_at_a_time_gradients(obj, x, y, W)
    np.testing.assert_allclose(tfi.stack_per_example_gradients(obj, h.dataset(x, y), W).numpy(), ref, rtol=1e-12)


def test_cnn_per_example_gradients():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(9, 6, 6, 1)), rng.integers(0, 3, 9)
    model = h.small_cnn()
    obj = tfi.Objective(model, h.sce())
    g = tfi.ParameterGroup.from_model(model, "all")
    np.testing.assert_allclose(tfi.stack_per_example_gradients(obj, h.dataset(x, y, 4), g).numpy(),
                               h.one_at_a_time_gradients(obj, x, y, g), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["jvp", "jacobian", "auto"])
def test_per_example_dot(setup, method):
    model, obj, x, y = setup
    g = tfi.ParameterGroup.from_model(model, "all")
    ref = h.one_at_a_time_gradients(obj, x, y, g)
    V = np.random.default_rng(2).normal(size=(g.size, 6))
    np.testing.assert_allclose(tfi.per_example_dot(obj, h.dataset(x, y, 10), g, V, method=method), ref @ V,
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tfi.per_example_dot(obj, h.dataset(x, y, 10), g, V[:, 0], method=method),
                               ref @ V[:, 0], rtol=1e-10, atol=1e-12)


def test_mean_gradient(setup):
    model, obj, x, y = setup
    g = tfi.ParameterGroup.from_model(model, "all")
    with tf.GradientTape() as tape:
        l = tf.reduce_mean(obj.per_example_losses(x, y)) + obj.regularization()
    ref = g.flatten(tape.gradient(l, g.tf_variables)).numpy()
    np.testing.assert_allclose(tfi.mean_gradient(obj, h.dataset(x, y, 7), g).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(tfi.mean_gradient(obj, h.dataset(x, y, 7), g, reduction="sum").numpy(),
                               h.loss_gradient(obj, x, y, g, "sum"), rtol=1e-12)


def test_losses(setup):
    model, obj, x, y = setup
    logits = model(x).numpy()  # independent: cross-entropy from the logits in numpy
    by_hand = np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y]
    np.testing.assert_allclose(tfi.per_example_losses(obj, h.dataset(x, y, 5)), by_hand, rtol=1e-10)

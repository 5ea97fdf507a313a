"""Small models and *independent* dense reference computations for the tests.

The references here never call the library's HVP / solver code: explicit Hessians come from
nested ``GradientTape.jacobian`` calls on the full-data loss (or closed forms), and inverses
from ``numpy.linalg.solve``.
"""

import keras
import numpy as np
import tensorflow as tf

import tf_influence as tfi

F64 = "float64"


def dataset(x, y, batch_size=16):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def mlp(n_in=5, n_hidden=4, n_out=3, l2=0.0, name="mlp", seed=0):
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(l2) if l2 else None
    inp = keras.Input((n_in,), dtype=F64)
    h = keras.layers.Dense(n_hidden, activation="tanh", dtype=F64, name="hidden", kernel_regularizer=reg)(inp)
    out = keras.layers.Dense(n_out, dtype=F64, name="out", kernel_regularizer=reg, bias_regularizer=reg)(h)
    return keras.Model(inp, out, name=name)


def small_cnn(n_out=3, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 1), dtype=F64)
    h = keras.layers.Conv2D(2, 3, activation="tanh", dtype=F64, name="conv")(inp)
    h = keras.layers.Flatten(dtype=F64)(h)
    out = keras.layers.Dense(n_out, dtype=F64, name="out")(h)
    return keras.Model(inp, out, name="cnn")


def two_stage_mlps(n_in=5, emb=3, n_pre=3, n_ft=2, l2=1e-2, seed=0):
    """Pretrain model (embedding → U) and finetune model (same embedding layer → Θ)."""
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(l2)
    e_in = keras.Input((n_in,), dtype=F64)
    e_out = keras.layers.Dense(emb, activation="tanh", dtype=F64, name="emb_dense", kernel_regularizer=reg)(e_in)
    embedding = keras.Model(e_in, e_out, name="embedding")
    inp = keras.Input((n_in,), dtype=F64)
    pre = keras.Model(inp, keras.layers.Dense(n_pre, dtype=F64, name="U", kernel_regularizer=reg,
                                              bias_regularizer=reg)(embedding(inp)), name="pretrain")
    inp2 = keras.Input((n_in,), dtype=F64)
    ft = keras.Model(inp2, keras.layers.Dense(n_ft, dtype=F64, name="theta", kernel_regularizer=reg,
                                              bias_regularizer=reg)(embedding(inp2)), name="finetune")
    return pre, ft, embedding


def sce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train(model, loss, x, y, steps=300, lr=0.05):
    """Full-batch Adam (deterministic) to get near a minimum."""
    opt = keras.optimizers.Adam(lr)
    obj = tfi.Objective(model, loss)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            l = tf.reduce_mean(obj.per_example_losses(x, y)) + obj.regularization()
        vs = [v.value for v in model.trainable_variables]
        opt.apply_gradients(zip(tape.gradient(l, vs), model.trainable_variables))
    return model


def explicit_hessian(objective, x, y, rows, cols=None):
    """Dense ∂²L/∂rows∂cols of L = mean l + R by nested jacobians over the full data."""
    cols = cols or rows
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(objective.per_example_losses(x, y)) + objective.regularization()
        g = cols.flatten(inner.gradient(loss, cols.tf_variables, unconnected_gradients="zero"))
    jac = outer.jacobian(g, rows.tf_variables, unconnected_gradients="zero")
    J = np.concatenate([tf.reshape(j, [cols.size, -1]).numpy() for j in jac], axis=1)  # [p_cols, p_rows]
    return J.T


def loss_gradient(objective, x, y, group, reduction="sum"):
    with tf.GradientTape() as tape:
        l = objective.per_example_losses(x, y)
        l = tf.reduce_sum(l) if reduction == "sum" else tf.reduce_mean(l)
    return group.flatten(tape.gradient(l, group.tf_variables, unconnected_gradients="zero")).numpy()


def one_at_a_time_gradients(objective, x, y, group):
    return np.stack([loss_gradient(objective, x[i:i + 1], y[i:i + 1], group) for i in range(len(x))])

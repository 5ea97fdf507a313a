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
    """Full-batch Adam (deterministic) to get near a minimum; the step is compiled once (300 eager steps of a
    tiny model took ~3 CPU-s, most of it Python)."""
    if steps <= 0:
        return model
    opt = keras.optimizers.Adam(lr)
    obj = tfi.Objective(model, loss)
    variables = model.trainable_variables
    opt.build(variables)

    @tf.function(autograph=False)
    def step():
        with tf.GradientTape() as tape:
            l = tf.reduce_mean(obj.per_example_losses(x, y)) + obj.regularization()
        vs = [v.value for v in variables]
        opt.apply_gradients(zip(tape.gradient(l, vs), variables))
    for _ in range(steps):
        step()
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


def _flat_gradient(objective, x, y, group, reduction="sum"):
    """``∇`` of the summed (or mean) per-example losses w.r.t. ``group``, flattened (a tensor; eager or traced)."""
    with tf.GradientTape() as tape:
        l = objective.per_example_losses(x, y)
        l = tf.reduce_sum(l) if reduction == "sum" else tf.reduce_mean(l)
    return group.flatten(tape.gradient(l, group.tf_variables, unconnected_gradients="zero"))


def loss_gradient(objective, x, y, group, reduction="sum"):
    return _flat_gradient(objective, x, y, group, reduction).numpy()


def one_at_a_time_gradients(objective, x, y, group):
    """``∇ l_i`` of every example, one example per call — the tape of :func:`loss_gradient`, compiled once per
    call of this function (eager, a keras-hub model's example took ~0.15 CPU-s, most of it Python)."""
    one = lambda i: tf.nest.map_structure(lambda t: t[i:i + 1], x)  # noqa: E731  (arrays or dicts of arrays)
    grad = tf.function(lambda xi, yi: _flat_gradient(objective, xi, yi, group), autograph=False)
    return np.stack([grad(one(i), y[i:i + 1]).numpy() for i in range(len(y))])


def tiny_encoder(vocab=20, width=4, heads=2, seq_len=5, dict_inputs=False, name="embedding", seed=0):
    """A tiny transformer encoder (float64): token Embedding → MultiHeadAttention (EinsumDense
    projections, padding mask) + residual → LayerNormalization → Dense FFN → Dropout → mean pool.

    ``dict_inputs=True`` takes ``{"tokens": int32 [B, T], "mask": float64 [B, T]}``."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((seq_len,), dtype="int32", name="tokens")
    mask = keras.Input((seq_len,), dtype=F64, name="mask") if dict_inputs else None
    h = keras.layers.Embedding(vocab, width, dtype=F64, name="tok_emb")(tokens)
    attn_mask = None
    if mask is not None:
        attn_mask = keras.ops.cast(keras.ops.expand_dims(mask, 1) * keras.ops.expand_dims(mask, 2), "bool")
    a = keras.layers.MultiHeadAttention(heads, key_dim=width // heads, dtype=F64, name="attention")(
        h, h, attention_mask=attn_mask)
    h = keras.layers.LayerNormalization(dtype=F64, name="norm")(h + a)
    h = keras.layers.Dense(width, activation="tanh", dtype=F64, name="ffn")(h)
    h = keras.layers.Dropout(0.1, dtype=F64, name="dropout")(h)
    out = keras.layers.GlobalAveragePooling1D(dtype=F64, name="pool")(h)
    inputs = {"tokens": tokens, "mask": mask} if dict_inputs else tokens
    return keras.Model(inputs, out, name=name)


def two_stage_transformers(n_pre=3, n_ft=2, l2=1e-2, dict_inputs=False, seq_len=5, **kw):
    """Pretrain (encoder → U) and finetune (the same encoder → Θ) transformer classifiers."""
    enc = tiny_encoder(dict_inputs=dict_inputs, seq_len=seq_len, **kw)
    reg = keras.regularizers.L2(l2)

    def attach(n, head, model_name):
        inputs = ({"tokens": keras.Input((seq_len,), dtype="int32", name="tokens"),
                   "mask": keras.Input((seq_len,), dtype=F64, name="mask")} if dict_inputs
                  else keras.Input((seq_len,), dtype="int32"))
        out = keras.layers.Dense(n, dtype=F64, name=head, kernel_regularizer=reg, bias_regularizer=reg)(enc(inputs))
        return keras.Model(inputs, out, name=model_name)
    return attach(n_pre, "U", "pretrain"), attach(n_ft, "theta", "finetune"), enc


def token_data(n, vocab=20, seq_len=5, n_classes=3, seed=0, with_mask=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(n, seq_len)).astype(np.int32)
    y = (x[:, 0] % n_classes).astype(np.int64)  # a learnable rule
    if with_mask:
        lengths = rng.integers(2, seq_len + 1, size=n)
        mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.float64)
        return {"tokens": x, "mask": mask}, y
    return x, y

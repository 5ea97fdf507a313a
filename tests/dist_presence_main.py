"""Run in a fresh process by tests/tf_influence/test_presence_distributed.py: two logical CPU devices must be
configured before TensorFlow initialises its devices.

Prints a JSON line: max |Δ| between the weights after one PRESENCE step under
MirroredStrategy (2 replicas × 2 microbatches) and on one device (4 microbatches), plus the
microbatch weights of both."""

import json
import os
import sys

# run as a script, sys.path[0] is tests/, whose folders (tests/tf_influence/, tests/model_zoo/, …) would
# shadow the packages they test: the repository root instead
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_influence import presence  # noqa: E402


def toy():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,))
    hid = keras.layers.Dense(6, activation="tanh", name="first")(inp)
    return keras.Model(inp, keras.layers.Dense(3, name="last")(hid), name="toy")


def transformer_lm():
    """The PRESENCE LM experiment's model family (token Embedding, causal MultiHeadAttention,
    LayerNormalization, gelu FFN), tiny."""
    from model_zoo import text
    return text.build_transformer_lm(30, 8, width=8, heads=2, blocks=1, ffn=16, seed=0)


def step(strategy, n_micro, tau, optimizer, model="toy", jit_compile=False):
    rng = np.random.default_rng(0)
    if model == "toy":
        x = rng.normal(size=(24, 5)).astype(np.float32)
        y = rng.integers(0, 3, 24)
        build, k = toy, ["first"]
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        x = rng.integers(0, 30, size=(24, 8)).astype(np.int32)
        y = rng.integers(0, 30, size=(24, 8)).astype(np.int64)
        build, k = transformer_lm, ["tok_emb"]
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    with strategy.scope():
        pm = presence.PresenceModel(build(), num_microbatches=n_micro, si_layers=k, tau=tau)
        opt = keras.optimizers.SGD(0.1) if optimizer == "sgd" else keras.optimizers.Adam(0.01)
        pm.compile(optimizer=opt, loss=loss, jit_compile=jit_compile)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(24)
    pm.fit(ds, epochs=2, verbose=0)  # fit distributes the dataset (experimental_distribute_dataset)
    return [v.numpy() for v in pm.inner.trainable_variables], pm.presence_last_weights.numpy()


if __name__ == "__main__":
    tau = float(sys.argv[1]) if len(sys.argv) > 1 else 1.5
    optimizer = sys.argv[2] if len(sys.argv) > 2 else "sgd"
    model = sys.argv[3] if len(sys.argv) > 3 else "toy"
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    auto = presence.get_strategy()
    w_multi, mw_multi = step(mirrored, 2, tau, optimizer, model)
    w_single, mw_single = step(tf.distribute.get_strategy(), 4, tau, optimizer, model)
    jit = {}
    if model == "transformer":  # the XLA-compiled step (what TPUs run) equals the eager-graph one
        w_jit, mw_jit = step(tf.distribute.get_strategy(), 4, tau, optimizer, model, jit_compile=True)
        jit = {"jit_max_abs_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(w_jit, w_single)),
               "jit_weights": mw_jit.tolist()}
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w_multi, w_single))
    print(json.dumps({"replicas": mirrored.num_replicas_in_sync, "max_abs_diff": diff,
                      "weights_multi": mw_multi.tolist(), "weights_single": mw_single.tolist(),
                      "auto_strategy": type(auto).__name__, "auto_replicas": auto.num_replicas_in_sync, **jit}))

"""Run in a fresh process by tests/test_presence_distributed.py: two logical CPU devices must be
configured before TensorFlow initialises its devices.

Prints a JSON line: max |Δ| between the weights after one PRESENCE step under
MirroredStrategy (2 replicas × 2 microbatches) and on one device (4 microbatches), plus the
microbatch weights of both."""

import json
import os
import sys

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


def step(strategy, n_micro, tau, optimizer):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    with strategy.scope():
        pm = presence.PresenceModel(toy(), num_microbatches=n_micro, si_layers=["first"], tau=tau)
        opt = keras.optimizers.SGD(0.1) if optimizer == "sgd" else keras.optimizers.Adam(0.01)
        pm.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(24)
    pm.fit(ds, epochs=2, verbose=0)
    return [v.numpy() for v in pm.inner.trainable_variables], pm.presence_last_weights.numpy()


if __name__ == "__main__":
    tau = float(sys.argv[1]) if len(sys.argv) > 1 else 1.5
    optimizer = sys.argv[2] if len(sys.argv) > 2 else "sgd"
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    auto = presence.get_strategy()
    w_multi, mw_multi = step(mirrored, 2, tau, optimizer)
    w_single, mw_single = step(tf.distribute.get_strategy(), 4, tau, optimizer)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w_multi, w_single))
    print(json.dumps({"replicas": mirrored.num_replicas_in_sync, "max_abs_diff": diff,
                      "weights_multi": mw_multi.tolist(), "weights_single": mw_single.tolist(),
                      "auto_strategy": type(auto).__name__, "auto_replicas": auto.num_replicas_in_sync}))

"""Run in a fresh process by tests/tf_influence/test_kfac_distributed.py (two logical CPU devices must be configured
before TensorFlow initialises): EK-FAC factors fitted under MirroredStrategy vs on one device.

Prints a JSON line with the replica count and the largest relative differences of the factors."""

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

import tf_influence as tfi  # noqa: E402
from tf_influence import kfac  # noqa: E402


def main():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,), dtype="float64")
    hid = keras.layers.Dense(6, activation="tanh", dtype="float64", name="first")(inp)
    hid = keras.layers.LayerNormalization(dtype="float64", name="norm")(hid)  # a diagonal block too
    model = keras.Model(inp, keras.layers.Dense(3, dtype="float64", name="last")(hid))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(48, 5)), rng.integers(0, 3, 48)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    obj = tfi.Objective(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    group = tfi.ParameterGroup.from_model(model)
    single = kfac.fit_factors(obj, ds, group, fisher="empirical")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    multi = kfac.fit_factors(obj, ds, group, fisher="empirical", strategy=strategy)
    rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))  # noqa: E731
    diffs = {f"{name}/{key}": rel(np.abs(multi.blocks[name][key]), np.abs(single.blocks[name][key]))
             for name in single.blocks for key in ("eig", "QA", "QS")}  # |Q|: eigenvector signs are arbitrary
    diffs.update({f"diag/{k}": rel(multi.diagonal[k], v) for k, v in single.diagonal.items()})
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "num_examples": [single.num_examples,
                                                                                  multi.num_examples],
                      "max_rel_diff": max(diffs.values()), "diffs": diffs}))


if __name__ == "__main__":
    main()

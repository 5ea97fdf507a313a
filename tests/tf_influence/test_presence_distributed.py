"""PRESENCE under tf.distribute: MirroredStrategy over 2 logical CPUs gives the same update as
one device on the same global batch (runs in a subprocess: logical devices must be set before
TensorFlow initialises)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # tests/


@pytest.mark.parametrize("tau,optimizer,model", [(1.5, "sgd", "toy"), (-1.0, "adam", "transformer")])
def test_mirrored_equals_single_device(tau, optimizer, model):
    """Also, on the transformer LM: the step under ``jit_compile=True`` (XLA, as on TPUs) equals it."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    out = subprocess.run([sys.executable, os.path.join(HERE, "dist_presence_main.py"), str(tau), optimizer, model],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["replicas"] == 2
    assert res["max_abs_diff"] < 1e-5
    np.testing.assert_allclose(res["weights_multi"], res["weights_single"], rtol=1e-5)
    assert abs(sum(res["weights_multi"]) - 1) < 1e-5
    # get_strategy(): no TPU here (TPUClusterResolver raises) → MirroredStrategy over the 2 CPUs
    assert res["auto_strategy"] == "MirroredStrategy" and res["auto_replicas"] == 2
    if model == "transformer":
        assert res["jit_max_abs_diff"] < 1e-5
        np.testing.assert_allclose(res["jit_weights"], res["weights_single"], rtol=1e-5)

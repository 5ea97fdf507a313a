"""EK-FAC factors fitted under tf.distribute (MirroredStrategy over 2 logical CPUs) equal the
single-device factors: per-replica covariance sums, all-reduced (subprocess: logical devices must be
configured before TensorFlow initialises)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # tests/


def test_mirrored_factors_equal_single_device():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    out = subprocess.run([sys.executable, os.path.join(HERE, "dist_kfac_main.py")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["replicas"] == 2 and res["num_examples"] == [48, 48]
    assert set(res["diffs"]) >= {"first/eig", "last/eig", "diag/norm/gamma", "diag/norm/beta"}
    assert res["max_rel_diff"] < 1e-9, res["diffs"]

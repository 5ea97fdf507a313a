"""Beam scoring speed-up: the standalone self-influence job on DirectRunner (multi-processing)
with 1 vs 2 workers, on the same examples and model, measured in one run.

    python -m benchmarks.beam_scoring --out reports/benchmarks/beam_scoring.json [--examples 20000]

Writes ``two_workers_over_one_worker_speedup`` (wall time 1 worker / wall time 2 workers) and
both wall times. Each run includes the workers' start-up (importing TensorFlow, loading the
model once per worker), which is what a user of the job pays.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks.common import write_report
from tf_influence import console


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/benchmarks/beam_scoring.json")
    ap.add_argument("--examples", type=int, default=20000)
    console.add_verbose_flag(ap)
    args = ap.parse_args(argv)
    console.quiet(args.verbose)
    import numpy as np
    import tensorflow as tf

    from experiments import models
    from tfx_components import beam_scoring

    tmp = tempfile.mkdtemp(prefix="beam_bench_")
    rng = np.random.default_rng(0)
    path = os.path.join(tmp, "examples")
    os.makedirs(path)
    shards = 8
    writers = [tf.io.TFRecordWriter(os.path.join(path, f"data-{s:05d}.gz"), options="GZIP") for s in range(shards)]
    for i in range(args.examples):
        f = {"key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"ex-{i}".encode()])),
             "image": tf.train.Feature(float_list=tf.train.FloatList(value=rng.random(64).tolist())),
             "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(rng.integers(0, 4))]))}
        writers[i % shards].write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())
    for w in writers:
        w.close()
    import keras
    pre, _, _ = models.build_two_stage_models((8, 8, 1), 4, 6)
    pre.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model = os.path.join(tmp, "model.keras")
    pre.save(model)
    spec = json.dumps({"x": {"name": "image", "shape": [8, 8, 1]}, "y": {"name": "label"}})
    times = {}
    for workers in (1, 2):
        t = time.perf_counter()
        beam_scoring.main(["--examples", os.path.join(path, "*"), "--model", model, "--feature-spec", spec,
                           "--si-layers", "embedding", "--output", os.path.join(tmp, f"out{workers}"),
                           "--batch-size", "512", "--direct_running_mode=multi_processing",
                           f"--direct_num_workers={workers}"])
        times[workers] = time.perf_counter() - t
    out = {"two_workers_over_one_worker_speedup": times[1] / times[2], "seconds_one_worker": times[1],
           "seconds_two_workers": times[2], "n_examples": args.examples, "machine_cores": os.cpu_count()}
    write_report(out, args.out, width=40)


if __name__ == "__main__":
    main()

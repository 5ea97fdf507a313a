"""Corpus-scale Beam scoring: throughput, worker scaling and memory of the scorers' Beam job on
the DirectRunner (multi-processing) and on a Dask distributed cluster, 1 and 2 workers.

    python -m benchmarks.beam_scale --out reports/benchmarks/beam_scale.json [--sizes 100000 1000000]

For each corpus size a synthetic digits corpus (:mod:`pipelines.synthetic_corpus`, GZIP TFRecord
shards of ``--examples-per-shard`` examples, so a shard — one read bundle — has the same size at
every corpus size) is scored by the Beam job the ``SelfInfluenceScorer`` and ``InfluenceScorer``
components run (:func:`tfx_components.beam_scoring.score_examples`: file names spread over the
workers → each file read in batches, one library call per batch → one scores file per examples
file, published at the end), started as its own process
(``python -m tfx_components.beam_scoring``) exactly as a user runs it:

* ``self_influence``: TracIn self-influence of every example over the whole model (ghost norms);
* ``influence``: the per-example gradient · test-side vector of the ``InfluenceScorer`` (a fixed
  random vector over every parameter stands in for the driver's inverse-HVP result: the workers'
  cost does not depend on its values).

Each worker process runs TensorFlow on one thread (``--worker-threads 1``: one worker process per
core, as Dataflow runs its Python workers; without it one TensorFlow process already uses both
cores here and a second worker has nothing to add).
Runners: ``direct`` = ``--direct_running_mode=multi_processing --direct_num_workers=W``; ``dask`` =
:class:`tfx_components.dask_runner.DaskRunner` against a ``dask.distributed.LocalCluster`` of W
worker processes (one thread each) started by this script before the job and stopped after it
(so both runners pay worker start-up, TensorFlow import and model load in the measured time).

Keys: ``examples_per_second`` (``{size: {runner: {scorer: {workers: value}}}}``, examples over the
job's wall time), ``speedup_2_over_1_workers`` (same nesting), ``driver_peak_rss_mb`` (the job's
driver process) and ``worker_peak_rss_mb`` (the largest worker process) per size × runner ×
scorer × workers, their ratios largest size / smallest size (``*_growth``; target ≤ 1.2 — flat),
and ``keys_out_equal_keys_in`` (every run's score files hold each input key exactly once).
Each job's fixed start-up (TensorFlow imports, model load, tracing — about 15–25 s here) is
measured by the same job on a 1,000-example corpus (``startup_seconds``); ``steady_*`` are the
throughput and speed-up once it is taken off (``(n − 1000) / (seconds − start-up)``).
``machine_ceiling_2_over_1_processes``: the same per-file work in 2 plain processes over 1 (no
Beam, after set-up) — what a second worker can add on this machine at best.
Peak memory is sampled every 0.2 s with ``psutil``; ``worker_cores_busy`` is the workers' CPU
time (user + system, summed over worker processes) over the job's wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from benchmarks.common import parse_args, write_report
from tf_influence import console

console.quiet_for_cli()

RUNNERS = ("direct", "dask")
STARTUP_N = 1_000  # the start-up probe's corpus
SCORERS = ("self_influence", "influence")


class PeakRSS:
    """Peak resident memory (MB) of a driver process and of the largest of a set of worker
    processes (the driver's descendants, plus ``extra`` pids such as Dask workers), sampled."""

    def __init__(self, driver_pid: int, extra_pids=(), interval: float = 0.2):
        import psutil
        self.psutil, self.driver = psutil, psutil.Process(driver_pid)
        self.extra = [psutil.Process(p) for p in extra_pids]
        self.driver_mb, self.worker_mb, self.interval = 0.0, 0.0, interval
        self.cpu = {}  # pid → last seen user + system CPU seconds (workers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self, p) -> float:
        try:
            return p.memory_info().rss / 2**20
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
            return 0.0

    def _run(self):
        while not self._stop.is_set():
            self.driver_mb = max(self.driver_mb, self._rss(self.driver))
            try:
                workers = self.driver.children(recursive=True) + self.extra
            except self.psutil.NoSuchProcess:
                workers = self.extra
            for w in workers:
                self.worker_mb = max(self.worker_mb, self._rss(w))
                try:
                    t = w.cpu_times()
                    self.cpu[w.pid] = t.user + t.system
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def make_model(directory: str) -> str:
    import keras

    from model_zoo import cnn as models
    pre, _, _ = models.build_two_stage_models((8, 8, 1), 4, 6)
    pre.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = os.path.join(directory, "model.keras")
    pre.save(path)
    return path


def test_vector(model_path: str, directory: str):
    """A fixed random vector over every parameter and its group spec (files for the job's flags)."""
    import keras
    import numpy as np

    import tf_influence as tfi
    model = keras.models.load_model(model_path)
    group = tfi.ParameterGroup.from_model(model)
    v = np.random.default_rng(0).normal(size=group.size).astype(np.float32) / np.sqrt(group.size)
    vec, spec = os.path.join(directory, "vector.npy"), os.path.join(directory, "group_spec.json")
    np.save(vec, v)
    with open(spec, "w") as fh:
        fh.write(group.spec(model).to_json())
    return vec, spec


def _ceiling_worker(files, model, spec, scorer, vector_files, barrier, out_q):
    """One plain process: set up the scoring DoFn, wait for the others, score ``files``, report."""
    import numpy as np

    from tfx_components import beam_scoring
    fn = beam_scoring.ScoreFile(model, json.dumps(spec), scorer,
                                si_layers=["embedding", "pretrain_head"] if scorer == "self_influence" else None,
                                group_spec=open(vector_files[1]).read() if scorer == "influence" else None,
                                worker_threads=1, output_dir=tempfile.mkdtemp(prefix="ceiling_"), batch_size=1024)
    fn.setup()
    vector = np.load(vector_files[0]) if scorer == "influence" else None
    list(fn.process(files[0], vector))  # trace
    barrier.wait()
    t = time.perf_counter()
    n = sum(r[2] for f in files for r in fn.process(f, vector))
    out_q.put((n, time.perf_counter() - t))


def machine_ceiling(files, model, spec, scorer, vector_files) -> float:
    """The same per-file work (``ScoreFile``, one TensorFlow thread) in 2 plain processes on half the
    files each, over 1 process on all of them, after set-up — no Beam: how much a second process
    can add on this machine for this work."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    rates = {}
    for k in (1, 2):
        barrier, q = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_ceiling_worker, args=(files[i::k], model, spec, scorer, vector_files, barrier, q))
                 for i in range(k)]
        for p in procs:
            p.start()
        res = [q.get() for _ in procs]
        for p in procs:
            p.join()
        rates[k] = sum(n for n, _ in res) / max(sec for _, sec in res)
    return rates[2] / rates[1]


def keys_exactly_once(directory: str, n: int) -> bool:
    """Every key ``digits-<i>`` of the corpus appears exactly once in the score files."""
    import glob

    import numpy as np
    import tensorflow as tf

    from tf_influence import scores_io
    files = sorted(glob.glob(os.path.join(directory, scores_io.PATTERN)))
    seen = np.zeros(n, dtype=np.int64)
    for rec in tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator():
        key = scores_io.decode_score(rec)[0]
        key = key.decode() if isinstance(key, bytes) else key
        seen[int(key.rsplit("-", 1)[1])] += 1
    return bool(np.all(seen == 1))


def run_job(corpus: str, model: str, spec: dict, scorer: str, runner: str, workers: int, out: str,
            batch_size: int, vector_files, verbose: bool) -> dict:
    cmd = [sys.executable, "-m", "tfx_components.beam_scoring", "--examples", os.path.join(corpus, "data-*"),
           "--model", model, "--feature-spec", json.dumps(spec), "--output", out, "--batch-size", str(batch_size),
           "--worker-threads", "1"]
    if scorer == "self_influence":
        cmd += ["--si-layers", "embedding", "pretrain_head"]
    else:
        cmd += ["--kind", "influence", "--vector", vector_files[0], "--group-spec", vector_files[1]]
    cluster, extra = None, []
    if runner == "direct":
        cmd += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    else:
        from dask.distributed import Client, LocalCluster
        t = time.perf_counter()
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=50, memory_limit=0)
        with Client(cluster) as c:
            extra = list(c.run(os.getpid).values())
        cluster_s = time.perf_counter() - t
        cmd += ["--runner=tfx_components.dask_runner.DaskRunner", f"--dask_client_address={cluster.scheduler_address}"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if not verbose else None, stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    with PeakRSS(proc.pid, extra) as rss:
        log, _ = proc.communicate()
    seconds = time.perf_counter() - t
    if cluster is not None:
        seconds += cluster_s  # the workers' start-up, which the DirectRunner pays inside the job
        cluster.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{runner} × {workers} {scorer} failed:\n{(log or b'').decode()[-3000:]}")
    return {"seconds": seconds, "driver_peak_rss_mb": rss.driver_mb, "worker_peak_rss_mb": rss.worker_mb,
            "worker_cpu_seconds": float(sum(rss.cpu.values()))}


@dataclass
class BeamScaleBenchArgs:
    """The Beam scale benchmark's options."""

    out: str = field(default="reports/benchmarks/beam_scale.json", metadata={"help": "JSON report path"})
    sizes: list[int] = field(default_factory=lambda: [100_000, 1_000_000], metadata={"help": "corpus sizes"})
    runners: list[str] = field(default_factory=lambda: list(RUNNERS), metadata={"choices": RUNNERS})
    scorers: list[str] = field(default_factory=lambda: list(SCORERS), metadata={"choices": SCORERS})
    workers: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "worker counts at the first size"})
    large_workers: list[int] = field(default_factory=lambda: [1, 2], metadata={
        "help": "worker counts run at sizes after the first (the memory comparison needs one)"})
    examples_per_shard: int = field(default=5_000, metadata={"help": "examples per TFRecord shard"})
    batch_size: int = field(default=1024, metadata={"help": "examples per scoring batch"})
    ceiling_files: int = field(default=20, metadata={
        "help": "files of the largest corpus scored by 1 vs 2 plain processes (0: skip)"})
    work_dir: Optional[str] = field(default=None, metadata={
        "help": "corpora are kept here between runs (default: a temp dir)"})
    verbose: bool = field(default=False, metadata={"help": console.VERBOSE_HELP})


def main(argv=None):
    args = parse_args(BeamScaleBenchArgs, argv, __doc__)
    from pipelines import synthetic_corpus

    work = args.work_dir or tempfile.mkdtemp(prefix="beam_scale_")
    os.makedirs(work, exist_ok=True)
    model = make_model(work)
    vector_files = test_vector(model, work)
    spec = synthetic_corpus.feature_spec("digits")
    runs, ok = [], True
    t0 = time.perf_counter()
    small = os.path.join(work, f"digits-{STARTUP_N}")
    if not os.path.exists(os.path.join(small, "DONE")):
        synthetic_corpus.write_corpus(small, n=STARTUP_N, kind="digits", shards=2)
        open(os.path.join(small, "DONE"), "w").close()
    startup = {}
    for runner in args.runners:
        for scorer in args.scorers:
            for w in sorted(set(args.workers) | set(args.large_workers)):
                out = os.path.join(work, "scores", f"startup-{runner}-{scorer}-{w}")
                startup[(runner, scorer, w)] = run_job(small, model, spec, scorer, runner, w, out, args.batch_size,
                                                       vector_files, args.verbose)["seconds"]
                shutil.rmtree(out, ignore_errors=True)
                print(f"[beam_scale] start-up {runner:6s} {scorer:15s} {w} worker(s): "
                      f"{startup[(runner, scorer, w)]:.1f} s ({STARTUP_N:,} examples)", flush=True)
    for i, n in enumerate(sorted(args.sizes)):
        corpus = os.path.join(work, f"digits-{n}")
        if not os.path.exists(os.path.join(corpus, "DONE")):
            shards = max(1, -(-n // args.examples_per_shard))
            t = time.perf_counter()
            synthetic_corpus.write_corpus(corpus, n=n, kind="digits", shards=shards)
            open(os.path.join(corpus, "DONE"), "w").close()
            print(f"[beam_scale] wrote {n:,} examples in {shards} shards ({time.perf_counter() - t:.0f} s)", flush=True)
        for runner in args.runners:
            for scorer in args.scorers:
                for w in (args.workers if i == 0 else args.large_workers):
                    out = os.path.join(work, "scores", f"{n}-{runner}-{scorer}-{w}")
                    shutil.rmtree(out, ignore_errors=True)
                    r = run_job(corpus, model, spec, scorer, runner, w, out, args.batch_size,
                                vector_files, args.verbose)
                    r.update(size=n, runner=runner, scorer=scorer, workers=w, examples_per_second=n / r["seconds"],
                             worker_cores_busy=r["worker_cpu_seconds"] / r["seconds"],
                             keys_out_equal_keys_in=keys_exactly_once(out, n))
                    ok &= r["keys_out_equal_keys_in"]
                    shutil.rmtree(out, ignore_errors=True)
                    runs.append(r)
                    print(f"[beam_scale] {n:>9,} {runner:6s} {scorer:15s} {w} worker(s): {r['seconds']:7.1f} s, "
                          f"{r['examples_per_second']:7.0f} examples/s, driver {r['driver_peak_rss_mb']:.0f} MB, "
                          f"largest worker {r['worker_peak_rss_mb']:.0f} MB, workers busy "
                          f"{r['worker_cores_busy']:.2f} cores, keys exactly once: "
                          f"{r['keys_out_equal_keys_in']}", flush=True)

    def nest(key):
        out = {}
        for r in runs:
            out.setdefault(str(r["size"]), {}).setdefault(r["runner"], {}).setdefault(r["scorer"], {})[
                str(r["workers"])] = r[key]
        return out
    def two_over_one(table):
        return {size: {rn: {sc: by_w["2"] / by_w["1"] for sc, by_w in d2.items() if {"1", "2"} <= set(by_w)}
                       for rn, d2 in d1.items()} for size, d1 in table.items()}
    eps = nest("examples_per_second")
    speedup = two_over_one(eps)
    # the same after taking off each job's fixed start-up (driver and workers importing TensorFlow,
    # loading the model, tracing): the wall time of the same job on a 1,000-example corpus
    for r in runs:
        base = startup.get((r["runner"], r["scorer"], r["workers"]))
        if base is not None and r["seconds"] > base:
            r["steady_examples_per_second"] = (r["size"] - STARTUP_N) / (r["seconds"] - base)
    steady_eps = nest("steady_examples_per_second") if all("steady_examples_per_second" in r for r in runs) else {}
    steady = two_over_one(steady_eps)
    growth = {}
    sizes = sorted({r["size"] for r in runs})
    if len(sizes) > 1:
        small, large = str(sizes[0]), str(sizes[-1])
        for key in ("driver_peak_rss_mb", "worker_peak_rss_mb"):
            table = nest(key)
            growth[key.replace("_mb", "_growth")] = {
                f"{rn}/{sc}/{w}": table[large][rn][sc][w] / table[small][rn][sc][w]
                for rn in table[large] for sc in table[large][rn] for w in table[large][rn][sc]
                if w in table[small].get(rn, {}).get(sc, {})}
    ceiling = {}
    if args.ceiling_files:
        import glob
        files = sorted(glob.glob(os.path.join(work, f"digits-{sorted(args.sizes)[-1]}", "data-*")))[:args.ceiling_files]
        for scorer in args.scorers:
            ceiling[scorer] = machine_ceiling(files, model, spec, scorer, vector_files)
            print(f"[beam_scale] the same work in 2 plain processes over 1 (no Beam, after set-up), {scorer}: "
                  f"{ceiling[scorer]:.2f}×", flush=True)
    report = {"examples_per_second": eps, "speedup_2_over_1_workers": speedup,
              "machine_ceiling_2_over_1_processes": ceiling,
              "startup_seconds": {f"{rn}/{sc}/{w}": v for (rn, sc, w), v in startup.items()},
              "steady_examples_per_second": steady_eps, "steady_speedup_2_over_1_workers": steady,
              "driver_peak_rss_mb": nest("driver_peak_rss_mb"), "worker_peak_rss_mb": nest("worker_peak_rss_mb"),
              "worker_cores_busy": nest("worker_cores_busy"),
              **growth, "keys_out_equal_keys_in": ok, "seconds": nest("seconds"),
              "examples_per_shard": args.examples_per_shard, "batch_size": args.batch_size,
              "machine_cores": os.cpu_count(), "wall_seconds": time.perf_counter() - t0}
    write_report(report, args.out, width=28)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The index page under load: latency of ``python -m tf_influence.serve`` answering 100 queries from 4
concurrent clients on loopback, against an index of 10⁵ real windows of the embedded corpus, then 100
malformed requests, then a last query.

    python -m benchmarks.serve [--out docs/results/serve.json] [--examples 100000]

The model is :mod:`experiments.evidence_lm`'s keras-hub GPT-2 (character vocabulary); the corpus is
``--examples`` windows of the embedded corpus at evenly spaced offsets (10⁵ distinct sequences of real
text); the index is built by :func:`tf_influence.build_index` with ``ProjectionArgs(max_dim=--dim)``. The server runs in its
own process, exactly as the command line starts it; each client sends its queries one after another
(``/api/query``, prompts and completions cut from the corpus). Writes per-query latencies' percentiles, the
answers' own compute time, and whether the server kept answering.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field


@dataclass
class ServeBenchArgs:
    out: str = field(default="docs/results/serve.json", metadata={"help": "the JSON file written"})
    workdir: str = field(default="reports/serve_bench", metadata={"help": "model, corpus and index"})
    examples: int = field(default=100_000, metadata={"help": "indexed sequences"})
    length: int = field(default=32, metadata={"help": "characters per sequence"})
    dim: int = field(default=1024, metadata={
        "help": "the index's projection budget (ProjectionArgs.max_dim): 10⁵ × 1,024 float32 = 410 MB, held in "
                "memory by the index (under its 1 GB cache), so a query is one matrix–vector product in memory"})
    queries: int = field(default=100, metadata={"help": "queries in all"})
    clients: int = field(default=4, metadata={"help": "concurrent clients"})
    malformed: int = field(default=100, metadata={"help": "malformed requests sent after the queries"})
    reuse: bool = field(default=False, metadata={"help": "reuse the model, corpus and index in --workdir"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(args: ServeBenchArgs) -> dict:
    import numpy as np
    import tensorflow as tf

    import tf_influence as tfi
    from experiments.evidence_lm import build_lm, write_corpus
    from model_zoo import text
    from tf_influence.lm import causal_lm_examples
    prose, code = text.load_corpus()
    stream = text.encode([" ".join(prose) + " " + code])[0]
    starts = np.linspace(0, len(stream) - args.length - 1, args.examples).astype(np.int64)
    ids = np.stack([stream[s:s + args.length] for s in starts]).astype(np.int32)
    x, y = causal_lm_examples(ids)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(256)
    t0 = time.perf_counter()
    lm = build_lm(args.length, 32, 2)
    lm.fit(ds.take(40), epochs=1, verbose=0)
    os.makedirs(args.workdir, exist_ok=True)
    model = os.path.join(args.workdir, "model.keras")
    lm.save(model)
    data = os.path.join(args.workdir, "data", "corpus-00000.tfrecord.gz")
    keys = write_corpus(data, ids)
    t1 = time.perf_counter()
    index = tfi.build_index(tfi.Objective(lm, include_model_losses=False), ds, os.path.join(args.workdir, "index"),
                            keys=keys, args=tfi.ProjectionArgs(max_dim=args.dim), progress=True)
    return {"model": model, "data": data, "index": os.path.join(args.workdir, "index"), "count": index.count,
            "dim": index.dim, "index_build_seconds": time.perf_counter() - t1, "train_seconds": t1 - t0,
            "n_params": int(lm.count_params()), "bytes": int(sum(os.path.getsize(os.path.join(index.directory, f))
                                                                for f in os.listdir(index.directory)))}


def main(argv=None):
    import numpy as np
    import requests

    from benchmarks.common import parse_args
    from model_zoo import text
    args = parse_args(ServeBenchArgs, sys.argv[1:] if argv is None else argv, __doc__)
    saved = os.path.join(args.workdir, "prepared.json")
    if args.reuse and os.path.exists(saved):
        with open(saved) as fh:
            prep = json.load(fh)
    else:
        prep = prepare(args)
        with open(saved, "w") as fh:
            json.dump(prep, fh, indent=1)
    print(f"index: {prep['count']:,} examples × {prep['dim']:,} ({prep['bytes'] / 2**20:.0f} MB)", flush=True)
    port = _free_port()
    cmd = [sys.executable, "-m", "tf_influence.serve", "--index", prep["index"], "--model", prep["model"],
           "--data", prep["data"], "--key-feature", "key", "--port", str(port)]
    t0 = time.perf_counter()
    log = open(os.path.join(args.workdir, "server.log"), "w")     # a file, not a pipe nobody reads: a full pipe
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)   # blocks the server's logging
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                requests.get(url + "/", timeout=1)
                break
            except requests.ConnectionError:
                if server.poll() is not None or time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"the server did not start: see {log.name}")
                time.sleep(0.5)
        startup = time.perf_counter() - t0
        prose, code = text.load_corpus()
        rng = np.random.default_rng(1)
        src = code
        qs = []
        for _ in range(args.queries):
            s = int(rng.integers(0, len(src) - 40))
            qs.append({"prompt": src[s:s + 12], "completion": src[s + 12:s + 20]})
        requests.get(url + "/api/query", params=qs[0], timeout=120)          # the first query traces
        lat, inner, codes = [], [], []
        lock = threading.Lock()

        def client(batch):
            for q in batch:
                t = time.perf_counter()
                r = requests.get(url + "/api/query", params=q, timeout=120)
                dt = time.perf_counter() - t
                with lock:
                    lat.append(dt)
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        inner.append(r.json()["seconds"])
        threads = [threading.Thread(target=client, args=(qs[i::args.clients],)) for i in range(args.clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        bad = [{"prompt": "", "completion": ""}, {"prompt": "ok", "completion": ""}, {"prompt": "é", "completion": "x"},
               {"prompt": "x" * 10_000, "completion": "y"}, {"completion": "no prompt"}, {"prompt": "\x00", "completion": "\x01"}]
        bad_codes = [requests.get(url + "/api/query", params=bad[i % len(bad)], timeout=120).status_code
                     for i in range(args.malformed)]
        last = requests.get(url + "/api/query", params=qs[1], timeout=120)
        res = {"machine": f"{os.cpu_count()} CPU cores", "index": prep, "startup_seconds": startup,
               "queries": len(lat), "clients": args.clients, "ok": int(sum(c == 200 for c in codes)),
               "p50_seconds": float(np.percentile(lat, 50)), "p99_seconds": float(np.percentile(lat, 99)),
               "mean_seconds": float(np.mean(lat)), "compute_p50_seconds": float(np.percentile(inner, 50)),
               "throughput_per_second": len(lat) / wall, "malformed": args.malformed,
               "malformed_answered_400": int(sum(c == 400 for c in bad_codes)),
               "answers_after_malformed": last.status_code == 200}
    finally:
        server.terminate()
        server.wait(30)
    print(f"{res['queries']} queries from {args.clients} clients: p50 {res['p50_seconds']:.3f} s, p99 "
          f"{res['p99_seconds']:.3f} s (compute p50 {res['compute_p50_seconds']:.3f} s); {res['malformed_answered_400']}"
          f"/{args.malformed} malformed answered 400; answering after: {res['answers_after_malformed']}")
    from benchmarks.common import write_json
    write_json(res, args.out)
    return res


if __name__ == "__main__":
    main()

"""Gradient index benchmark: quality of indexed scores against exact (unprojected) ones, build cost
against a training epoch, per-query cost against re-scoring the corpus, and size per example.

    python -m benchmarks.index --out docs/results/index.json [--models digits gpt2] [--digits-n 100000]

Per model, with the index's defaults (``ProjectionArgs()``: 7,680 int8 numbers, at most half the
gradient — 1,829 for the 3.7 k-parameter digits CNN —, shared by gradient norm with each block side
sized on its own; ``digits-k16`` measures the CNN with one k = 16 per block side for comparison):

* **queries**: the loss gradients of ``--queries`` held-out examples (TracIn / single-stage style
  test vectors; a multi-stage ``s`` is projected by the same code — ``tests/tf_influence/test_index.py``);
* **exact**: ``∇g(z)·q`` for every corpus example and query from unprojected per-example gradients
  (``per_example_dot``); ``recall_at_100`` (mean over queries and both sides, harmful and helpful,
  of the overlap of the index's top 100 with the exact top 100) and ``spearman_vs_exact`` (mean over
  queries of the rank correlation over the whole corpus), each over ``--seeds`` projection seeds (the
  same model and budget; each seed's mean kept in ``recall_at_100_by_seed`` / ``spearman_vs_exact_by_seed``);
* **cost**: ``index_build_seconds`` (projecting and writing the corpus, in process; the digits
  index projects in calls of ``index_batch_size`` = 1,024 examples, ``--digits-index-batch``) over
  ``train_epoch_seconds`` (one ``fit`` epoch over the same corpus and batch size, 256 for the digits,
  after a traced one; each the faster of two, alternated); ``seconds_per_query_index`` (project the query, score every indexed example, top-k both
  sides; averaged over a batch of queries; the index held in memory, as a query service keeps it —
  ``seconds_per_query_index_streamed`` reads every shard from disk for the batch) against ``seconds_per_query_exact`` (one forward-mode
  pass over the corpus for one query: what answering a new question costs without an index);
* ``--rerank R``: the same queries with ``QueryArgs(rerank=R)`` — the index's R best candidates per
  query and side re-scored with exact per-example gradients — ``recall_at_100_rerank`` and one query's
  ``seconds_per_query_rerank`` (``query_speedup_rerank`` against the exact pass).

Models: ``digits`` — the Table-A CNN on noisy copies of scikit-learn's digits (``--digits-n``
examples); ``gpt2`` — the keras-hub GPT-2 causal LM of ``benchmarks.hub`` (≈ 1.04 M parameters) on
windows of the embedded text corpus (``--gpt2-n`` sequences).
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from dataclasses import dataclass, field, replace

from tf_influence.console import quiet

quiet()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_influence as tfi  # noqa: E402
from benchmarks.common import parse_args, write_report  # noqa: E402
from tf_influence import gradients  # noqa: E402
from tf_influence.index import GradientIndex, build_index  # noqa: E402
from tf_influence.projection import ProjectionArgs  # noqa: E402

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def digits_case(n: int, n_queries: int, batch: int = 256, seed: int = 0):
    from sklearn.datasets import load_digits

    from model_zoo import cnn
    d = load_digits()
    rng = np.random.default_rng(seed)
    base = (d.images / 16.0).astype(np.float32)

    def noisy(m):
        idx = rng.integers(0, len(base), m)
        return np.clip(base[idx] + 0.1 * rng.standard_normal((m, 8, 8)), 0, 1).astype(np.float32)[..., None], \
            d.target[idx].astype(np.int64)
    x, y = noisy(n)
    xq, yq = noisy(n_queries)
    model = cnn.build_two_stage_models((8, 8, 1), 10, 2, seed=seed)[0]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=SCE)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    return model, SCE, ds, tf.data.Dataset.from_tensor_slices((xq, yq)).batch(batch)


def gpt2_case(n: int, n_queries: int, batch: int = 64, width: int = 168, layers: int = 3, length: int = 32):
    from benchmarks import hub
    from tf_influence.lm import CausalLMLoss
    _, lm, _ = hub.build(width, layers, length)
    ids = hub.corpus_windows(n + n_queries, length)
    loss = CausalLMLoss()
    lm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    _, _, ds = hub.lm_data(ids[:n], batch)
    _, _, qds = hub.lm_data(ids[n:], batch)
    return lm, loss, ds, qds


def _recall(index_keys, exact_scores, top, largest):
    order = np.argsort(-exact_scores if largest else exact_scores)[:top]
    return len(set(order.tolist()) & set(int(k) for k in index_keys[:top])) / top


def measure(name, model, loss, ds, qds, n_queries: int, top: int = 100, train_epochs: int = 2,
            args: ProjectionArgs | None = None, index_batch: int | None = None, rerank: int = 0,
            seeds: int = 1) -> dict:
    from scipy.stats import spearmanr
    # a trained model (the index is of a model someone trained), then timed epochs and index builds,
    # alternated twice; each cost is the faster of its two (this VM's speed drifts by up to 2× between
    # minutes), and the index kept is the one of the final weights
    model.fit(ds, epochs=train_epochs, verbose=0, shuffle=False)   # the dataset is batched in order (no Keras warning)
    obj = tfi.Objective(model, loss)
    group = tfi.ParameterGroup.from_model(model)
    args = args or ProjectionArgs()
    with tempfile.TemporaryDirectory() as tmp:
        epochs, builds = [], []
        for rep in range(2):
            t0 = time.perf_counter()
            model.fit(ds, epochs=1, verbose=0, shuffle=False)
            epochs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            index = build_index(obj, ds, os.path.join(tmp, f"index{rep}"), args=args, batch_size=index_batch)
            builds.append(time.perf_counter() - t0)
        epoch, build = min(epochs), min(builds)
        size = index.bytes_per_example()
        # queries: held-out loss gradients, unprojected [p, Q]
        Q = np.concatenate([g.numpy() for g in gradients.per_example_gradients(obj, qds, group, chunk_size=32)]).T
        Q = Q[:, :n_queries]
        proj = index.projector(obj)
        cold = GradientIndex(
            index.directory, cache_bytes=0)                          # streamed from disk on every query
        t0 = time.perf_counter()
        cold.query_projected(proj.project_vector(Q), tfi.QueryArgs(top_k=top, backend="exact"))
        per_query_cold = (time.perf_counter() - t0) / Q.shape[1]
        index.query_projected(proj.project_vector(Q[:, :1]), tfi.QueryArgs(top_k=top, backend="exact"))   # loads the shards
        t0 = time.perf_counter()
        res = index.query_projected(proj.project_vector(Q), tfi.QueryArgs(top_k=top, backend="exact"))
        per_query_index = (time.perf_counter() - t0) / Q.shape[1]
        all_res = index.query_projected(proj.project_vector(Q), tfi.QueryArgs(all_scores=True, backend="exact"))
        approx = all_res.scores                                      # [Q, N], index (= dataset) order
        assert [int(k) for k in all_res.keys] == list(range(index.count))
        by_seed = [(res, approx)]         # quality under further projection seeds (the same weights and budget)
        for extra in range(1, int(seeds)):
            other = build_index(obj, ds, os.path.join(tmp, f"seed{extra}"), args=replace(args, seed=args.seed + extra),
                                batch_size=index_batch)
            projected = other.projector(obj).project_vector(Q)
            by_seed.append((other.query_projected(projected, tfi.QueryArgs(top_k=top, backend="exact")),
                            other.query_projected(projected, tfi.QueryArgs(all_scores=True, backend="exact")).scores))
        if rerank:      # exact re-scoring of the index's candidates: one query, then all (quality)
            index.query(obj, Q[:, 1], tfi.QueryArgs(top_k=top, rerank=rerank), dataset=ds)          # traces the kernels
            t0 = time.perf_counter()
            index.query(obj, Q[:, 0], tfi.QueryArgs(top_k=top, rerank=rerank), dataset=ds)
            per_query_rerank = time.perf_counter() - t0
            reranked = index.query(obj, Q, tfi.QueryArgs(top_k=top, rerank=rerank), dataset=ds)
    t0 = time.perf_counter()
    gradients.per_example_dot(obj, ds, group, Q[:, 0], method="jvp")
    per_query_exact = time.perf_counter() - t0
    exact = gradients.per_example_dot(obj, ds, group, Q, method="jacobian", chunk_size=64)   # [N, Q]
    seed_recalls, seed_rhos = [], []
    for r, a in by_seed:
        seed_recalls.append([0.5 * (_recall(r.harmful_keys[q], exact[:, q], top, True)
                                    + _recall(r.helpful_keys[q], exact[:, q], top, False)) for q in range(Q.shape[1])])
        seed_rhos.append([spearmanr(a[q], exact[:, q]).statistic for q in range(Q.shape[1])])
    recalls, rhos = np.concatenate(seed_recalls), np.concatenate(seed_rhos)
    extra = {}
    if seeds > 1:
        extra = {"projection_seeds": int(seeds),
                 "recall_at_100_by_seed": [float(np.mean(r)) for r in seed_recalls],
                 "spearman_vs_exact_by_seed": [float(np.mean(r)) for r in seed_rhos]}
    if rerank:
        rr = [0.5 * (_recall(reranked.harmful_keys[q], exact[:, q], top, True)
                     + _recall(reranked.helpful_keys[q], exact[:, q], top, False)) for q in range(Q.shape[1])]
        extra = {**extra, "rerank": int(rerank), "recall_at_100_rerank": float(np.mean(rr)),
                 "recall_at_100_rerank_min": float(np.min(rr)), "seconds_per_query_rerank": per_query_rerank,
                 "query_speedup_rerank": per_query_exact / per_query_rerank}
    return {"model": name, "n_examples": int(index.count), "n_params": int(group.size), "k": int(index.meta.get("k", 0)),
            "dim": int(index.dim), "dtype": args.dtype,
            "index_build_seconds": build, "train_epoch_seconds": epoch, "build_over_epoch": build / epoch,
            "index_batch_size": index_batch,
            "index_bytes_per_example": float(size), "n_queries": int(Q.shape[1]),
            "recall_at_100": float(np.mean(recalls)), "recall_at_100_min": float(np.min(recalls)),
            "spearman_vs_exact": float(np.mean(rhos)), "spearman_vs_exact_min": float(np.min(rhos)),
            "seconds_per_query_index": per_query_index, "seconds_per_query_index_streamed": per_query_cold,
            "seconds_per_query_exact": per_query_exact,
            "query_speedup": per_query_exact / per_query_index,
            **extra, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _measured(cmd):
    """Run ``cmd`` as its own process: ``(seconds, PeakRSS of it and its workers)``; fails with its log."""
    import subprocess

    from benchmarks.beam_scale import PeakRSS
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    with PeakRSS(proc.pid) as rss:
        log, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(log.decode()[-3000:])
    return time.perf_counter() - t, rss


def scale_run(n: int, shards: int, root: str, workers: int = 2) -> dict:
    """The Beam build job over a synthetic digits corpus of ``n`` examples in ``shards`` files
    (DirectRunner, ``workers`` processes of one TensorFlow thread), then one streamed query batch
    through the query command; peak memory of the build's driver and largest worker and of the query
    process; every key exactly once."""
    import json
    import sys

    from benchmarks.beam_scale import make_model
    from pipelines import synthetic_corpus
    corpus = os.path.join(root, f"corpus-{n}")
    info = synthetic_corpus.write_corpus(corpus, n, "digits", shards=shards)
    model = make_model(root)
    out = os.path.join(root, f"index-{n}")
    cmd = [sys.executable, "-m", "tfx_components.beam_index", "build", "--examples", os.path.join(corpus, "data-*"),
           "--model", model, "--feature-spec", json.dumps(info["feature_spec"]), "--output", out, "--k", "16",
           "--worker-threads", "1", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    build, build_rss = _measured(cmd)
    index = GradientIndex(out, cache_bytes=0)
    seen = set()
    for keys, _ in index.iter_shards():
        seen.update(keys.tolist())
    group_size = tfi.ParameterGroup.from_model(keras.models.load_model(model)).size
    q = np.random.default_rng(0).normal(size=(group_size, 10)).astype(np.float32)
    np.save(os.path.join(root, "q.npy"), q)
    cmd = [sys.executable, "-m", "tfx_components.beam_index", "query", "--index", out, "--model", model, "--vector",
           os.path.join(root, "q.npy"), "--top-k", "100", "--backend", "exact", "--out", os.path.join(root, "q.json")]
    query, query_rss = _measured(cmd)
    return {"n_examples": n, "shards": shards, "workers": workers, "build_seconds": build,
            "build_driver_peak_rss_mb": build_rss.driver_mb, "build_worker_peak_rss_mb": build_rss.worker_mb,
            "query_seconds_10_queries": query, "query_peak_rss_mb": query_rss.driver_mb,
            "keys_exactly_once": bool(index.count == n and len(seen) == n),
            "index_bytes_per_example": index.bytes_per_example()}


@dataclass
class IndexBenchArgs:
    """The gradient index benchmark's options."""

    out: str = field(default="docs/results/index.json", metadata={"help": "JSON report path"})
    models: list[str] = field(default_factory=lambda: ["digits", "digits-k16", "gpt2"], metadata={
        "choices": ["digits", "digits-k16", "gpt2", "gpt2-uniform"],
        "help": "which models to measure (digits-k16: the digits CNN with one k = 16 per block side — the "
                "default budget sizes each side by gradient norm; gpt2-uniform: the GPT-2 with the budget split "
                "uniformly, for comparison). Entries of models not measured are kept from --out"})
    digits_n: int = field(default=100_000, metadata={"help": "corpus size of the digits CNN"})
    gpt2_n: int = field(default=2_000, metadata={"help": "corpus size (sequences) of the GPT-2 LM"})
    rerank: int = field(default=0, metadata={
        "help": "also measure QueryArgs.rerank with this many candidates per query and side (recall of the "
                "re-scored top 100, and one query's cost)"})
    digits_index_batch: int = field(default=1024, metadata={
        "help": "examples per projection call while building the digits index (build_index's batch_size; the "
                "timed training epoch keeps batches of 256); the GPT-2 index uses the dataset's batches"})
    queries: int = field(default=100, metadata={"help": "queries per model (held-out examples)"})
    seeds: int = field(default=3, metadata={
        "help": "projection seeds the quality is measured over (the same weights and budget; 0, 1, …): recall and "
                "Spearman are means over seeds and queries, their minima over both, and each seed's mean is kept — "
                "one draw of P moves recall@100 by about ±0.03 on the GPT-2 LM"})
    parts: list[str] = field(default_factory=lambda: ["quality", "scale"], metadata={
        "choices": ["quality", "scale"],
        "help": "quality: the per-model measurements; scale: the Beam build + a streamed query at --scale-sizes "
                "(results merged into --out)"})
    scale_sizes: list[int] = field(default_factory=lambda: [100_000, 1_000_000], metadata={
        "help": "corpus sizes of the scale part (5,000 examples per shard)"})


def main(argv=None):
    args = parse_args(IndexBenchArgs, argv, __doc__)
    import json
    previous = json.load(open(args.out)) if os.path.exists(args.out) else {}
    if "scale" in args.parts:
        runs = []
        with tempfile.TemporaryDirectory() as root:
            for n in args.scale_sizes:
                print(f"scale: {n} examples ...", flush=True)
                runs.append(scale_run(n, max(1, n // 5000), root))
                print(runs[-1], flush=True)
        scale = {"runs": runs}
        if len(runs) > 1:
            for key in ("build_driver_peak_rss_mb", "build_worker_peak_rss_mb", "query_peak_rss_mb"):
                scale[f"{key}_largest_over_smallest"] = runs[-1][key] / max(runs[0][key], 1e-9)
        previous["scale"] = scale
        if "quality" not in args.parts:
            write_report(previous, args.out)
            return
    models = []
    for name in args.models:
        keras.utils.set_random_seed(0)
        case = digits_case(args.digits_n, args.queries) if name.startswith("digits") else gpt2_case(
            args.gpt2_n, args.queries)
        print(f"measuring {name} ...", flush=True)
        pargs = {"digits-k16": ProjectionArgs(k=16), "gpt2-uniform": ProjectionArgs(allocation="uniform")}.get(name)
        label = name if not name.startswith("gpt2") or args.gpt2_n == 2000 else f"{name}-n{args.gpt2_n}"
        models.append(measure(label, *case, n_queries=args.queries, args=pargs,
                              index_batch=args.digits_index_batch if name.startswith("digits") else None,
                              rerank=args.rerank, seeds=args.seeds))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in models[-1].items()}, flush=True)
    measured = {m["model"] for m in models}
    models += [m for m in previous.get("models", []) if m["model"] not in measured]
    order = ["digits", "digits-k16", "gpt2", "gpt2-uniform"]
    models.sort(key=lambda m: (order.index(m["model"]) if m["model"] in order else len(order), m["model"]))
    # the top level holds the first model's figures (the names the issue asks for), `models` every model
    out = {**models[0], "models": models}
    if "scale" in previous:
        out["scale"] = previous["scale"]
    write_report(out, args.out)


if __name__ == "__main__":
    main()

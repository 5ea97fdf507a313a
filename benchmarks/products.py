"""The factor passes' two dense products, as ``tf.einsum`` wrote them before and as
:mod:`tf_influence.kfac.products` runs them, side by side in one process.

    python -m benchmarks.products --out docs/results/products.json

Per width ``d`` (the dense factor sides of the real-size models: 768, 1,024, 2,048 — the Llama's MLP —
and 3,072 — GPT-2 small's and BERT base's MLP) and a batch of ``--batch`` × ``--length`` float32 tokens:

* the covariance ``Σ x xᵀ``: ``einsum("bpi,bpj->ij")``, one ``[tokens, d]ᵀ @ [tokens, d]`` matmul, and
  :func:`~tf_influence.kfac.products.token_gram` with tiles of 256, 384 (the library's) and 512 columns, and
  the same in bfloat16 (``token_gram(..., dtype=tf.bfloat16)``, how ``product_dtype="auto"`` runs the sides of
  1,024 columns or more where the hardware multiplies bfloat16 natively) beside one bfloat16 matmul;
* the rotation ``x Q`` of every token: ``einsum("bpo,oc->bpc")`` and
  :func:`~tf_influence.kfac.products.token_matmul`.

Each is compiled, run once, then timed ``--repeats`` rounds of ``--calls`` calls, the variants interleaved
within a round (this machine's speed drifts); the median of the rounds is reported with each variant's largest
error against the same product in float64 NumPy, relative to the largest entry.

With ``--step-model`` (a model of :mod:`benchmarks.real_size`, e.g. ``gpt2-small``; random weights, nothing to
train) it also times that model's two whole compiled factor steps — the captured forward and backward pass and every
block's covariances; the same pass and every block's eigenvalue correction — with the products as ``tf.einsum``
wrote them before and as :mod:`~tf_influence.kfac.products` runs them: the operations in the step's graph, the
seconds to trace it, its first call (graph optimisation and the first run) and its median call after that. Each variant runs in a process of its own
(the first compiled step of a process also pays TensorFlow's one-time costs), after one eager forward pass.

With ``--sums-model`` it times that model's covariance pass as :func:`~tf_influence.kfac.fit_factors` runs it —
``FactorStatistics.add``, which keeps each dense side's running sum as its upper tiles and lets ``take`` complete
them once — against running sums of whole ``[d, d]`` matrices, to which every batch's mirrored and concatenated
``token_gram`` is added (how ``add`` ran before): both built in one process and called in turns, batch by batch
(the order alternating), with the wall and CPU seconds of each call and the largest difference of the two sums.
With ``--keep`` no widths are timed and the rest of ``--out`` is kept.

    python -m benchmarks.products --out docs/results/products.json --keep --sums-model llama-100m

With ``--dtype-model`` it times that model's two steps with each ``FactorArgs.product_dtype`` (``model``, ``bfloat16``,
``auto``), all built in one process and called in turns, so that the machine's drift reaches each alike.

    python -m benchmarks.products --out docs/results/products.json --step-model gpt2-small --dtype-model gpt2-small
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class ProductsArgs:
    out: str = field(default="docs/results/products.json", metadata={"help": "the JSON file written"})
    widths: list[int] = field(default_factory=lambda: [768, 1024, 2048, 3072], metadata={"help": "side widths"})
    batch: int = field(default=8, metadata={"help": "sequences per batch"})
    length: int = field(default=128, metadata={"help": "tokens per sequence"})
    repeats: int = field(default=5, metadata={"help": "timed rounds (median)"})
    calls: int = field(default=5, metadata={"help": "calls per round"})
    step_model: str = field(default="", metadata={
        "help": "also time this real-size model's compiled covariance and correction steps (benchmarks.real_size's "
                "models, random weights), tf.einsum against kfac.products, each in its own process; '' = skip"})
    step_calls: int = field(default=4, metadata={"help": "timed calls of the step after its first (median)"})
    dtype_model: str = field(default="", metadata={
        "help": "also time this real-size model's covariance and correction steps with each FactorArgs.product_dtype "
                "(model / auto / bfloat16), all in one process, called in turns; '' = skip"})
    dtype_rounds: int = field(default=4, metadata={"help": "--dtype-model: rounds after the first (median)"})
    sums_model: str = field(default="", metadata={
        "help": "also time this real-size model's covariance pass as fit_factors runs it (FactorStatistics.add: each "
                "dense side's running sum kept as its upper tiles) against whole-matrix running sums (each batch's "
                "token_gram added to a [d, d] variable, as before), both in one process, called in turns; '' = skip"})
    sums_sequences: int = field(default=48, metadata={"help": "--sums-model: sequences (batches of --batch)"})
    sums_rounds: int = field(default=2, metadata={"help": "--sums-model: passes over the sequences"})
    keep: bool = field(default=False, metadata={
        "help": "time no widths: run only the --step-model / --dtype-model / --sums-model parts asked for and keep "
                "the rest of --out as it is"})
    step_variant: str = field(default="", metadata={"help": "(internal) time one step variant in this process"})


def einsum_gram(x, block=None, dtype=None):
    """The covariance as ``tf.einsum`` wrote it before :func:`~tf_influence.kfac.products.token_gram` (in the
    inputs' dtype: that variant fits with ``product_dtype="model"``)."""
    import tensorflow as tf
    return tf.einsum("bpi,bpj->ij", x, x)


def einsum_rotation(x, m, dtype=None, cast_back=True):
    """The rotation as ``tf.einsum`` wrote it before :func:`~tf_influence.kfac.products.token_matmul` (in the
    inputs' dtype)."""
    import tensorflow as tf
    return tf.einsum("bpo,oc->bpc", x, m)


def variants() -> dict:
    """``{name: (what, fn(x, q))}``: the covariance and rotation variants compared."""
    import tensorflow as tf
    from tf_influence.kfac.products import token_gram, token_matmul

    def one_matmul(x, q):
        flat = tf.reshape(x, [-1, x.shape[-1]])
        return tf.matmul(flat, flat, transpose_a=True)
    return {
        "covariance: einsum": ("covariance", lambda x, q: einsum_gram(x)),
        "covariance: one matmul": ("covariance", one_matmul),
        "covariance: tiles of 256": ("covariance", lambda x, q: token_gram(x, 256)),
        "covariance: tiles of 384 (token_gram)": ("covariance", lambda x, q: token_gram(x, 384)),
        "covariance: tiles of 512": ("covariance", lambda x, q: token_gram(x, 512)),
        "covariance in bfloat16: one matmul": ("covariance", lambda x, q: token_gram(x, 10 ** 9, tf.bfloat16)),
        "covariance in bfloat16: tiles of 256": ("covariance", lambda x, q: token_gram(x, 256, tf.bfloat16)),
        "covariance in bfloat16: tiles of 384 (token_gram)": ("covariance",
                                                             lambda x, q: token_gram(x, 384, tf.bfloat16)),
        "covariance in bfloat16: tiles of 512": ("covariance", lambda x, q: token_gram(x, 512, tf.bfloat16)),
        "rotation: einsum": ("rotation", einsum_rotation),
        "rotation: one matmul (token_matmul)": ("rotation", token_matmul),
    }


def run(args: ProductsArgs) -> dict:
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)
    rows = []
    for d in args.widths:
        x = rng.standard_normal((args.batch, args.length, d)).astype("float32")
        q = np.linalg.qr(rng.standard_normal((d, d)))[0].astype("float32")
        flat = x.reshape(-1, d).astype("float64")
        exact = {"covariance": flat.T @ flat, "rotation": (flat @ q.astype("float64")).reshape(x.shape)}
        xt, qt = tf.constant(x), tf.constant(q)
        fns, row = {}, {"width": d, "tokens": args.batch * args.length, "variants": {}}
        for name, (what, fn) in variants().items():
            f = tf.function(fn)
            out = f(xt, qt).numpy()
            ref = exact[what]
            row["variants"][name] = {"what": what, "seconds": [],
                                     "max_error": float(np.abs(out - ref).max() / np.abs(ref).max())}
            fns[name] = f
        for _ in range(args.repeats):
            for name, f in fns.items():
                t = time.perf_counter()
                for _ in range(args.calls):
                    f(xt, qt).numpy()
                row["variants"][name]["seconds"].append((time.perf_counter() - t) / args.calls)
        for v in row["variants"].values():
            v["median_seconds"] = statistics.median(v["seconds"])
        for what, base in (("covariance", "covariance: einsum"), ("rotation", "rotation: einsum")):
            b = row["variants"][base]["median_seconds"]
            for name, v in row["variants"].items():
                if v["what"] == what:
                    v["speedup_over_einsum"] = b / v["median_seconds"]
        print(f"{d:>5}: " + ", ".join(f"{n} {v['median_seconds'] * 1e3:.1f} ms"
                                       for n, v in row["variants"].items()), flush=True)
        rows.append(row)
    return {"machine": {"cpus": os.cpu_count()}, "batch": args.batch, "length": args.length, "rows": rows}


#: The factor steps' variants: how the step's graph holds the products.
STEP_VARIANTS = ("einsum (before kfac.products)", "kfac.products")


def _step_world(name: str, args: ProductsArgs, sequences: int):
    """``(model, batches, step_stats(product_dtype))`` for timing ``name``'s factor steps: the model after one eager
    forward pass (Keras's own first-call work, outside the timing), its batches, and a function that builds a
    :class:`~tf_influence.kfac.FactorStatistics` with its two compiled steps — the correction in random orthonormal
    bases of the fitted sizes (one per size, shared: its cost does not depend on their values)."""
    import numpy as np
    import tensorflow as tf
    import tf_influence as tfi
    from benchmarks import real_size as rs
    from tf_influence.kfac import FactorStatistics
    from tf_influence.lm import CausalLMLoss
    rargs = rs.RealSizeArgs(batch=args.batch, length=args.length, sequences=sequences)
    model, _ = rs.build(name, rargs)
    ds, _, _, _ = rs.datasets(name, rargs)
    batches = list(ds)
    model(batches[0][0], training=False)
    rng, made = np.random.default_rng(0), {}

    def basis(n, diagonal):
        if diagonal:
            return np.zeros((0, 0), np.float32)
        if n not in made:
            made[n] = np.linalg.qr(rng.standard_normal((n, n)))[0].astype(np.float32)
        return made[n]

    def step_stats(product_dtype: str):
        stats = FactorStatistics(tfi.Objective(model, CausalLMLoss()), tfi.ParameterGroup.from_model(model),
                                 product_dtype=product_dtype)
        bases = stats._bases_as_tensors({b.name: {"QA": basis(b.rows, b.diag_in), "QS": basis(b.d_out, b.diag_out)}
                                         for b in stats.blocks})
        return stats, {"covariance": lambda x, y, i: stats._stats_fn(x, y, i, tf.float32),
                       "correction": lambda x, y, i: stats._correction_fn(x, y, i, bases, tf.float32)}
    return model, batches, step_stats


def _patch(variant: str) -> None:
    """Make the factor steps traced from now on use ``variant``'s products."""
    from tf_influence.kfac import statistics
    if variant == STEP_VARIANTS[0]:
        statistics.token_gram, statistics.token_matmul = einsum_gram, einsum_rotation


def time_step(args: ProductsArgs, variant: str) -> dict:
    """One variant of ``args.step_model``'s compiled covariance and correction steps, in this process: per step the
    graph's operations, its trace, first call and the median of ``args.step_calls`` calls after it (the correction
    in random orthonormal bases of the fitted sizes: its cost does not depend on their values)."""
    import tensorflow as tf
    _patch(variant)
    _, batches, step_stats = _step_world(args.step_model, args, args.batch * (args.step_calls + 1))
    _, kernels = step_stats("model")
    out = {"variant": variant}
    for what, fn in kernels.items():
        step = tf.function(fn, autograph=False)
        x, y = batches[0]
        t = time.perf_counter()
        graph = step.get_concrete_function(x, y, tf.constant(0, tf.int64)).graph
        traced = time.perf_counter() - t

        def call(i, x, y):
            t = time.perf_counter()
            tf.nest.map_structure(lambda a: a.numpy(), step(x, y, tf.constant(i, tf.int64)))
            return time.perf_counter() - t
        first = call(0, x, y)
        calls = [call(i, *b) for i, b in enumerate(batches[1:], 1)]
        out[what] = {"operations": len(graph.get_operations()), "trace_seconds": traced, "first_call_seconds": first,
                     "calls_seconds": calls, "median_call_seconds": statistics.median(calls)}
    return out


def step_rows(args: ProductsArgs) -> dict:
    """:func:`time_step` of every variant, each in a process of its own."""
    import json
    import subprocess
    import sys
    import tempfile
    out = {"model": args.step_model, "variants": []}
    for variant in STEP_VARIANTS:
        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
            subprocess.run([sys.executable, "-m", "benchmarks.products", "--out", fh.name, "--step-model",
                            args.step_model, "--step-calls", str(args.step_calls), "--batch", str(args.batch),
                            "--length", str(args.length), "--step-variant", variant], check=True)
            with open(fh.name) as saved:
                row = json.load(saved)
        for what in ("covariance", "correction"):
            r = row[what]
            print(f"{args.step_model} {what} step, {variant}: {r['operations']:,} operations, trace "
                  f"{r['trace_seconds']:.1f} s, first call {r['first_call_seconds']:.1f} s, then "
                  f"{r['median_call_seconds']:.2f} s", flush=True)
        out["variants"].append(row)
    return out


def dtype_rows(args: ProductsArgs) -> dict:
    """``args.dtype_model``'s compiled covariance and correction steps with each ``product_dtype``, built in one
    process and called in turns (a round calls every variant's two steps once; the first round, which traces and
    optimises, is left out), so that the machine's drift reaches every variant alike."""
    import tensorflow as tf
    from tf_influence.kfac.products import PRODUCT_DTYPES, native_bfloat16
    _, batches, step_stats = _step_world(args.dtype_model, args, args.batch * 4)
    steps, out = {}, {"model": args.dtype_model, "native_bfloat16": native_bfloat16(), "variants": {}}
    for dtype in PRODUCT_DTYPES:
        st, kernels = step_stats(dtype)
        steps[dtype] = {what: tf.function(fn, autograph=False) for what, fn in kernels.items()}
        low = sorted(f"{k}/{w}" for k, v in st.products().items() for w, d in v.items() if d == "bfloat16")
        out["variants"][dtype] = {"bfloat16_products": len(low), "products": sum(len(v) for v in st.products().values()),
                                  "covariance": [], "correction": []}
    for r in range(args.dtype_rounds + 1):
        for dtype, fns in steps.items():
            for what, fn in fns.items():
                x, y = batches[r % len(batches)]
                t = time.perf_counter()
                tf.nest.map_structure(lambda a: a.numpy(), fn(x, y, tf.constant(r, tf.int64)))
                if r:
                    out["variants"][dtype][what].append(time.perf_counter() - t)
    for dtype, v in out["variants"].items():
        for what in ("covariance", "correction"):
            v[f"median_{what}_seconds"] = statistics.median(v[what])
        print(f"{args.dtype_model} product_dtype={dtype} ({v['bfloat16_products']} of {v['products']} products in "
              f"bfloat16): covariance step {v['median_covariance_seconds']:.2f} s, correction step "
              f"{v['median_correction_seconds']:.2f} s", flush=True)
    return out


def sums_rows(args: ProductsArgs) -> dict:
    """``args.sums_model``'s covariance pass with the library's upper-tile running sums against whole-matrix ones
    (see the module docstring)."""
    import resource
    import numpy as np
    import tensorflow as tf
    _, batches, step_stats = _step_world(args.sums_model, args, args.sums_sequences)
    tiled, _ = step_stats("auto")
    whole, _ = step_stats("auto")

    def var(shape, dtype):
        return tf.Variable(tf.zeros(shape, dtype), trainable=False)
    into = {b.name: (var([b.rows], tf.float64) if b.diag_in else var([b.rows, b.rows], whole.compute),
                     var([b.d_out], tf.float64) if b.diag_out else var([b.d_out, b.d_out], whole.compute))
            for b in whole.blocks}
    diag = [var(v.shape, tf.float64) for v in whole.diag_vars]

    def whole_step(x, y, step):
        out, d, _ = whole._stats_fn(x, y, step, whole.compute)      # every dense side whole (token_gram)
        for k, (A, S, _) in out.items():
            into[k][0].assign_add(A)
            into[k][1].assign_add(S)
        for v, t in zip(diag, d):
            v.assign_add(t)
    whole_fn = tf.function(whole_step, autograph=False)
    run_ = {"upper tiles (FactorStatistics.add)": lambda x, y, i: tiled.add("covariances", x, y, i),
            "whole matrices": lambda x, y, i: whole_fn(x, y, tf.constant(i, tf.int64))}

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    out = {"model": args.sums_model, "sequences": args.sums_sequences, "rounds": args.sums_rounds, "variants": {}}
    for name, fn in run_.items():
        t = time.perf_counter()
        fn(*batches[0], 0)
        out["variants"][name] = {"first_call_seconds": time.perf_counter() - t, "wall": [], "cpu": []}
    names = list(run_)
    for r in range(args.sums_rounds):
        for i, (x, y) in enumerate(batches[1:], 1):
            for name in (names if (r + i) % 2 else names[::-1]):
                c, t = cpu(), time.perf_counter()
                run_[name](x, y, i)
                v = out["variants"][name]
                v["wall"].append(time.perf_counter() - t)
                v["cpu"].append(cpu() - c)
    got = tiled.take("covariances")
    diff = 0.0
    for b in whole.blocks:
        for side, v in zip(got["blocks"][b.name][:2], into[b.name]):
            ref = v.numpy()
            diff = max(diff, float(np.max(np.abs(side - ref)) / (np.max(np.abs(ref)) + 1e-30)))
    out["max_relative_difference"] = diff
    for name, v in out["variants"].items():
        v["median_wall_seconds"], v["median_cpu_seconds"] = statistics.median(v["wall"]), statistics.median(v["cpu"])
        print(f"{args.sums_model} covariance step, {name}: first call {v['first_call_seconds']:.1f} s, then "
              f"{v['median_wall_seconds']:.2f} s ({v['median_cpu_seconds']:.2f} CPU-s)", flush=True)
    print(f"largest difference of the sums, relative to the largest entry: {diff:.1e}", flush=True)
    return out


def main(argv=None):
    from benchmarks.common import parse_args, write_json
    args = parse_args(ProductsArgs, argv, __doc__)
    if args.step_variant:                       # one variant, in the process step_rows started for it
        write_json(time_step(args, args.step_variant), args.out)
        return
    if args.keep:                               # no widths: the file's other results stay
        import json
        kept = {}
        if os.path.exists(args.out):
            with open(args.out) as fh:
                kept = {k: v for k, v in json.load(fh).items() if k != "measured"}
        res = kept
    else:
        res = run(args)
    if args.sums_model:
        res["running_sums"] = sums_rows(args)
    if args.step_model:
        res["step"] = step_rows(args)
    if args.dtype_model:
        res["product_dtype"] = dtype_rows(args)
    write_json(res, args.out)


if __name__ == "__main__":
    main()

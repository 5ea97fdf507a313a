"""The factor passes' two dense products, as ``tf.einsum`` wrote them before and as
:mod:`tf_influence.kfac.products` runs them, side by side in one process.

    python -m benchmarks.products --out docs/results/products.json

Per width ``d`` (the dense factor sides of the real-size models: 768, 1,024, 2,048 — the Llama's MLP —
and 3,072 — GPT-2 small's and BERT base's MLP) and a batch of ``--batch`` × ``--length`` float32 tokens:

* the covariance ``Σ x xᵀ``: ``einsum("bpi,bpj->ij")``, one ``[tokens, d]ᵀ @ [tokens, d]`` matmul, and
  :func:`~tf_influence.kfac.products.token_gram` with tiles of 256 (the library's), 384 and 512 columns;
* the rotation ``x Q`` of every token: ``einsum("bpo,oc->bpc")`` and
  :func:`~tf_influence.kfac.products.token_matmul`.

Each is compiled, run once, then timed ``--repeats`` rounds of ``--calls`` calls, the variants interleaved
within a round (this machine's speed drifts); the median of the rounds is reported with each variant's largest
error against the same product in float64 NumPy, relative to the largest entry.
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


def variants() -> dict:
    """``{name: (what, fn(x, q))}``: the covariance and rotation variants compared."""
    import tensorflow as tf
    from tf_influence.kfac.products import token_gram, token_matmul

    def one_matmul(x, q):
        flat = tf.reshape(x, [-1, x.shape[-1]])
        return tf.matmul(flat, flat, transpose_a=True)
    return {
        "covariance: einsum": ("covariance", lambda x, q: tf.einsum("bpi,bpj->ij", x, x)),
        "covariance: one matmul": ("covariance", one_matmul),
        "covariance: tiles of 256 (token_gram)": ("covariance", lambda x, q: token_gram(x, 256)),
        "covariance: tiles of 384": ("covariance", lambda x, q: token_gram(x, 384)),
        "covariance: tiles of 512": ("covariance", lambda x, q: token_gram(x, 512)),
        "rotation: einsum": ("rotation", lambda x, q: tf.einsum("bpo,oc->bpc", x, q)),
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


def main(argv=None):
    from benchmarks.common import parse_args, write_json
    args = parse_args(ProductsArgs, argv, __doc__)
    res = run(args)
    write_json(res, args.out)


if __name__ == "__main__":
    main()

"""Synthetic corpora at scale, in the pipelines' own ``tf.Example`` formats, for scale tests and
benchmarks (nothing is downloaded; memory stays bounded by one shard's buffer).

    python -m pipelines.synthetic_corpus --kind digits --n 1000000 --shards 16 --out /tmp/corpus/digits
    python -m pipelines.synthetic_corpus --kind tokens --n 100000 --out /tmp/corpus/tokens

* ``digits``: the format of :mod:`pipelines.digits_data` — ``key`` (bytes), ``image`` (64 floats,
  8×8×1 in [0, 1]), ``label`` (int64, ``--classes`` classes); each image is a class template plus
  noise, so a model can learn the labels.
* ``tokens``: the format of :mod:`pipelines.text_data` — ``key``, ``inputs`` / ``targets`` (``--seq-len``
  token ids of a ``--vocab`` vocabulary, next-token prediction) drawn from a fixed random bigram model.

Files: ``<out>/data-<shard>-of-<shards>.tfrecord.gz`` (GZIP), example ``i`` in shard ``i % shards``,
keys ``<kind>-<i:09d>`` (unique, sortable). The content is a pure function of ``(kind, n, seed)``
and the shard count: rerunning writes identical files. ``FEATURE_SPECS[kind]`` is the scorers'
``feature_spec``.

>>> import tempfile
>>> out = tempfile.mkdtemp()
>>> write_corpus(out, n=10, kind="digits", shards=2)["examples"]
10
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from pipelines import digits_data, text_data

FEATURE_SPECS = {
    "digits": digits_data.FEATURE_SPEC,
    "tokens": lambda seq_len: {"x": {"name": "inputs", "shape": [seq_len], "dtype": "int32"},
                               "y": {"name": "targets", "shape": [seq_len], "dtype": "int64"}, "key": "key"},
}
KINDS = ("digits", "tokens")
#: Examples generated per vectorised chunk (bounded memory whatever ``n`` is).
CHUNK = 4096


def feature_spec(kind: str, seq_len: int = 32) -> dict:
    """The scorers' ``feature_spec`` of a synthetic corpus."""
    if kind not in KINDS:
        raise ValueError(f"unknown corpus kind '{kind}'; choose one of {KINDS}")
    spec = FEATURE_SPECS[kind]
    return spec(seq_len) if callable(spec) else dict(spec)


def _digits_chunk(rng, templates, n):
    labels = rng.integers(0, len(templates), n)
    images = np.clip(templates[labels] + 0.25 * rng.standard_normal((n, 64)), 0.0, 1.0)
    return images.astype(np.float32).reshape(n, 8, 8, 1), labels


def _tokens_chunk(rng, cdf, n, seq_len):
    ids = np.empty((n, seq_len + 1), np.int64)
    ids[:, 0] = rng.integers(0, cdf.shape[0], n)
    for t in range(1, seq_len + 1):  # bigram model: inverse-CDF sampling per row
        u = rng.random(n)
        ids[:, t] = np.minimum((cdf[ids[:, t - 1]] < u[:, None]).sum(axis=1), cdf.shape[0] - 1)
    return ids


def write_corpus(out_dir: str, n: int, kind: str = "digits", shards: int = 8, seed: int = 0, classes: int = 4,
                 seq_len: int = 32, vocab: int = 256, progress: bool = False) -> dict:
    """Write ``n`` examples to ``shards`` GZIP TFRecord files under ``out_dir``; returns a summary
    (``examples``, ``shards``, ``files``, ``feature_spec``, ``seconds``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown corpus kind '{kind}'; choose one of {KINDS}")
    if n < 1 or shards < 1:
        raise ValueError(f"need n ≥ 1 and shards ≥ 1, got n={n}, shards={shards}")
    t0 = time.perf_counter()
    tf.io.gfile.makedirs(out_dir)
    rng = np.random.default_rng(seed)
    templates = rng.random((classes, 64))
    probs = rng.dirichlet(np.full(vocab, 0.1), size=vocab)
    cdf = np.cumsum(probs, axis=1)
    files = [os.path.join(out_dir, f"data-{s:05d}-of-{shards:05d}.tfrecord.gz") for s in range(shards)]
    writers = [tf.io.TFRecordWriter(f + ".tmp", options="GZIP") for f in files]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=f"writing {kind} corpus", unit="ex")
    try:
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            if kind == "digits":
                images, labels = _digits_chunk(rng, templates, m)
                recs = [digits_data._example(f"digits-{start + i:09d}".encode(), images[i], labels[i])
                        for i in range(m)]
            else:
                ids = _tokens_chunk(rng, cdf, m, seq_len)
                recs = [text_data._example(f"tokens-{start + i:09d}".encode(), ids[i]) for i in range(m)]
            for i, r in enumerate(recs):
                writers[(start + i) % shards].write(r)
            if bar is not None:
                bar.update(m)
    finally:
        for w in writers:
            w.close()
        if bar is not None:
            bar.close()
    for f in files:
        tf.io.gfile.rename(f + ".tmp", f, overwrite=True)
    return {"examples": int(n), "shards": int(shards), "files": files, "feature_spec": feature_spec(kind, seq_len),
            "seconds": time.perf_counter() - t0}


@dataclass
class CorpusArgs:
    """What ``write_corpus`` writes (the command's flags)."""

    n: int = field(metadata={"help": "number of examples"})
    out: str = field(metadata={"help": "output directory (local or gs://)"})
    kind: str = field(default="digits", metadata={"choices": KINDS, "help": "digits (8x8 images) or tokens (sequences)"})
    shards: int = field(default=8, metadata={"help": "number of output files (parallelism of the scoring jobs)"})
    seed: int = field(default=0, metadata={"help": "random seed (the same seed gives byte-identical files)"})
    classes: int = field(default=4, metadata={"help": "digits: number of classes"})
    seq_len: int = field(default=32, metadata={"help": "tokens: sequence length"})
    vocab: int = field(default=256, metadata={"help": "tokens: vocabulary size"})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got '{self.kind}'")


def main(argv=None):
    from tf_influence.cli import add_arguments, from_args
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, CorpusArgs)
    args = from_args(CorpusArgs, ap.parse_args(argv), parser=ap)
    summary = write_corpus(args.out, args.n, args.kind, args.shards, args.seed, args.classes, args.seq_len,
                           args.vocab, progress=True)
    summary["files"] = len(summary["files"])
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Reading and writing per-example scores as TFRecord files (the ``InfluenceScores`` layout).

Each record is a ``tf.train.Example`` with ``key`` (bytes: the example's stable key), ``score``
(float) and optionally ``row`` (float list: one value per test point for a matrix of scores).
Files are GZIP-compressed; a directory holds ``scores-*.tfrecord.gz`` shards. No TFX needed.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from .errors import require_finite
from . import selection

PATTERN = "scores-*.tfrecord.gz"


def encode_score(key, score: float, row=None) -> bytes:
    key = key if isinstance(key, bytes) else str(key).encode()
    feats = {"key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
             "score": tf.train.Feature(float_list=tf.train.FloatList(value=[float(score)]))}
    if row is not None:
        feats["row"] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in row]))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def decode_score(record: bytes):
    ex = tf.train.Example.FromString(record)
    f = ex.features.feature
    if "key" not in f or "score" not in f:
        raise ValueError("score record without 'key' or 'score' feature")
    row = list(f["row"].float_list.value) if "row" in f else None
    return f["key"].bytes_list.value[0], f["score"].float_list.value[0], row


def write_scores(directory: str, keys, scores, rows=None, shard: int = 0) -> str:
    """Write one shard; returns its path."""
    keys, scores = list(keys), np.asarray(scores, dtype=np.float64)
    if len(keys) != len(scores):
        raise ValueError(f"{len(keys)} keys but {len(scores)} scores")
    require_finite(scores, "scores", keys)
    tf.io.gfile.makedirs(directory)
    path = os.path.join(directory, f"scores-{shard:05d}.tfrecord.gz")
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for i, (k, s) in enumerate(zip(keys, scores)):
            w.write(encode_score(k, s, None if rows is None else rows[i]))
    return path


def read_scores(directory: str) -> dict:
    """``{key: score}`` of every shard in ``directory``; raises on duplicate keys or no files."""
    files = sorted(tf.io.gfile.glob(os.path.join(directory, PATTERN)))
    if not files:
        raise FileNotFoundError(f"no score files ({PATTERN}) in {directory}")
    out = {}
    for rec in tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator():
        key, score, _ = decode_score(rec)
        if key in out:
            raise ValueError(f"duplicate score for key {key!r} in {directory}")
        out[key] = score
    return out


def select_kept(scores: dict, mode: str, value: float) -> set:
    """Keys to keep from a ``{key: score}`` table (:func:`tf_influence.selection.select_kept`, ties by key)."""
    keys = list(scores)
    mask = selection.select_kept([scores[k] for k in keys], mode, value, keys=keys)
    return {k for k, keep in zip(keys, mask) if keep}

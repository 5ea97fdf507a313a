"""Helpers shared by the tf-influence TFX executors (artifact layout, decoding, summaries)."""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf
from tfx.types import artifact_utils

from tf_influence import scores_io
from tfx_components import example_io


def split_pattern(examples, split: str) -> str:
    """File pattern of one split of an Examples artifact; raises naming the artifact if absent."""
    names = artifact_utils.decode_split_names(examples.split_names)
    if split not in names:
        raise ValueError(f"Examples artifact {examples.uri} has no split '{split}' (it has {names})")
    d = os.path.join(examples.uri, f"Split-{split}")
    files = [f for f in tf.io.gfile.glob(os.path.join(d, "*")) if not tf.io.gfile.isdir(f)]
    if not files:
        raise ValueError(f"Examples artifact {examples.uri}: split '{split}' has no files in {d}")
    return os.path.join(d, "*")


def read_records(files, desc: str, limit: int | None = None) -> list:
    """Serialized records of GZIP TFRecord ``files`` (the one reader of example files outside Beam),
    the first ``limit`` only if given (streamed: the rest is never read);
    raises naming ``desc`` if there are no files, a file is corrupt or nothing is in them."""
    files = list(files)
    if not files:
        raise ValueError(f"{desc}: no files")
    try:
        ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
        records = list((ds.take(limit) if limit is not None else ds).as_numpy_iterator())
    except tf.errors.DataLossError as err:
        raise ValueError(f"{desc}: corrupt TFRecord ({err.message})") from None
    if not records:
        raise ValueError(f"{desc} is empty")
    return records


def glob_files(patterns) -> list:
    """Files of one or several patterns or directories (a directory means all files in it)."""
    files = []
    for p in patterns if isinstance(patterns, (list, tuple)) else [patterns]:
        files.extend(tf.io.gfile.glob(p if any(ch in p for ch in "*?[") else os.path.join(p, "*")))
    return sorted(f for f in files if not tf.io.gfile.isdir(f))


def split_files(examples, split: str) -> list:
    """The files of one split of an Examples artifact, sorted (raises naming the artifact if none)."""
    return sorted(tf.io.gfile.glob(split_pattern(examples, split)))


def read_split(examples, split: str, limit: int | None = None) -> list:
    """Serialized ``tf.train.Example``s of one split of an Examples artifact (the first ``limit``)."""
    return read_records(split_files(examples, split), f"Examples artifact {examples.uri}, split '{split}'", limit)


def load_split(examples, split: str, spec: dict, limit: int | None = None):
    """``(keys, x, y)`` of a split, or of its first ``limit`` examples (driver side: finetuning data,
    test points, Hessian samples). Read file by file, so that examples without a key feature get the
    same file-and-position keys as in the Beam jobs."""
    desc = f"Examples artifact {examples.uri}, split '{split}'"
    keys, xs, ys = [], [], []
    for f in split_files(examples, split):
        left = None if limit is None else limit - len(keys)
        if left == 0:
            break
        ds = tf.data.TFRecordDataset(f, compression_type="GZIP")
        try:
            recs = list((ds if left is None else ds.take(left)).as_numpy_iterator())
        except tf.errors.DataLossError as err:
            raise ValueError(f"{desc}: corrupt TFRecord {f} ({err.message})") from None
        if not recs:
            continue
        k, x, y = example_io.decode_batch(recs, spec, desc, file=f)
        keys += k
        xs.append(x)
        ys.append(y)
    if not keys:
        raise ValueError(f"{desc} is empty")
    return keys, _concat(xs), np.concatenate(ys)


def _concat(xs):
    if isinstance(xs[0], dict):
        return {k: np.concatenate([x[k] for x in xs]) for k in xs[0]}
    return np.concatenate(xs)


def first_record(examples, split: str) -> bytes:
    """The first serialized example of a split (what a derived feature spec is checked against)."""
    return read_split(examples, split, limit=1)[0]


def feature_spec(exec_properties: dict, input_dict: dict, model, examples, split: str) -> dict:
    """The feature spec of a component: its hand-written ``feature_spec`` parameter, or one derived
    from ``model``'s inputs and the ``transform_graph`` / ``schema`` inputs (else the split's first
    example), with its ``label_key`` / ``key_feature`` parameters (:mod:`tfx_components.example_io`)."""
    tg = input_dict.get("transform_graph") or []
    sc = input_dict.get("schema") or []
    desc = f"Examples artifact {examples.uri}, split '{split}'"
    try:
        return example_io.resolve_feature_spec(
            model, exec_properties.get("feature_spec") or None,
            schema=artifact_utils.get_single_instance(sc).uri if sc else None,
            transform_graph=artifact_utils.get_single_instance(tg).uri if tg else None,
            sample_record=first_record(examples, split), label_key=exec_properties.get("label_key") or None,
            key_feature=exec_properties.get("key_feature") or None, desc=desc)
    except ValueError as err:
        raise ValueError(f"{desc}: {err}") from None


def count_records(files, desc: str) -> int:
    """Records in GZIP TFRecord ``files``, streamed (one record at a time, none kept)."""
    try:
        return int(tf.data.TFRecordDataset(list(files), compression_type="GZIP").reduce(
            np.int64(0), lambda c, _: c + 1))
    except tf.errors.DataLossError as err:
        raise ValueError(f"{desc}: corrupt TFRecord ({err.message})") from None


def sample_split(examples, split: str, spec: dict, n: int, seed: int = 0):
    """``(x, y)`` of the ``n`` examples of a split at the positions
    :func:`tf_influence.objective.subsample_mask` draws — the subset ``subsample`` takes of the split
    loaded in memory — in two streamed passes (count, pick); only the ``n`` picked records are held
    (the Hessian subsample, iterated by every Hessian-vector product, then lives in memory)."""
    from tf_influence.objective import subsample_mask
    desc = f"Examples artifact {examples.uri}, split '{split}'"
    files = split_files(examples, split)
    total = count_records(files, desc)
    if total == 0:
        raise ValueError(f"{desc} is empty")
    mask = subsample_mask(total, n, seed)
    try:
        picked = [r for i, r in enumerate(tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator())
                  if mask[i]]
    except tf.errors.DataLossError as err:
        raise ValueError(f"{desc}: corrupt TFRecord ({err.message})") from None
    _, x, y = example_io.decode_batch(picked, spec, desc)
    return x, y


def stream_split(examples, split: str, spec: dict, batch_size: int = 256):
    """A ``tf.data.Dataset`` of batched ``(x, y)`` read from the split's files as it is iterated —
    the driver holds one batch, never the split. The first record is decoded up front so a missing
    or misshaped feature is named before any pass starts."""
    desc = f"Examples artifact {examples.uri}, split '{split}'"
    example_io.decode_batch(read_split(examples, split, limit=1), spec, desc)  # clear feature errors
    return example_io.dataset(
        tf.data.TFRecordDataset(split_files(examples, split), compression_type="GZIP").batch(batch_size), spec)


def split_keys(examples, split: str, key_feature: str | None) -> list:
    """The keys of a split's examples in file order — the order :func:`stream_split` yields them —
    as the Beam jobs give them (the key feature, or file and position); only the keys are held."""
    desc = f"Examples artifact {examples.uri}, split '{split}'"
    keys = []
    for f in split_files(examples, split):
        try:
            for batch, _ in example_io.keyed_batches(f, key_feature, desc):
                keys += batch
        except IOError as err:                     # a corrupt file: named, with the artifact
            raise ValueError(f"{desc}: {err}") from None
    return keys


#: What this package writes in an execution's temporary folder: scorers' files until published,
#: ScoreFilter's Beam output (with Beam's beam-temp-* shards) until moved into the output artifact.
EXECUTION_TEMPORARIES = ("scores", "staged")


def remove_stale_execution_temporaries(own_tmp: str) -> list:
    """Remove what killed earlier executions of the same component left in their temporary folders
    (TFX's ``<component>/.system/executor_execution/<id>/.temp/<id>/``: TFX empties it after a successful
    execution, but nothing runs after a SIGKILL). Only this package's own temporaries
    (:data:`EXECUTION_TEMPORARIES`) of *other* executions are removed. Returns the removed paths."""
    own = own_tmp.rstrip("/")
    marker = f"{os.sep}executor_execution{os.sep}"
    if marker not in own:
        return []
    exec_root = own[:own.index(marker) + len(marker)]      # TFX's tmp path: <exec_root><id>/.temp/<id>/
    removed = []
    for name in EXECUTION_TEMPORARIES:
        for path in tf.io.gfile.glob(os.path.join(exec_root, "*", ".temp", "*", name)):
            if not path.startswith(own + os.sep):
                tf.io.gfile.rmtree(path)
                removed.append(path)
    return removed


class BeamStageError(RuntimeError):
    """A Beam stage of a component failed; the message names the component's input artifacts."""


def run_beam(executor, build, what: str, output_dirs=()):
    """Run ``build(pipeline)`` in the executor's Beam pipeline; re-raise failures naming ``what``
    (e.g. a corrupt TFRecord in an Examples artifact). ``output_dirs``: the output folders whose
    temporaries (``.tmp-*``, ``beam-temp-*``) are removed before the run and after a failure, so no
    partial file stays beside the published ones."""
    from tfx_components.beam_scoring import remove_temporaries  # noqa: I001 (beam_scoring imports Beam)
    remove_stale_execution_temporaries(executor._get_tmp_dir())
    for d in output_dirs:
        remove_temporaries(d)
    try:
        with executor._make_beam_pipeline() as p:
            build(p)
    except Exception as err:  # Beam wraps worker errors in several layers; keep the root message
        for d in output_dirs:
            remove_temporaries(d)
        msg = str(err).strip().splitlines()
        root = next((line for line in reversed(msg) if "Error" in line), msg[-1] if msg else repr(err))
        raise BeamStageError(f"{what}: {root}") from err


def model_path(model) -> str:
    return os.path.join(model.uri, "Format-Serving")


def _score_chunks(scores_dir: str, chunk: int = 65536):
    """``(keys, scores)`` chunks of a split's score files, streamed (one chunk in memory)."""
    files = sorted(tf.io.gfile.glob(os.path.join(scores_dir, scores_io.PATTERN)))
    if not files:
        raise FileNotFoundError(f"no score files ({scores_io.PATTERN}) in {scores_dir}")
    keys, vals = [], []
    for rec in tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator():
        k, v, _ = scores_io.decode_score(rec)
        keys.append(k)
        vals.append(v)
        if len(vals) == chunk:
            yield keys, np.asarray(vals, np.float64)
            keys, vals = [], []
    if vals:
        yield keys, np.asarray(vals, np.float64)


def summarize(scores_dir: str, top_k: int = 10, chunk: int = 65536) -> dict:
    """Count, mean, std, min, max, a 20-bin histogram (``np.histogram``'s bins) and the top-k /
    bottom-k keys of a split, in two streamed passes over its score files: memory is one chunk and
    the 2·top_k kept pairs, whatever the corpus size. Ties are ordered by key."""
    import heapq
    n, mean, m2 = 0, 0.0, 0.0
    lo, hi = np.inf, -np.inf
    top, bottom = [], []  # heaps of (score, key) / (-score, negated order via key)
    for keys, vals in _score_chunks(scores_dir, chunk):
        if not np.all(np.isfinite(vals)):
            bad = keys[int(np.argmin(np.isfinite(vals)))]
            raise ValueError(f"non-finite score for key {bad!r} in {scores_dir}")
        k = len(vals)
        cm = float(vals.mean())
        cm2 = float(((vals - cm) ** 2).sum())
        delta = cm - mean
        tot = n + k
        mean += delta * k / tot
        m2 += cm2 + delta * delta * n * k / tot
        n = tot
        lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
        top = heapq.nlargest(top_k, top + [(float(v), key) for v, key in zip(vals, keys)])
        bottom = heapq.nsmallest(top_k, bottom + [(float(v), key) for v, key in zip(vals, keys)])
    if n == 0:
        raise ValueError(f"no scores in {scores_dir}")
    edges = np.histogram_bin_edges([lo, hi], bins=20)
    hist = np.zeros(20, dtype=np.int64)
    for _, vals in _score_chunks(scores_dir, chunk):
        hist += np.histogram(vals, bins=edges)[0]
    return {"count": int(n), "mean": mean, "std": float(np.sqrt(m2 / n)), "min": lo, "max": hi,
            "histogram": {"counts": hist.tolist(), "edges": edges.tolist()},
            "top_keys": [key.decode(errors="replace") for _, key in top],
            "bottom_keys": [key.decode(errors="replace") for _, key in bottom]}


def record_summary(artifact, summaries: dict):
    artifact.set_string_custom_property("summary", json.dumps(summaries, sort_keys=True))
    artifact.set_int_custom_property("num_scored", int(sum(s["count"] for s in summaries.values())))

"""Real TFRecord artifacts for the TFX component tests (no mocks)."""

import os

import numpy as np
import tensorflow as tf

from tf_influence import scores_io

from pipelines.summary import BEAM_SETUP_FILE

#: Beam in this process: for tests whose subject is not Beam's multi-processing mode. (``--setup_file``
#: as the pipelines pass it: without a dependency flag every TFX Beam executor builds an ephemeral sdist.)
BEAM_IN_PROCESS = ["--direct_running_mode=in_memory", "--direct_num_workers=1", *BEAM_SETUP_FILE]
#: The DirectRunner's multi-processing mode with 2 workers: for the tests that exist to exercise it.
BEAM_MULTIPROCESSING = ["--direct_running_mode=multi_processing", "--direct_num_workers=2", *BEAM_SETUP_FILE]


def example(key: bytes, image, label: int) -> bytes:
    f = {"key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
         "image": tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(image).tolist())),
         "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}
    return tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()


def write_examples(uri: str, splits: dict, shards: int = 2) -> dict:
    """``splits``: name → (keys, images, labels). Writes ``<uri>/Split-<name>/data_tfrecord-*.gz``.
    Returns name → {key: serialized example}."""
    out = {}
    for name, (keys, images, labels) in splits.items():
        d = os.path.join(uri, f"Split-{name}")
        tf.io.gfile.makedirs(d)
        recs = {k: example(k, im, lb) for k, im, lb in zip(keys, images, labels)}
        items = list(recs.values())
        for s in range(shards):
            with tf.io.TFRecordWriter(os.path.join(d, f"data_tfrecord-{s:05d}-of-{shards:05d}.gz"),
                                      options="GZIP") as w:
                for r in items[s::shards]:
                    w.write(r)
        out[name] = recs
    return out


def read_examples(split_dir: str) -> list:
    """Serialized examples of a split directory, through the components' one reader."""
    from tfx_components.common import glob_files, read_records
    return read_records(glob_files(split_dir), split_dir)


def digits_splits(n_train=60, n_eval=20, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda n, tag: ([f"{tag}-{i:04d}".encode() for i in range(n)], rng.random((n, 8, 8)),  # noqa: E731
                         rng.integers(0, 4, n))
    return {"train": mk(n_train, "train"), "eval": mk(n_eval, "eval")}


def write_scores(uri: str, split: str, keys, scores):
    return scores_io.write_scores(os.path.join(uri, f"Split-{split}"), keys, scores)

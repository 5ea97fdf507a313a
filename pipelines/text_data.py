"""Write the embedded text (stdlib docstrings, with injected noise) as TFRecord ``tf.Example``s for
``presence_pipeline``: ``<out>/train/`` (the noisy pool: clean windows + 10 % jumbled + 10 % code)
and ``<out>/test/`` (held-out clean windows). Features: ``key`` (bytes; ``noise-*`` for injected
windows), ``inputs`` and ``targets`` (64 character ids each, next-character prediction)."""

import os

import numpy as np
import tensorflow as tf

from model_zoo import text

FEATURE_SPEC = {"x": {"name": "inputs", "shape": [64], "dtype": "int32"},
                "y": {"name": "targets", "shape": [64], "dtype": "int64"}, "key": "key"}


def _example(key: bytes, ids) -> bytes:
    f = {"key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
         "inputs": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in ids[:-1]])),
         "targets": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in ids[1:]]))}
    return tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()


def write(out_dir: str, n_train: int = 2400, n_test: int = 500, noise_fraction: float = 0.2, seed: int = 1234):
    prose, code = text.load_corpus()
    rng = np.random.default_rng(seed)
    clean = text.windows(" ".join(prose), 65)
    clean = [clean[i] for i in rng.permutation(len(clean))]
    code_w = text.windows(code, 65)
    code_w = [code_w[i] for i in rng.permutation(len(code_w))]
    n_noise = int(round(noise_fraction * n_train))
    pool = [(f"clean-{i:05d}", s) for i, s in enumerate(clean[n_test:n_test + n_train - n_noise])]
    pool += [(f"noise-jumbled-{i:05d}", text.jumble(s, rng))
             for i, s in enumerate(clean[n_test + n_train:n_test + n_train + n_noise // 2])]
    pool += [(f"noise-code-{i:05d}", s) for i, s in enumerate(code_w[:n_noise - n_noise // 2])]
    parts = {"train": pool, "test": [(f"test-{i:05d}", s) for i, s in enumerate(clean[:n_test])]}
    for name, items in parts.items():
        path = os.path.join(out_dir, name)
        tf.io.gfile.makedirs(path)
        target = os.path.join(path, "data.tfrecord.gz")
        if tf.io.gfile.exists(target):  # deterministic content: keep the file (and the TFX cache) as is
            continue
        with tf.io.TFRecordWriter(target, options="GZIP") as w:
            for key, s in items:
                w.write(_example(key.encode(), text.encode([s])[0]))
    return {k: len(v) for k, v in parts.items()}

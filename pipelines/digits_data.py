"""Write the embedded digits (TFDS ``sklearn_digits``) as TFRecord ``tf.Example`` files for the
pipelines' ExampleGens: ``<out>/pretrain/`` (digits 0–3, labels 0–3), ``<out>/finetune_train/`` and
``<out>/finetune_test/`` (digits 4–9, labels 0–5). Features: ``key`` (bytes, the TFDS id),
``image`` (64 floats in [0, 1]), ``label`` (int64)."""

import os

import numpy as np
import tensorflow as tf

from model_zoo import digits as data_mod

FEATURE_SPEC = {"x": {"name": "image", "shape": [8, 8, 1]}, "y": {"name": "label"}, "key": "key"}


def _example(key: bytes, image, label) -> bytes:
    f = {"key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
         "image": tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(image).astype(float).tolist())),
         "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}
    return tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()


def write(out_dir: str, n_finetune: int | None = 400, n_pretrain: int | None = None, seed: int = 0,
          data_dir: str | None = None) -> dict:
    d = data_mod.load_two_stage(n_finetune=n_finetune, n_pretrain=n_pretrain, seed=seed, data_dir=data_dir)
    parts = {"pretrain": (d.ids["pretrain"], d.x_pre, d.y_pre),
             "finetune_train": (d.ids["finetune"], d.x_ft, d.y_ft),
             "finetune_test": (d.ids["test"], d.x_test, d.y_test)}
    counts = {}
    for name, (ids, x, y) in parts.items():
        path = os.path.join(out_dir, name)
        tf.io.gfile.makedirs(path)
        target = os.path.join(path, "data.tfrecord.gz")
        tmp = target + ".tmp"
        with tf.io.TFRecordWriter(tmp, options="GZIP") as w:
            for i, xi, yi in zip(ids, x, y):
                w.write(_example(f"digit-{int(i):04d}".encode(), xi, yi))
        # keep an identical existing file untouched: ExampleGen fingerprints file stats, so a rerun
        # of the pipeline on the same data is served from the TFX cache
        if tf.io.gfile.exists(target) and _same(tmp, target):
            tf.io.gfile.remove(tmp)
        else:
            tf.io.gfile.rename(tmp, target, overwrite=True)
        counts[name] = int(len(ids))
    return counts


def _same(a: str, b: str) -> bool:
    read = lambda p: list(tf.data.TFRecordDataset([p], compression_type="GZIP").as_numpy_iterator())  # noqa: E731
    return read(a) == read(b)

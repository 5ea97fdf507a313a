"""Data through TensorFlow Datasets, split into the two stages of the paper's protocol.

* :class:`SklearnDigits` — a TFDS builder serving the real handwritten digits that ship inside
  scikit-learn (``sklearn.datasets.load_digits``: 1,797 8×8 images, 10 classes), so the
  default data needs no download. Splits: ``train`` (1,437) and ``test`` (360, every 5th image).
  Importing this module registers it with TFDS as ``sklearn_digits``.
* :func:`load_two_stage` — the paper's MNIST protocol for any TFDS image-classification
  dataset with ``train`` / ``test`` splits and ``image`` / ``label`` features: pretrain on
  ``pretrain_classes`` (paper: 0–3), finetune on ``finetune_classes`` (paper: 4–9) with
  finetuning train examples from the ``train`` split and test examples from the ``test``
  split. The same code path loads ``mnist`` and ``cifar10`` for users who have them prepared
  in their TFDS data dir (nothing is downloaded unless ``download=True``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

DEFAULT_DATASET = "sklearn_digits"
PRETRAIN_CLASSES = (0, 1, 2, 3)
FINETUNE_CLASSES = (4, 5, 6, 7, 8, 9)


def _tfds():
    import tensorflow_datasets as tfds
    return tfds


def _define_builder():
    tfds = _tfds()

    class SklearnDigits(tfds.core.GeneratorBasedBuilder):
        """scikit-learn's bundled handwritten digits (UCI optdigits test set, 8×8, 17 grey levels)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Initial release."}

        def _info(self):
            return self.dataset_info_from_configs(
                description="Real 8x8 handwritten digits bundled with scikit-learn (load_digits); "
                            "pixel values 0..16 rescaled to 0..255.",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "id": tf.int64,
                }),
                supervised_keys=("image", "label"),
                homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(test=False), "test": self._generate_examples(test=True)}

        def _generate_examples(self, test: bool):
            from sklearn.datasets import load_digits
            digits = load_digits()
            images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
            for i, (img, label) in enumerate(zip(images, digits.target)):
                if (i % 5 == 0) == test:
                    yield i, {"image": img, "label": int(label), "id": i}

    return SklearnDigits


SklearnDigits = _define_builder()


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else TFDS's own default (``~/tensorflow_datasets``)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def load_split_arrays(name: str = DEFAULT_DATASET, split: str = "train", data_dir: str | None = None,
                      download: bool = False):
    """``(images float32 in [0, 1], labels int64, ids)`` of one split of a TFDS dataset."""
    tfds = _tfds()
    data_dir = data_dir or default_data_dir()
    builder = tfds.builder(name, data_dir=data_dir)
    if name == DEFAULT_DATASET:
        builder.download_and_prepare()  # generated locally from scikit-learn, no network
    elif download:
        builder.download_and_prepare()
    elif not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        raise FileNotFoundError(
            f"TFDS dataset '{name}' is not prepared in {data_dir}; prepare it where you have network access "
            f"(tfds.builder('{name}').download_and_prepare()) or pass download=True")
    if split not in builder.info.splits:
        raise ValueError(f"TFDS dataset '{name}' has no split '{split}'; it has {sorted(builder.info.splits)}")
    ds = builder.as_dataset(split=split, shuffle_files=False)
    images, labels, ids = [], [], []
    for i, ex in enumerate(ds.as_numpy_iterator()):
        images.append(ex["image"])
        labels.append(ex["label"])
        ids.append(ex.get("id", i))
    if not images:
        raise ValueError(f"split '{split}' of TFDS dataset '{name}' is empty")
    x = np.stack(images).astype(np.float32) / 255.0
    order = np.argsort(np.asarray(ids), kind="stable")  # deterministic order whatever the shard order
    return x[order], np.asarray(labels, dtype=np.int64)[order], np.asarray(ids)[order]


@dataclass
class TwoStageData:
    """Pretraining examples and finetuning train / test examples (labels re-indexed from 0)."""

    x_pre: np.ndarray
    y_pre: np.ndarray
    x_ft: np.ndarray
    y_ft: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    pretrain_classes: tuple
    finetune_classes: tuple
    ids: dict = field(default_factory=dict)  # TFDS ids of each part, for tracing examples back
    dataset: str = DEFAULT_DATASET

    def datasets(self, batch_size: int = 256):
        ds = lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)  # noqa: E731
        return ds(self.x_pre, self.y_pre), ds(self.x_ft, self.y_ft), ds(self.x_test, self.y_test)

    def summary(self) -> str:
        return (f"{self.dataset}: {len(self.x_pre)} pretraining examples of classes {self.pretrain_classes}; "
                f"{len(self.x_ft)} finetuning / {len(self.x_test)} test examples of classes {self.finetune_classes}")


def _remap(labels, classes):
    return np.searchsorted(np.array(sorted(classes)), labels).astype(np.int64)


def load_two_stage(name: str = DEFAULT_DATASET, pretrain_classes=PRETRAIN_CLASSES, finetune_classes=FINETUNE_CLASSES,
                   n_pretrain: int | None = None, n_finetune: int | None = None, n_test: int | None = None,
                   seed: int = 0, data_dir: str | None = None, download: bool = False) -> TwoStageData:
    """The two-stage split of a TFDS dataset (see module docstring).

    ``n_*`` subsample each part at random (seeded); ``None`` keeps all. When the two class sets
    overlap (same-task finetuning, Section 4.3), the ``train`` examples of the shared classes
    are split in two disjoint halves, one for each stage.
    """
    pretrain_classes, finetune_classes = tuple(pretrain_classes), tuple(finetune_classes)
    if not pretrain_classes or not finetune_classes:
        raise ValueError("pretrain_classes and finetune_classes must both be non-empty")
    x, y, ids = load_split_arrays(name, "train", data_dir, download)
    xt, yt, idt = load_split_arrays(name, "test", data_dir, download)
    missing = sorted(set(pretrain_classes + finetune_classes) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"TFDS dataset '{name}' has no training examples of classes {missing}")
    rng = np.random.default_rng(seed)
    pre = np.flatnonzero(np.isin(y, pretrain_classes))
    ft = np.flatnonzero(np.isin(y, finetune_classes))
    shared = set(pretrain_classes) & set(finetune_classes)
    if shared:
        in_shared = np.flatnonzero(np.isin(y, list(shared)))
        perm = rng.permutation(in_shared)
        to_ft = set(perm[: len(perm) // 2].tolist())
        pre = np.array([i for i in pre if not (y[i] in shared and i in to_ft)])
        ft = np.array([i for i in ft if not (y[i] in shared and i not in to_ft)])
    test = np.flatnonzero(np.isin(yt, finetune_classes))

    def pick(idx, n, what):
        if n is None:
            return np.sort(idx)
        if n > len(idx):
            raise ValueError(f"asked for {n} {what} examples but '{name}' has only {len(idx)}")
        return np.sort(rng.choice(idx, size=n, replace=False))

    pre, ft, test = pick(pre, n_pretrain, "pretraining"), pick(ft, n_finetune, "finetuning"), pick(test, n_test,
                                                                                                      "test")
    return TwoStageData(x[pre], _remap(y[pre], pretrain_classes), x[ft], _remap(y[ft], finetune_classes),
                        xt[test], _remap(yt[test], finetune_classes), pretrain_classes, finetune_classes,
                        ids={"pretrain": ids[pre], "finetune": ids[ft], "test": idt[test]}, dataset=name)

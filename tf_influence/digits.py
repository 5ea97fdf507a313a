"""The embedded default data and models: scikit-learn's real handwritten digits (8×8, 1,797
images, bundled with scikit-learn so nothing is downloaded) split like the paper's MNIST
protocol — pretrain on digits 0–3, finetune on 4–9 — and CNNs shaped like the paper's
Table A (convolutional embedding W with tanh, fully connected heads U and Θ, no activation
on the output layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

PRETRAIN_CLASSES = (0, 1, 2, 3)
FINETUNE_CLASSES = (4, 5, 6, 7, 8, 9)


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

    def datasets(self, batch_size: int = 128):
        ds = lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)  # noqa: E731
        return ds(self.x_pre, self.y_pre), ds(self.x_ft, self.y_ft), ds(self.x_test, self.y_test)


def load_digits_two_stage(pretrain_classes=PRETRAIN_CLASSES, finetune_classes=FINETUNE_CLASSES,
                          n_finetune: int | None = None, test_fraction: float = 0.3, seed: int = 0,
                          dtype="float32") -> TwoStageData:
    """Real digits from ``sklearn.datasets.load_digits`` split into the two stages.

    Pixel values are scaled to [0, 1]; images are ``[8, 8, 1]``. The finetuning classes are
    split into train / test (``test_fraction``), and the finetuning training set is optionally
    subsampled to ``n_finetune`` examples (the paper subsamples 5,000 MNIST examples).
    """
    from sklearn.datasets import load_digits

    overlap = set(pretrain_classes) & set(finetune_classes)
    if not pretrain_classes or not finetune_classes:
        raise ValueError("pretrain_classes and finetune_classes must both be non-empty")
    digits = load_digits()
    x = (digits.images / 16.0).astype(dtype)[..., None]
    y = digits.target
    rng = np.random.default_rng(seed)
    pre = np.flatnonzero(np.isin(y, pretrain_classes))
    ft = rng.permutation(np.flatnonzero(np.isin(y, finetune_classes)))
    if overlap:  # same-task finetuning (Section 4.3): keep finetune examples disjoint from pretraining ones
        pre = rng.permutation(pre)
        half = len(pre) // 2
        ft = rng.permutation(np.concatenate([ft[~np.isin(ft, pre[:half])], pre[half:]]))
        pre = np.sort(pre[:half])
    n_test = int(round(test_fraction * len(ft)))
    test, train = ft[:n_test], ft[n_test:]
    if n_finetune is not None:
        if n_finetune > len(train):
            raise ValueError(f"n_finetune={n_finetune} but only {len(train)} finetuning training examples exist")
        train = train[:n_finetune]
    remap = lambda labels, classes: np.searchsorted(np.array(sorted(classes)), labels)  # noqa: E731
    return TwoStageData(x[pre], remap(y[pre], pretrain_classes), x[train], remap(y[train], finetune_classes),
                        x[test], remap(y[test], finetune_classes), tuple(pretrain_classes), tuple(finetune_classes))


def build_embedding(input_shape=(8, 8, 1), filters=(8, 16), dtype="float32", name="embedding") -> keras.Model:
    """W: two tanh convolutions (Table A's 'CNN layers are used as embeddings')."""
    inp = keras.Input(input_shape, dtype=dtype)
    h = keras.layers.Conv2D(filters[0], 3, padding="same", activation="tanh", dtype=dtype, name="conv1")(inp)
    h = keras.layers.AveragePooling2D(2, dtype=dtype, name="pool1")(h)
    h = keras.layers.Conv2D(filters[1], 3, activation="tanh", dtype=dtype, name="conv2")(h)
    h = keras.layers.Flatten(dtype=dtype, name="flatten")(h)
    return keras.Model(inp, h, name=name)


def build_head_model(embedding: keras.Model, n_classes: int, hidden: int = 32, name: str = "model",
                     head_name: str = "head", dtype="float32") -> keras.Model:
    """A model ``head(embedding(x))``: fully connected tanh layer, then linear logits."""
    inp = keras.Input(embedding.input_shape[1:], dtype=dtype)
    head = keras.Sequential([keras.layers.Dense(hidden, activation="tanh", dtype=dtype),
                             keras.layers.Dense(n_classes, dtype=dtype)], name=head_name)
    return keras.Model(inp, head(embedding(inp)), name=name)


def build_two_stage_models(n_pre_classes: int, n_ft_classes: int, seed: int = 0, dtype="float32"):
    """(pretrain_model, finetune_model, embedding): both models share the ``embedding`` sub-model;
    heads are called ``pretrain_head`` (U) and ``finetune_head`` (Θ)."""
    keras.utils.set_random_seed(seed)
    emb = build_embedding(dtype=dtype)
    pre = build_head_model(emb, n_pre_classes, name="pretrain", head_name="pretrain_head", dtype=dtype)
    ft = build_head_model(emb, n_ft_classes, name="finetune", head_name="finetune_head", dtype=dtype)
    return pre, ft, emb


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fit(model, x, y, epochs: int, batch_size: int = 128, lr: float = 1e-2, seed: int = 0, verbose: int = 0):
    """Deterministic Adam training (fixed seed, no shuffling randomness beyond the seed)."""
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss(), metrics=["accuracy"])
    return model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose, shuffle=True)


def accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y))

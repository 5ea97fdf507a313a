"""Objectives: a Keras model, a per-example loss and the data it is averaged over.

The multi-stage paper writes the pretraining objective as
``G(W, U) = 1/m Σ_z g(z, W, U)`` and the finetuning objective as ``F(W, Θ) = 1/n Σ_x f(x, W, Θ)``.
Here an :class:`Objective` is the per-example loss ``l(z)`` of a Keras model plus the model's
regularisation losses ``R`` (``model.losses``, e.g. ``kernel_regularizer``), and the dataset
objective is ``L = 1/N Σ_z l(z) + R``. Removing example ``z`` is the perturbation
``L + ε l(z)`` with ``ε = -1/N`` (the paper's convention): ``R`` stays untouched.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import keras
import numpy as np
import tensorflow as tf


class NonFiniteError(ValueError):
    """A loss, gradient or Hessian-vector product contained NaN or Inf."""


class EmptyDatasetError(ValueError):
    """A dataset that must hold examples holds none."""


def _as_per_example_loss(loss) -> Callable:
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # unreduced: one value per example
    if callable(loss):
        return loss
    raise TypeError(f"loss must be a Keras loss, a loss name or a callable, got {loss!r}")


class Objective:
    """Per-example loss of ``model`` on ``(x, y)`` batches, plus its regularisation losses.

    Args:
      model: a built Keras 3 model (TensorFlow backend).
      loss: a Keras loss (its unreduced ``call`` is used), a loss name, or a callable
        ``loss(y_true, y_pred) -> [B, ...]``; extra axes are averaged to one value per example.
      include_model_losses: add ``sum(model.losses)`` (regularisers) once to the dataset mean.
      name: used in error messages.
    """

    def __init__(self, model, loss, include_model_losses: bool = True, name: str | None = None):
        self.model = model
        self.loss_fn = _as_per_example_loss(loss)
        self.include_model_losses = include_model_losses
        self.name = name or model.name

    def per_example_losses(self, x, y, training: bool = False) -> tf.Tensor:
        y_pred = self.model(x, training=training)
        losses = self.loss_fn(y, y_pred)
        losses = tf.convert_to_tensor(losses)
        if losses.shape.rank is not None and losses.shape.rank > 1:
            losses = tf.reduce_mean(tf.reshape(losses, [tf.shape(losses)[0], -1]), axis=1)
        return losses

    def regularization(self) -> tf.Tensor:
        if not self.include_model_losses:
            return tf.constant(0.0, dtype=self.dtype)
        losses = [tf.cast(l, self.dtype) for l in self.model.losses]
        if not losses:
            return tf.constant(0.0, dtype=self.dtype)
        return tf.add_n(losses)

    @property
    def has_regularization(self) -> bool:
        return self.include_model_losses and len(self.model.losses) > 0

    @property
    def dtype(self):
        return tf.as_dtype(self.model.trainable_variables[0].dtype)


def split_batch(batch):
    """``(x, y)`` from a dataset element; rejects other layouts with a clear message."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        "dataset elements must be (features, labels) pairs; got "
        f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}")


def count_examples(dataset, name: str = "dataset") -> int:
    """Number of examples in a batched ``(x, y)`` dataset; raises if it is empty."""
    n = 0
    for batch in dataset:
        _, y = split_batch(batch)
        n += int(tf.shape(tf.nest.flatten(y)[0])[0])
    if n == 0:
        raise EmptyDatasetError(f"{name} is empty: it yielded no examples")
    return n


def subsample(dataset, n: int, seed: int = 0, batch_size: int | None = None, name: str = "dataset"):
    """A fixed random subset of ``n`` examples of a batched dataset (the paper samples 1,000
    pretraining examples for the pretraining Hessian). Deterministic for a given seed."""
    total = count_examples(dataset, name)
    if n >= total:
        return dataset
    if batch_size is None:
        first = next(iter(dataset))
        batch_size = int(tf.shape(tf.nest.flatten(split_batch(first)[1])[0])[0])
    mask = np.zeros(total, dtype=bool)
    mask[np.random.default_rng(seed).choice(total, size=n, replace=False)] = True
    mask = tf.constant(mask)
    ds = dataset.unbatch().enumerate().filter(lambda i, e: tf.gather(mask, i)).map(lambda i, e: e)
    return ds.batch(batch_size)


@contextlib.contextmanager
def finite_check(what: str):
    """Translate ``tf.debugging.check_numerics`` failures into :class:`NonFiniteError`."""
    try:
        yield
    except tf.errors.InvalidArgumentError as err:
        if "NONFINITE" in str(err):
            raise NonFiniteError(f"{what}: NaN or Inf encountered ({str(err).splitlines()[0]})") from None
        raise


def check_finite(t, tag: str):
    """In-graph NaN/Inf check whose failure :func:`finite_check` turns into NonFiniteError."""
    return tf.debugging.check_numerics(t, f"NONFINITE {tag}")

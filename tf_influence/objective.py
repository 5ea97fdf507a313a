"""Objectives: a Keras model, a per-example loss and the data it is averaged over.

The multi-stage paper writes the pretraining objective as
``G(W, U) = 1/m Σ_z g(z, W, U)`` and the finetuning objective as ``F(W, Θ) = 1/n Σ_x f(x, W, Θ)``.
Here an :class:`Objective` is the per-example loss ``l(z)`` of a Keras model plus the model's
regularisation losses ``R`` (``model.losses``, e.g. ``kernel_regularizer``), and the dataset
objective is ``L = 1/N Σ_z l(z) + R``. Removing example ``z`` is the perturbation
``L + ε l(z)`` with ``ε = -1/N`` (the paper's convention): ``R`` stays untouched.
"""

from __future__ import annotations

import json
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

# the error types and NaN/Inf checks live in tf_influence.errors (imported here: `objective.DatasetError` & co.
# keep resolving, as the same objects)
from .errors import DatasetError, EmptyDatasetError, NonFiniteError, check_finite, finite_check  # noqa: F401
from .exact import exact_moments


def per_example_loss_fn(loss) -> Callable:
    """``loss(y_true, y_pred) -> [B, ...]`` (unreduced) from a Keras loss object, a loss name or a callable."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # unreduced: one value per example
    if callable(loss):
        return loss
    raise TypeError(f"loss must be a Keras loss, a loss name or a callable, got {loss!r}")


def reduce_per_example(losses) -> tf.Tensor:
    """``[B, ...]`` unreduced losses → ``[B]``: extra axes (e.g. sequence positions) are averaged.

    The one per-example reduction of the package (objectives, PRESENCE microbatches)."""
    losses = tf.convert_to_tensor(losses)
    if losses.shape.rank is not None and losses.shape.rank > 1:
        losses = tf.reduce_mean(tf.reshape(losses, [tf.shape(losses)[0], -1]), axis=1)
    return losses


def _loss_key(loss):
    """A hashable identity of a loss, equal for equally configured Keras losses (compiled-function cache)."""
    if isinstance(loss, keras.losses.Loss):
        try:
            cfg = json.dumps(loss.get_config(), sort_keys=True, default=repr)
        except (TypeError, ValueError, NotImplementedError):
            return ("id", id(loss))
        fn = getattr(loss, "fn", None)
        return (type(loss).__name__, getattr(fn, "__qualname__", None), cfg)
    return ("id", id(loss))


class Objective:
    """Per-example loss of ``model`` on ``(x, y)`` batches, plus its regularisation losses.

    Args:
      model: a built Keras 3 model (TensorFlow backend).
      loss: a Keras loss (its unreduced ``call`` is used), a loss name, or a callable
        ``loss(y_true, y_pred) -> [B, ...]``; extra axes are averaged to one value per example.
        Default: the loss the model was compiled with.
      include_model_losses: add ``sum(model.losses)`` (regularisers) once to the dataset mean.
      name: used in error messages.

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> Objective(model).per_example_losses(tf.ones([4, 3]), tf.zeros([4], tf.int64)).shape
    TensorShape([4])
    """

    def __init__(self, model, loss=None, include_model_losses: bool = True, name: str | None = None):
        self.model = model
        if loss is None:
            loss = getattr(model, "loss", None)
            if loss is None:
                raise ValueError(f"model '{model.name}' was not compiled with a loss; pass loss= to Objective "
                                 "(a Keras loss, a loss name or a callable)")
        self.loss = loss
        self.loss_fn = per_example_loss_fn(loss)
        self.include_model_losses = include_model_losses
        self.name = name or model.name
        from .params import parameters  # params imports nothing from here; imported late to keep layers apart
        params = parameters(model)
        if not params:
            raise ValueError(f"model '{model.name}' has no parameters (is it built?)")
        self._dtype = tf.as_dtype(params[0].dtype)   # one walk of the layer tree, not one per access

    @property
    def cache_key(self) -> tuple:
        """Equal for objectives that compute the same function of the same model (see :mod:`compiled`)."""
        return (_loss_key(self.loss), bool(self.include_model_losses))

    def per_example_losses(self, x, y, training: bool = False) -> tf.Tensor:
        # Exact moments: second derivatives through LayerNormalization & co. (see tf_influence.exact).
        with exact_moments():
            y_pred = self.model(x, training=training)
            return reduce_per_example(self.loss_fn(y, y_pred))

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
        return self._dtype


def split_batch(batch):
    """``(x, y)`` from a dataset element; rejects other layouts with a clear message."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise DatasetError(
        "dataset elements must be (features, labels) pairs; got "
        f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}")


def _model_input_ranks(model):
    """``{input name: rank}`` (and ``None`` for a single input) of a functional model, else ``{}``."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return {}
    out = {}
    for t in inputs:
        rank = len(t.shape)
        out[getattr(t, "name", None)] = rank
    if len(inputs) == 1:
        out[None] = len(inputs[0].shape)
    return out


def check_dataset(dataset, name: str = "dataset", model=None) -> None:
    """Raise :class:`DatasetError` unless ``dataset`` is a ``tf.data.Dataset`` of batched ``(x, y)`` pairs.

    With ``model`` (a functional Keras model), the feature ranks are compared with the model's
    inputs: an unbatched dataset is one rank short and is named as such."""
    if not isinstance(dataset, tf.data.Dataset):
        raise DatasetError(f"{name} must be a tf.data.Dataset of batched (x, y) pairs, got {type(dataset).__name__}")
    spec = dataset.element_spec
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
        raise DatasetError(f"{name}: dataset elements must be (features, labels) pairs, got {spec}")
    x_spec, y_spec = spec
    _check_feature_ranks(x_spec, name, model)
    for ts in tf.nest.flatten(y_spec):
        if isinstance(ts, tf.TensorSpec) and ts.shape.rank == 0:
            raise DatasetError(f"{name} is not batched: its labels are scalars (a batch of labels has a leading "
                               "batch axis); call dataset.batch(batch_size)")


def _check_feature_ranks(x_spec, name, model):
    ranks = _model_input_ranks(model) if model is not None else {}
    if not ranks:
        return
    if isinstance(x_spec, dict):
        items = [(k, v, ranks.get(k)) for k, v in x_spec.items()]
    elif isinstance(x_spec, tf.TensorSpec):
        items = [(None, x_spec, ranks.get(None))]
    else:
        items = []
    for key, ts, want in items:
        got = ts.shape.rank
        if want is None or got is None:
            continue
        where = f"feature '{key}'" if key is not None else "features"
        if got == want - 1:
            raise DatasetError(
                f"{name} is not batched: its {where} have shape {ts.shape.as_list()} but model '{model.name}' takes "
                f"a batch of rank {want}; call dataset.batch(batch_size)")
        if got != want:
            raise DatasetError(f"{name}: {where} have rank {got} (shape {ts.shape.as_list()}) but model "
                               f"'{model.name}' expects rank {want}")


def batches(dataset, name: str = "dataset", model=None):
    """Iterate ``(x, y)`` of a checked dataset (see :func:`check_dataset`), with tf.data's model-based
    autotuning off for the pass (:func:`without_autotune`)."""
    check_dataset(dataset, name, model)
    for batch in without_autotune(dataset):
        yield split_batch(batch)


def without_autotune(dataset):
    """``dataset`` with tf.data's model-based autotuning off. An iterator's destructor waits for its autotuning
    thread, which sleeps in periods that double up to a minute: at the end of a pass of a few minutes the
    library's passes stood still for 30–48 s (a 100 M Llama's factor fit; a native stack showed the main
    thread in ``RootDataset::Iterator::~Iterator`` waiting for it). The library's passes are bound by the
    model, not the input pipeline; an ``AUTOTUNE`` parallelism then takes tf.data's default."""
    if not isinstance(dataset, tf.data.Dataset):
        return dataset
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def count_examples(dataset, name: str = "dataset", model=None) -> int:
    """Number of examples in a batched ``(x, y)`` dataset; raises if it is empty (or not batched:
    see :func:`check_dataset`)."""
    from .provenance import DatasetHasher, remember
    n, hasher = 0, DatasetHasher()      # the pass fingerprints the data too (tf_influence.provenance)
    for x, y in batches(dataset, name, model):
        n += int(tf.shape(tf.nest.flatten(y)[0])[0])
        hasher.update(x, y)
    if n == 0:
        raise EmptyDatasetError(f"{name} is empty: it yielded no examples")
    remember(dataset, hasher.digest())
    return n


def subsample_mask(total: int, n: int, seed: int = 0) -> np.ndarray:
    """``[total]`` booleans marking the ``n`` positions :func:`subsample` keeps (the one sampling rule,
    also used by pipelines that stream a corpus from files instead of holding it)."""
    mask = np.zeros(total, dtype=bool)
    mask[np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)] = True
    return mask


def subsample(dataset, n: int, seed: int = 0, batch_size: int | None = None, name: str = "dataset"):
    """A fixed random subset of ``n`` examples of a batched dataset (the paper samples 1,000
    pretraining examples for the pretraining Hessian). Deterministic for a given seed."""
    total = count_examples(dataset, name)
    if n >= total:
        return dataset
    if n < 1:
        raise ValueError(f"{name}: a subsample needs at least 1 example, got {n}")
    return take_positions(dataset, subsample_mask(total, n, seed), batch_size or first_batch_size(dataset))


def first_batch_size(dataset) -> int:
    """The number of examples in the first batch of a batched ``(x, y)`` dataset."""
    return int(tf.shape(tf.nest.flatten(split_batch(next(iter(dataset)))[1])[0])[0])


def take_positions(dataset, mask, batch_size: int | None = None):
    """The examples of a batched dataset at the positions where ``mask`` (``[N]`` booleans) is true, in
    order — unbatched, or batched by ``batch_size``; positions past the mask are not taken."""
    mask = np.asarray(mask, bool)
    padded = tf.constant(np.append(mask, False))        # position ≥ N reads the padding False
    n = tf.constant(len(mask), tf.int64)
    ds = dataset.unbatch().enumerate().filter(lambda i, e: tf.gather(padded, tf.minimum(i, n))).map(lambda i, e: e)
    return ds.batch(batch_size) if batch_size else ds


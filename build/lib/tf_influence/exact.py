"""Exact second derivatives through Keras' normalisation layers (TensorFlow backend).

Keras 3's TensorFlow backend computes ``ops.moments`` (used by ``LayerNormalization``,
``BatchNormalization`` in training mode and ``GroupNormalization``) with ``tf.nn.moments``, which
centres the variance with ``stop_gradient(mean)``::

    mean = reduce_mean(x);  var = reduce_mean((x − stop_gradient(mean))²)

The value and the first derivative are exact (the mean's term of ``∂var/∂x`` is
``−2/n Σ (x − mean) · ∂mean/∂x = 0``), but the *second* derivative loses that term: a
Hessian-vector product through a ``LayerNormalization`` was 8.7e-2 off a float64 central finite
difference of the gradient (a Dense → LayerNorm → Dense classifier), 3.7e-2 on a keras-hub BERT,
1.5e-1 on GPT-2. Every CG / LiSSA / dense / eq. 16 solve on such a model used a wrong Hessian.

:func:`exact_moments` is a context manager under which the backend's moments are computed as
``var = reduce_mean((x − mean)²)`` — the same value and gradient, and the exact second
derivative. :class:`~tf_influence.objective.Objective` calls the model inside it, so every
library kernel (traced by ``tf.function`` while the patch is active) carries the exact graph;
the user's own training code is untouched outside it.

>>> import keras, numpy as np, tensorflow as tf
>>> x = tf.constant(np.random.default_rng(0).normal(size=(2, 4)))
>>> with exact_moments():
...     m, v = keras.ops.moments(x, axes=[-1])
>>> bool(np.allclose(v.numpy(), np.var(x.numpy(), axis=-1)))
True

The patch is process-wide while active (re-entrant; a counter restores the original on the
last exit); it changes no value, only which graph TensorFlow differentiates.
"""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf

_LOCK = threading.RLock()
_DEPTH = 0
_ORIGINAL = {}


def moments(x, axes, keepdims=False):
    """``(mean, variance)`` over ``axes`` without ``stop_gradient``: exact to every order."""
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


def _keras_backend_module():
    try:
        from keras.src.backend.tensorflow import nn as backend_nn
    except ImportError:  # another Keras layout: nothing to patch there
        return None
    return backend_nn if hasattr(backend_nn, "_compute_moments") else None


def _install():
    backend_nn = _keras_backend_module()
    if backend_nn is not None:
        _ORIGINAL["keras"] = backend_nn._compute_moments  # noqa: SLF001
        backend_nn._compute_moments = lambda x, axes, keepdims: moments(x, axes, keepdims=keepdims)  # noqa: SLF001
    _ORIGINAL["tf"] = tf.nn.moments
    tf.nn.moments = lambda x, axes, shift=None, keepdims=False, name=None: moments(x, axes, keepdims)


def _uninstall():
    backend_nn = _keras_backend_module()
    if backend_nn is not None and "keras" in _ORIGINAL:
        backend_nn._compute_moments = _ORIGINAL.pop("keras")  # noqa: SLF001
    if "tf" in _ORIGINAL:
        tf.nn.moments = _ORIGINAL.pop("tf")


@contextlib.contextmanager
def exact_moments():
    """Within this block, normalisation layers compute moments with exact second derivatives."""
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            _install()
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _uninstall()


__all__ = ["exact_moments", "moments"]

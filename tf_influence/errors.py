"""The library's error types and its NaN/Inf checks, in one place.

* :class:`DatasetError`, :class:`EmptyDatasetError`, :class:`NonFiniteError` (each a ``ValueError``; the
  memory plan's :class:`~tf_influence.memory.MemoryBudgetError` is a ``MemoryError``).
* In a compiled kernel: :func:`check_finite` (``tf.debugging.check_numerics`` with a tag) inside, and
  :func:`finite_check` around the call, which turns the runtime error into a :class:`NonFiniteError` naming
  what was computed — and a label outside the model's classes into a :class:`DatasetError`.
* On the host (solver right-hand sides and results, score arrays): :func:`require_finite`.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np


class NonFiniteError(ValueError):
    """A loss, gradient, Hessian-vector product, solve or score contained NaN or Inf."""


class EmptyDatasetError(ValueError):
    """A dataset that must hold examples holds none."""


class DatasetError(ValueError):
    """A dataset has the wrong layout (not ``(x, y)`` pairs, not batched, labels out of range)."""


_LABEL_RANGE = re.compile(r"Received a label value of (-?\d+) which is outside the valid range of \[(-?\d+), (-?\d+)\)")


@contextlib.contextmanager
def finite_check(what: str):
    """Turn TensorFlow runtime errors a user can act on into errors naming ``what``: NaN/Inf
    (:class:`NonFiniteError`) and labels outside the model's classes (:class:`DatasetError`)."""
    import tensorflow as tf
    try:
        yield
    except tf.errors.InvalidArgumentError as err:
        text = str(err)
        if "NONFINITE" in text:
            raise NonFiniteError(f"{what}: NaN or Inf encountered ({text.splitlines()[0]})") from None
        m = _LABEL_RANGE.search(text)
        if m:
            raise DatasetError(f"{what}: a label value {m.group(1)} is outside the model's classes "
                               f"[{m.group(2)}, {m.group(3)}) — check the labels of that dataset (are they "
                               "re-indexed from 0 for this model?)") from None
        raise


def check_finite(t, tag: str):
    """In-graph NaN/Inf check whose failure :func:`finite_check` turns into :class:`NonFiniteError`."""
    import tensorflow as tf
    return tf.debugging.check_numerics(t, f"NONFINITE {tag}")


def require_finite(values, what: str, keys=None) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` (and up to five of ``keys`` where given, else positions)
    when the host-side ``values`` (a numpy array or an eager tensor) hold NaN or Inf.

    >>> require_finite([1.0, 2.0], "scores")
    >>> require_finite([1.0, float("nan")], "scores", keys=[b"a", b"b"])
    Traceback (most recent call last):
    ...
    tf_influence.errors.NonFiniteError: scores: 1 value(s) are NaN/Inf (key(s) [b'b'])
    """
    arr = np.asarray(values.numpy() if hasattr(values, "numpy") else values)
    bad = ~np.isfinite(arr)
    if not bad.any():
        return
    where = np.flatnonzero(bad.reshape(-1))
    named = ([keys[i] for i in where[:5]] if keys is not None and arr.ndim == 1 else where[:5].tolist())
    label = "key(s)" if keys is not None and arr.ndim == 1 else "position(s)"
    raise NonFiniteError(f"{what}: {int(bad.sum())} value(s) are NaN/Inf ({label} {named})")


__all__ = ["NonFiniteError", "EmptyDatasetError", "DatasetError", "finite_check", "check_finite", "require_finite"]

"""Compiled per-batch kernels (``tf.function``), cached per model, objective and parameter group.

Every streamed computation of the package (gradients, Hessian-vector products, per-example
products) runs one compiled kernel per batch. Kernels are cached on the *model* — keyed by the
objective's function (:attr:`Objective.cache_key`: the loss and its configuration), the
parameter group(s) and the kind of kernel — so that a second ``single_stage_influence`` call,
a new :class:`~tf_influence.objective.Objective` over the same model and loss, or a new
:class:`~tf_influence.hessian.HessianOperator` reuse the traced graphs instead of retracing.
"""

from __future__ import annotations

import weakref

import tensorflow as tf

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _group_key(group) -> tuple:
    return tuple(id(v) for v in group.tf_variables)


def cached_kernel(objective, kind: str, groups, factory, *extra):
    """The kernel ``factory()`` built once per ``(model, objective.cache_key, kind, groups, extra)``."""
    per_model = _CACHE.setdefault(objective.model, {})
    key = (kind, objective.cache_key, tuple(_group_key(g) for g in groups), extra)
    kernel = per_model.get(key)
    if kernel is None:
        kernel = per_model[key] = factory()
    return kernel


def clear_cache(model=None) -> None:
    """Forget compiled kernels (of one model, or all)."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


class Function:
    """A ``tf.function`` traced without AutoGraph, and with it only if the traced code needs it.

    AutoGraph rewrites the source of every function a trace calls that is not on its do-not-convert
    list (keras-hub's code is not) — a first ``multi_stage_influence`` call on a tiny float64
    keras-hub Llama took 6.1–7.2 CPU-seconds with it, 5.1 without. The library's kernels contain no
    tensor-dependent Python control flow, so they are traced without it; a loss (or other code the
    kernel calls outside Keras) that branches or loops on tensors in Python (``if tf.reduce_sum(x) >
    0:``) raises ``OperatorNotAllowedInGraphError`` in that trace, and the kernel is then traced
    again, for good, with AutoGraph. (Keras 3 never converts a layer's ``call``: Keras is on
    AutoGraph's do-not-convert list, in ``fit`` as here.)

    >>> import tensorflow as tf
    >>> f = Function(lambda x: 2 * x)
    >>> float(f(tf.constant(3.0)))
    6.0
    >>> def branchy(x):
    ...     if tf.reduce_sum(x) > 0:       # Python control flow on a tensor: needs AutoGraph
    ...         return x
    ...     return -x
    >>> g = Function(branchy)
    >>> float(g(tf.constant(-2.0))), g.autograph
    (2.0, True)
    """

    def __init__(self, fn, **kwargs):
        self._fn, self._kwargs = fn, kwargs
        self._plain = tf.function(fn, autograph=False, **kwargs)
        self._converted = None

    @property
    def autograph(self) -> bool:
        """Whether the kernel had to be traced with AutoGraph."""
        return self._converted is not None

    def _with_autograph(self):
        if self._converted is None:
            self._converted = tf.function(self._fn, autograph=True, **self._kwargs)
        return self._converted

    def _call(self, method: str, *args, **kwargs):
        if self._converted is None:
            try:
                return getattr(self._plain, method)(*args, **kwargs)
            except tf.errors.OperatorNotAllowedInGraphError:
                pass
        return getattr(self._with_autograph(), method)(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._call("__call__", *args, **kwargs)

    def get_concrete_function(self, *args, **kwargs):
        return self._call("get_concrete_function", *args, **kwargs)

    def experimental_get_tracing_count(self) -> int:
        return self._plain.experimental_get_tracing_count() + (
            self._converted.experimental_get_tracing_count() if self._converted is not None else 0)


def function(fn, **kwargs) -> Function:
    """:class:`Function` (``tf.function`` keywords pass through, ``autograph`` excepted)."""
    return Function(fn, **kwargs)

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

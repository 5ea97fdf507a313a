"""Gradients: dataset-mean gradients, vectorised per-example gradients, and per-example
gradient · vector products.

* :func:`mean_gradient` — ``∇ (1/N Σ l(z) + R)`` over a dataset (or ``Σ l(z)`` with ``reduction="sum"``).
* :func:`per_example_gradients` — ``[B, p]`` blocks of ``∇ l(z)`` restricted to a parameter group,
  computed by ``tf.vectorized_map`` over one-example gradients (pfor: one vectorised
  pass per chunk, never a Python loop over examples) — or, on float32 models whose pfor gradient
  would crash TensorFlow with oneDNN (attention), a ``tf.map_fn`` loop (:mod:`tf_influence.safety`).
* :func:`per_example_dot` — ``∇ l(z) · V`` for every example ``z`` and every column of ``V``.
  With few columns this is a forward-mode JVP of the per-example losses along each column
  (exactly ``∇l(z)·v``, at the cost of one forward pass); with many columns it multiplies the
  per-example gradient block by ``V``.

Regularisation losses are *not* part of a per-example gradient: ``l(z)`` is the example's
own loss (see :mod:`objective`).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow as tf

from .capture import vectorized_gradients
from .compiled import cached_kernel, function
from .objective import EmptyDatasetError, Objective, batches, check_finite, finite_check
from .params import ParameterGroup, densify


def _progress(iterable, desc: str, enabled: bool, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


class GradientKernels:
    """Compiled per-batch gradient kernels of one (objective, group), cached per model (see :mod:`compiled`)."""

    def __init__(self, objective: Objective, group: ParameterGroup):
        self.objective, self.group = objective, group
        self.sum_grad = function(self._sum_grad, reduce_retracing=True)
        self.jacobian = function(self._jacobian, reduce_retracing=True)
        self.jvp = function(self._jvp, reduce_retracing=True)
        self.reg_grad = function(self._reg_grad)

    @classmethod
    def get(cls, objective: Objective, group: ParameterGroup) -> "GradientKernels":
        return cached_kernel(objective, "gradients", (group,), lambda: cls(objective, group))

    def _losses(self, x, y):
        losses = self.objective.per_example_losses(x, y, training=False)
        return check_finite(losses, f"loss of {self.objective.name}")

    def _sum_grad(self, x, y):
        with tf.GradientTape() as tape:
            tape.watch(self.group.tf_variables)   # frozen layers' variables are not watched by default
            loss = tf.reduce_sum(self._losses(x, y))
        g = tape.gradient(loss, self.group.tf_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.group.flatten(densify(g))

    def _reg_grad(self):
        with tf.GradientTape() as tape:
            tape.watch(self.group.tf_variables)
            loss = self.objective.regularization()
        g = tape.gradient(loss, self.group.tf_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.group.flatten(g)

    def _jacobian(self, x, y):
        # tf.vectorized_map over one-example gradients: pfor vectorises the whole backward pass.
        # Measured 7x faster than GradientTape.jacobian(..., experimental_use_pfor=True) on the
        # digits CNN (benchmarks/engine.py), which converts conv / pooling gradients poorly; a while-loop
        # map on float32 attention models (see tf_influence.safety)
        block = vectorized_gradients(self.objective, self.group.tf_variables, x, y, group=self.group)
        return check_finite(block, f"per-example gradient of {self.objective.name}")

    def _jvp(self, x, y, tangent):
        with tf.autodiff.ForwardAccumulator(self.group.tf_variables, self.group.unflatten(tangent)) as acc:
            losses = self._losses(x, y)
        return acc.jvp(losses, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _chunks(x, y, chunk: int | None):
    n = int(tf.shape(tf.nest.flatten(y)[0])[0])
    if chunk is None or n <= chunk:
        yield x, y
        return
    for s in range(0, n, chunk):
        yield (tf.nest.map_structure(lambda t: t[s:s + chunk], x), tf.nest.map_structure(lambda t: t[s:s + chunk], y))


def mean_gradient(objective: Objective, dataset, group: ParameterGroup, reduction: str = "mean",
                  include_regularization: bool | None = None, name: str = "dataset") -> tf.Tensor:
    """Gradient of ``1/N Σ l(z) (+ R)`` (``reduction="mean"``) or ``Σ l(z)`` (``"sum"``) w.r.t. ``group``.

    ``include_regularization`` defaults to True for "mean" (the training objective) and False
    for "sum" (a test-set loss sum, eq. 8).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError("reduction must be 'mean' or 'sum'")
    fns = GradientKernels.get(objective, group)
    total = tf.zeros([group.size], group.dtype)
    n = 0
    with finite_check(f"gradient of {objective.name} on {name}"):
        for x, y in batches(dataset, name, objective.model):
            total = total + fns.sum_grad(x, y)
            n += int(tf.shape(tf.nest.flatten(y)[0])[0])
    if n == 0:
        raise EmptyDatasetError(f"{name} is empty: it yielded no examples")
    if reduction == "mean":
        total = total / tf.cast(n, group.dtype)
    if include_regularization is None:
        include_regularization = reduction == "mean"
    if include_regularization and objective.has_regularization:
        total = total + fns.reg_grad()
    return total


#: The per-example gradient blocks of one chunk (:data:`~tf_influence.memory.PER_EXAMPLE_COPIES` ``[chunk, p]``
#: copies) are kept under this many bytes whatever the budget, as the factor fits' batches are
#: (``kfac.statistics.FACTOR_BATCH_BYTES``): a larger chunk is not faster — the vectorised backward pass is per
#: example either way — and at GPT-2 small a whole batch of 8 made self-influence by per-example gradients
#: peak at 15.1 GB in 275 s; chunks of 2 peak at 6.45 GB in 225 s.
PER_EXAMPLE_BLOCK_BYTES = 5 * 2**30


def fit_chunk(chunk_size: int | None, p: int, dtype_size: int, memory_budget=None) -> int:
    """The largest chunk ``≤ chunk_size`` whose per-example gradient blocks (``PER_EXAMPLE_COPIES`` ``[chunk, p]``
    buffers in the vectorised backward pass) fit half the memory budget and :data:`PER_EXAMPLE_BLOCK_BYTES`
    (at least one example); refuses, naming the sizes, when a single example does not fit the budget
    (:mod:`tf_influence.memory`). The chosen chunk's plan is checked against the budget."""
    from .memory import PER_EXAMPLE_COPIES, per_example_plan, resolve_budget
    budget = resolve_budget(memory_budget)
    per = int(p) * int(dtype_size) * PER_EXAMPLE_COPIES
    most = max(0, (budget // 2) // max(per, 1))
    if most < 1:
        per_example_plan(int(p), 1, dtype_size).check(budget // 2)
    chunk = int(min(chunk_size or 1 << 30, most, max(1, PER_EXAMPLE_BLOCK_BYTES // max(per, 1))))
    per_example_plan(int(p), chunk, dtype_size).check(budget)
    return chunk


def dataset_chunk(dataset, group: ParameterGroup, chunk_size: int | None = 512, memory_budget=None) -> int:
    """The chunk :func:`per_example_gradients` uses on ``dataset``: :func:`fit_chunk` of ``chunk_size``, never more
    than the dataset's first batch (planning 16 examples' blocks for batches of 8 had planned gpt2-mid's
    per-example self-influence at 1.64× its peak)."""
    from .memory import first_batch_shape
    batch = first_batch_shape(dataset)[0]
    return fit_chunk(batch if chunk_size is None else min(int(chunk_size), batch), group.size, group.dtype.size,
                     memory_budget)


def per_example_gradients(objective: Objective, dataset, group: ParameterGroup, chunk_size: int | None = 512,
                          progress: bool = False, name: str = "dataset", memory_budget=None) -> Iterator[tf.Tensor]:
    """Yield ``[B, p]`` blocks of per-example gradients ``∇_group l(z)``, in dataset order.

    Memory is bounded by ``chunk_size × p`` floats per block (batches larger than ``chunk_size`` are
    split; a chunk is at most the dataset's first batch, :func:`dataset_chunk`), and ``chunk_size`` is lowered
    so the blocks fit half of ``memory_budget`` and :data:`PER_EXAMPLE_BLOCK_BYTES` (:func:`fit_chunk`: on a 124 M-parameter
    GPT-2 two examples at a time).
    """
    fns = GradientKernels.get(objective, group)
    chunk_size = dataset_chunk(dataset, group, chunk_size, memory_budget)
    seen = 0
    with finite_check(f"per-example gradients of {objective.name} on {name}"):
        for x, y in _progress(batches(dataset, name, objective.model), f"per-example grads ({name})", progress):
            for xc, yc in _chunks(x, y, chunk_size):
                block = fns.jacobian(xc, yc)
                seen += int(block.shape[0])
                yield block
    if seen == 0:
        raise EmptyDatasetError(f"{name} is empty: it yielded no examples")


def stack_per_example_gradients(objective, dataset, group, **kw) -> tf.Tensor:
    """All per-example gradients as one ``[N, p]`` tensor (small datasets / tests)."""
    return tf.concat(list(per_example_gradients(objective, dataset, group, **kw)), axis=0)


def per_example_dot(objective: Objective, dataset, group: ParameterGroup, V, method: str = "auto",
                    chunk_size: int | None = 512, progress: bool = False, name: str = "dataset",
                    memory_budget=None) -> np.ndarray:
    """``∇ l(z) · V`` for every example: ``V`` ``[p]`` → ``[N]``, ``V`` ``[p, k]`` → ``[N, k]``.

    ``method``: ``"jvp"`` (forward mode, one pass per column), ``"jacobian"`` (per-example
    gradient block times ``V``) or ``"auto"`` (jvp for ≤ 4 columns). Either is planned before the
    first batch (:func:`tf_influence.memory.jvp_plan`; the per-example blocks' plan) and refused
    over ``memory_budget``.
    """
    V = tf.convert_to_tensor(V)
    V = tf.cast(V, group.dtype)
    was_vector = V.shape.rank == 1
    if was_vector:
        V = V[:, None]
    if V.shape[0] != group.size:
        raise ValueError(f"vector has {V.shape[0]} entries, group '{group.name}' has {group.size} parameters")
    k = V.shape[1]
    if method == "auto":
        method = "jvp" if k <= 4 else "jacobian"
    if method not in ("jvp", "jacobian"):
        raise ValueError("method must be 'auto', 'jvp' or 'jacobian'")
    fns = GradientKernels.get(objective, group)
    rows = []
    with finite_check(f"scores of {objective.name} on {name}"):
        if method == "jvp":
            from .memory import batch_shape, jvp_plan
            cols = None
            for x, y in _progress(batches(dataset, name, objective.model), f"scoring ({name})", progress):
                if cols is None:     # planned on the first batch's shape, before its pass (no extra read)
                    jvp_plan(objective, group, columns=k, batch_shape=batch_shape(y)).check(memory_budget)
                    # the columns once, not sliced per batch (a column slice is a copy: 0.5 GB at GPT-2 small)
                    cols = [tf.reshape(V, [-1])] if k == 1 else tf.unstack(V, axis=1)
                rows.append(tf.stack([fns.jvp(x, y, c) for c in cols], axis=1))
        else:
            for block in per_example_gradients(objective, dataset, group, chunk_size, progress, name, memory_budget):
                rows.append(block @ V)
    if not rows:
        raise EmptyDatasetError(f"{name} is empty: it yielded no examples")
    out = tf.concat(rows, axis=0).numpy()
    if not np.all(np.isfinite(out)):
        raise ValueError(f"scores of {objective.name} on {name} contain NaN/Inf")
    return out[:, 0] if was_vector else out


def per_example_losses(objective: Objective, dataset, name: str = "dataset") -> np.ndarray:
    """``l(z)`` for every example in dataset order (the rebuttal's pretraining-loss baseline)."""
    out = []
    fn = cached_kernel(objective, "losses", (), lambda: function(
        lambda x, y: objective.per_example_losses(x, y, training=False), reduce_retracing=True))
    with finite_check(f"losses of {objective.name} on {name}"):
        for x, y in batches(dataset, name, objective.model):
            out.append(fn(x, y).numpy())
    if not out:
        raise EmptyDatasetError(f"{name} is empty: it yielded no examples")
    return np.concatenate(out)


__all__ = ["GradientKernels", "dataset_chunk", "mean_gradient", "per_example_gradients", "stack_per_example_gradients",
           "per_example_dot", "per_example_losses"]

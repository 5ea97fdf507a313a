"""Hessian-vector products of a dataset's mean loss, streamed over batches.

``HessianOperator(objective, dataset, rows, cols)`` is the linear map
``v ↦ (∂²L / ∂rows ∂cols) · v`` with ``L = 1/N Σ_z l(z) + R`` (see :mod:`objective`).
With ``rows == cols`` it is the Hessian block of a group; with different groups it is the
mixed block of eq. 10 / 11 (e.g. ``∂²F/∂Θ∂W``), and :meth:`HessianOperator.transpose`
gives ``∂²F/∂W∂Θ``. No Hessian is ever materialised: each product costs one pass over the
data and O(p) memory.

Modes:
  * ``"fob"`` forward-over-back: a ``tf.autodiff.ForwardAccumulator`` pushes ``v`` through
    the gradient computed by a ``GradientTape`` (the default; cheapest).
  * ``"rr"`` reverse-over-reverse: gradient of ``⟨∇L, v⟩``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .objective import EmptyDatasetError, Objective, check_finite, count_examples, finite_check, split_batch, subsample
from .params import ParameterGroup

MODES = ("fob", "rr")


def _as_matrix(v, p: int, dtype) -> tuple[tf.Tensor, bool]:
    v = tf.convert_to_tensor(v)
    if v.dtype != dtype:
        v = tf.cast(v, dtype)
    was_vector = v.shape.rank == 1
    if was_vector:
        v = v[:, None]
    if v.shape.rank != 2 or v.shape[0] != p:
        raise ValueError(f"expected a vector of length {p} or a [{p}, k] matrix, got shape {v.shape}")
    return v, was_vector


class HessianOperator:
    """``v ↦ ∂²L/∂rows∂cols · v`` over a (batched ``(x, y)``) dataset.

    Args:
      objective: the loss (model + per-example loss + regularisers).
      dataset: batched ``(x, y)`` ``tf.data.Dataset``.
      rows, cols: parameter groups; ``cols`` defaults to ``rows`` (a square Hessian block).
      mode: ``"fob"`` (forward-over-back) or ``"rr"`` (reverse-over-reverse).
      sample_size: if set, use a fixed random subset of that many examples (Hessian
        subsampling; the paper uses 1,000 for the pretraining Hessian).
      seed: seed of the subset.
      extra_diagonal: optional ``[p]`` vector ``d`` added as ``diag(d)`` (square blocks only),
        e.g. the ``2α I`` on the W block of the proximal finetuning objective (eq. 15).
      name: used in error messages.
    """

    def __init__(self, objective: Objective, dataset, rows: ParameterGroup, cols: ParameterGroup | None = None,
                 mode: str = "fob", sample_size: int | None = None, seed: int = 0,
                 extra_diagonal=None, name: str | None = None, _num_examples: int | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown HVP mode '{mode}'; choose one of {MODES}")
        self.objective = objective
        self.rows = rows
        self.cols = cols if cols is not None else rows
        self.mode = mode
        self.name = name or f"Hessian[{self.rows.name},{self.cols.name}] of {objective.name}"
        if sample_size is not None:
            dataset = subsample(dataset, sample_size, seed=seed, name=self.name)
        self.dataset = dataset
        self.num_examples = _num_examples or count_examples(dataset, f"dataset of {self.name}")
        self.dtype = rows.dtype
        self.shape = (rows.size, self.cols.size)
        if extra_diagonal is not None:
            if self.rows is not self.cols and self.rows.variables != self.cols.variables:
                raise ValueError("extra_diagonal is only defined for square Hessian blocks")
            extra_diagonal = tf.cast(tf.reshape(extra_diagonal, [-1]), self.dtype)
            if extra_diagonal.shape[0] != rows.size:
                raise ValueError(f"extra_diagonal has length {extra_diagonal.shape[0]}, expected {rows.size}")
        self.extra_diagonal = extra_diagonal
        self._sample_size, self._seed = sample_size, seed
        self._batch_fn = tf.function(self._batch_hvp, reduce_retracing=True)
        self._reg_fn = tf.function(self._reg_hvp, reduce_retracing=True)
        self.num_matvecs = 0

    # -- the products -------------------------------------------------------------------------
    def _second_order(self, loss_fn, tangent):
        rows_vars, cols_vars = self.rows.tf_variables, self.cols.tf_variables
        tangents = self.cols.unflatten(tangent)
        zero = tf.UnconnectedGradients.ZERO
        if self.mode == "fob":
            with tf.autodiff.ForwardAccumulator(cols_vars, tangents) as acc:
                with tf.GradientTape() as tape:
                    loss = loss_fn()
                grads = tape.gradient(loss, rows_vars, unconnected_gradients=zero)
            out = acc.jvp(grads, unconnected_gradients=zero)
        else:
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    loss = loss_fn()
                grads = inner.gradient(loss, cols_vars, unconnected_gradients=zero)
                gv = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, tangents)])
            out = outer.gradient(gv, rows_vars, unconnected_gradients=zero)
        return self.rows.flatten(out)

    def _batch_hvp(self, x, y, tangent, total):
        def loss_fn():
            losses = self.objective.per_example_losses(x, y, training=False)
            losses = check_finite(losses, f"loss of {self.objective.name}")
            return tf.reduce_sum(losses) / total
        return self._second_order(loss_fn, tangent)

    def _reg_hvp(self, tangent):
        return self._second_order(self.objective.regularization, tangent)

    def matvec(self, v) -> tf.Tensor:
        """Apply the block to ``v`` (``[p_cols]`` → ``[p_rows]``, or ``[p_cols, k]`` → ``[p_rows, k]``)."""
        V, was_vector = _as_matrix(v, self.cols.size, self.dtype)
        k = V.shape[1]
        total = tf.constant(self.num_examples, dtype=self.dtype)
        acc = [tf.zeros([self.rows.size], self.dtype) for _ in range(k)]
        with finite_check(self.name):
            for batch in self.dataset:
                x, y = split_batch(batch)
                for j in range(k):
                    acc[j] = acc[j] + self._batch_fn(x, y, V[:, j], total)
            if self.objective.has_regularization:
                for j in range(k):
                    acc[j] = acc[j] + self._reg_fn(V[:, j])
            out = tf.stack(acc, axis=1)
            out = check_finite(out, f"Hessian-vector product of {self.name}")
        if self.extra_diagonal is not None:
            out = out + self.extra_diagonal[:, None] * V
        self.num_matvecs += k
        return out[:, 0] if was_vector else out

    __call__ = matvec

    def transpose(self) -> "HessianOperator":
        """The block with rows and columns swapped (``∂²L/∂cols∂rows``)."""
        return HessianOperator(self.objective, self.dataset, self.cols, self.rows, mode=self.mode,
                               extra_diagonal=self.extra_diagonal, name=f"{self.name}ᵀ",
                               _num_examples=self.num_examples)

    def to_dense(self, max_params: int = 4096) -> np.ndarray:
        """The explicit block, built column by column (small models only)."""
        p_rows, p_cols = self.shape
        if max(p_rows, p_cols) > max_params:
            raise ValueError(
                f"refusing to build the dense {p_rows}×{p_cols} block of {self.name}: more than "
                f"max_params={max_params} parameters; use an iterative solver (cg, cg_squared, lissa)")
        eye = tf.eye(p_cols, dtype=self.dtype)
        cols = [self.matvec(eye[:, j]).numpy() for j in range(p_cols)]
        return np.stack(cols, axis=1)


def hvp(objective: Objective, dataset, group: ParameterGroup, v, mode: str = "fob") -> tf.Tensor:
    """One Hessian-vector product ``∇²_group L · v`` (convenience wrapper)."""
    return HessianOperator(objective, dataset, group, mode=mode).matvec(v)


def mixed_hvp(objective: Objective, dataset, rows: ParameterGroup, cols: ParameterGroup, v,
              mode: str = "fob") -> tf.Tensor:
    """``(∂²L / ∂rows ∂cols) · v`` — e.g. ``(∂²F/∂Θ∂W)·v`` of eq. 10 with rows=Θ, cols=W."""
    return HessianOperator(objective, dataset, rows, cols, mode=mode).matvec(v)


__all__ = ["HessianOperator", "hvp", "mixed_hvp", "MODES", "EmptyDatasetError"]

"""Hessian-vector products of a dataset's mean loss, streamed over batches.

``HessianOperator(objective, dataset, rows, cols)`` is the linear map
``v ↦ (∂²L / ∂rows ∂cols) · v`` with ``L = 1/N Σ_z l(z) + R`` (see :mod:`objective`).
With ``rows == cols`` it is the Hessian block of a group; with different groups it is the
mixed block of eq. 10 / 11 (e.g. ``∂²F/∂Θ∂W``), and :meth:`HessianOperator.transpose`
gives ``∂²F/∂W∂Θ``. No Hessian is materialised by a product: each costs one pass over the
data and O(p) memory. A dataset of at most ``CACHE_BYTES`` is read once and its batches are kept
as tensors (an iterative solver applies the operator hundreds of times; re-reading a small dataset
through ``tf.data`` — a Hessian subsample filters the whole corpus — cost more than the products).

Modes (for one vector at a time):
  * ``"fob"`` forward-over-back: a ``tf.autodiff.ForwardAccumulator`` pushes ``v`` through
    the gradient computed by a ``GradientTape`` (the default; cheapest).
  * ``"rr"`` reverse-over-reverse: gradient of ``⟨∇L, v⟩``.

Several vectors at once (``matvec`` of a ``[p, k]`` matrix, :meth:`HessianOperator.to_dense`)
take one vectorised Jacobian of ``∇Lᵀ V`` per batch (``GradientTape.jacobian`` with pfor) instead
of ``k`` separate products.

Sparse gradients: a Keras ``Embedding`` has an ``IndexedSlices`` gradient, which
``ForwardAccumulator`` cannot push a tangent through; gradients are densified
(``tf.convert_to_tensor``) inside the kernels, so every mode works on embedding models.
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

from .compiled import cached_kernel, function
from .objective import Objective, batches, check_dataset, check_finite, count_examples, finite_check, subsample
from .params import ParameterGroup, densify
from .safety import function_safe

MODES = ("fob", "rr")

#: Datasets up to this many bytes (features + labels) are held in memory as their batches.
CACHE_BYTES = 256 * 2**20


class _Batches(list):
    """Held ``(x, y)`` batches (a list that can be weakly referenced)."""


#: Held batches by dataset object, while an operator holds them: the operators of one computation
#: (H_TT and H_WT over the finetuning data, a block and its transpose) share one copy, freed with them.
_HELD = weakref.WeakKeyDictionary()


def _examples(y) -> int:
    return int(tf.shape(tf.nest.flatten(y)[0])[0])


def _held_batches(dataset, name: str, model, max_bytes: int, count: bool):
    """``(batches, n)``: the ``(x, y)`` batches of ``dataset`` as tensors (``None`` once they pass
    ``max_bytes`` or are not dense), and its number of examples — counted in the same pass when
    ``count`` (else ``None`` for a dataset that is not held)."""
    try:
        ref = _HELD.get(dataset)
    except TypeError:                           # not weak-referenceable: not shared
        ref = None
    held = ref() if ref is not None else None
    if held is not None:
        return held, sum(_examples(y) for _, y in held)
    held, size, n = _Batches(), 0, 0
    for x, y in batches(dataset, name, model):
        n += _examples(y)
        if held is None:
            continue                            # counting only
        parts = tf.nest.flatten((x, y))
        size += sum(int(np.prod(t.shape)) * t.dtype.size for t in parts if isinstance(t, tf.Tensor))
        if not all(isinstance(t, tf.Tensor) for t in parts) or size > max_bytes:   # ragged / sparse, or large
            held = None
            if not count:
                return None, None
            continue
        held.append((x, y))
    if held is not None:
        try:
            _HELD[dataset] = weakref.ref(held)
        except TypeError:
            pass
    return held, n


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


class HvpKernels:
    """Compiled per-batch Hessian-block kernels of one (objective, rows, cols, mode); see :mod:`compiled`."""

    def __init__(self, objective: Objective, rows: ParameterGroup, cols: ParameterGroup, mode: str):
        self.objective, self.rows, self.cols, self.mode = objective, rows, cols, mode
        self.batch = function(self._batch_hvp, reduce_retracing=True)
        self.block = function(self._batch_block, reduce_retracing=True)
        self.reg = function(self._reg_hvp, reduce_retracing=True)
        self.reg_block = function(self._reg_block, reduce_retracing=True)

    @classmethod
    def get(cls, objective, rows, cols, mode) -> "HvpKernels":
        return cached_kernel(objective, "hvp", (rows, cols), lambda: cls(objective, rows, cols, mode), mode)

    def _data_loss(self, x, y, total):
        def loss_fn():
            losses = self.objective.per_example_losses(x, y, training=False)
            losses = check_finite(losses, f"loss of {self.objective.name}")
            return tf.reduce_sum(losses) / total
        return loss_fn

    def _second_order(self, loss_fn, tangent):
        rows_vars, cols_vars = self.rows.tf_variables, self.cols.tf_variables
        tangents = self.cols.unflatten(tangent)
        zero = tf.UnconnectedGradients.ZERO
        if self.mode == "fob":
            with tf.autodiff.ForwardAccumulator(cols_vars, tangents) as acc:
                with tf.GradientTape() as tape:
                    tape.watch(rows_vars)   # frozen layers' variables are not watched by default
                    loss = loss_fn()
                grads = densify(tape.gradient(loss, rows_vars, unconnected_gradients=zero))
            out = acc.jvp(grads, unconnected_gradients=zero)
        else:
            with tf.GradientTape() as outer:
                outer.watch(rows_vars)
                with tf.GradientTape() as inner:
                    inner.watch(cols_vars)
                    loss = loss_fn()
                grads = densify(inner.gradient(loss, cols_vars, unconnected_gradients=zero))
                gv = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, tangents)])
            out = outer.gradient(gv, rows_vars, unconnected_gradients=zero)
        return self.rows.flatten(out)

    def _block(self, loss_fn, V):
        """``∂²L/∂rows∂cols · V`` for a ``[p_cols, k]`` block: one vectorised Jacobian of ``∇Lᵀ V``."""
        zero = tf.UnconnectedGradients.ZERO
        with tf.GradientTape() as outer:
            outer.watch(self.rows.tf_variables)
            with tf.GradientTape() as inner:
                inner.watch(self.cols.tf_variables)
                loss = loss_fn()
            g = self.cols.flatten(densify(inner.gradient(loss, self.cols.tf_variables, unconnected_gradients=zero)))
            gv = tf.linalg.matvec(V, g, transpose_a=True)  # [k]
        # pfor unless it would crash TensorFlow (float32 attention with oneDNN: tf_influence.safety)
        pfor = self._pfor_safe(loss_fn)
        jac = outer.jacobian(gv, self.rows.tf_variables, unconnected_gradients=zero, experimental_use_pfor=pfor)
        return tf.transpose(self.rows.flatten_batched(densify(jac)))  # [p_rows, k]

    def _pfor_safe(self, loss_fn) -> bool:
        return function_safe(loss_fn, (), key=("hvp-block", id(self)))

    def _batch_hvp(self, x, y, tangent, total):
        return self._second_order(self._data_loss(x, y, total), tangent)

    def _batch_block(self, x, y, V, total):
        return self._block(self._data_loss(x, y, total), V)

    def _reg_hvp(self, tangent):
        return self._second_order(self.objective.regularization, tangent)

    def _reg_block(self, V):
        return self._block(self.objective.regularization, V)


class HessianOperator:
    """``v ↦ ∂²L/∂rows∂cols · v`` over a (batched ``(x, y)``) dataset.

    Args:
      objective: the loss (model + per-example loss + regularisers).
      dataset: batched ``(x, y)`` ``tf.data.Dataset``.
      rows, cols: parameter groups; ``cols`` defaults to ``rows`` (a square Hessian block).
      mode: ``"fob"`` (forward-over-back) or ``"rr"`` (reverse-over-reverse).
      hessian_samples: if set, use a fixed random subset of that many examples (Hessian
        subsampling; the paper uses 1,000 for the pretraining Hessian).
      seed: seed of the subset.
      extra_diagonal: optional ``[p]`` vector ``d`` added as ``diag(d)`` (square blocks only),
        e.g. the ``2α I`` on the W block of the proximal finetuning objective (eq. 15).
      name: used in error messages.
      num_examples: the number of examples of ``dataset`` if the caller already counted them
        (saves one pass); ignored when ``hessian_samples`` draws a subset.

    >>> import keras
    >>> from tf_influence import Objective, ParameterGroup
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    >>> ds = tf.data.Dataset.from_tensor_slices((tf.eye(2), tf.zeros([2, 1]))).batch(2)
    >>> H = HessianOperator(Objective(model, "mse"), ds, ParameterGroup.from_model(model))
    >>> H.to_dense().round(6).tolist()   # mean squared error over x = e1, e2: H = 2/2 · I
    [[1.0, 0.0], [0.0, 1.0]]
    """

    def __init__(self, objective: Objective, dataset, rows: ParameterGroup, cols: ParameterGroup | None = None,
                 mode: str = "fob", hessian_samples: int | None = None, seed: int = 0,
                 extra_diagonal=None, name: str | None = None, num_examples: int | None = None, _batches=None):
        if mode not in MODES:
            raise ValueError(f"unknown HVP mode '{mode}'; choose one of {MODES}")
        self.objective = objective
        self.rows = rows
        self.cols = cols if cols is not None else rows
        self.mode = mode
        self.name = name or f"Hessian[{self.rows.name},{self.cols.name}] of {objective.name}"
        check_dataset(dataset, f"dataset of {self.name}", objective.model)
        if hessian_samples is not None:
            dataset = subsample(dataset, hessian_samples, seed=seed, name=f"dataset of {self.name}")
            num_examples = None
        self.dataset = dataset
        if _batches is not None:
            self._held, n = _batches, sum(_examples(y) for _, y in _batches)
        else:
            self._held, n = _held_batches(dataset, f"dataset of {self.name}", objective.model, CACHE_BYTES,
                                          count=not num_examples)
        if not num_examples and n == 0:
            count_examples(dataset, f"dataset of {self.name}", objective.model)   # raises, naming the dataset
        self.num_examples = num_examples or n
        self._has_regularization = objective.has_regularization
        self.dtype = rows.dtype
        self.shape = (rows.size, self.cols.size)
        if extra_diagonal is not None:
            if self.rows is not self.cols and self.rows.variables != self.cols.variables:
                raise ValueError("extra_diagonal is only defined for square Hessian blocks")
            extra_diagonal = tf.cast(tf.reshape(extra_diagonal, [-1]), self.dtype)
            if extra_diagonal.shape[0] != rows.size:
                raise ValueError(f"extra_diagonal has length {extra_diagonal.shape[0]}, expected {rows.size}")
        self.extra_diagonal = extra_diagonal
        self.hessian_samples, self.seed = hessian_samples, seed
        self.kernels = HvpKernels.get(objective, self.rows, self.cols, mode)
        self.num_matvecs = 0

    def matvec(self, v) -> tf.Tensor:
        """Apply the block to ``v`` (``[p_cols]`` → ``[p_rows]``, or ``[p_cols, k]`` → ``[p_rows, k]``)."""
        V, was_vector = _as_matrix(v, self.cols.size, self.dtype)
        k = V.shape[1]
        total = tf.constant(self.num_examples, dtype=self.dtype)
        kern = self.kernels
        data = self._held if self._held is not None else batches(self.dataset, f"dataset of {self.name}")
        with finite_check(self.name):
            if k == 1:
                out = tf.zeros([self.rows.size], self.dtype)
                for x, y in data:
                    out = out + kern.batch(x, y, V[:, 0], total)
                if self._has_regularization:
                    out = out + kern.reg(V[:, 0])
                out = out[:, None]
            else:
                out = tf.zeros([self.rows.size, k], self.dtype)
                for x, y in data:
                    out = out + kern.block(x, y, V, total)
                if self._has_regularization:
                    out = out + kern.reg_block(V)
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
                               num_examples=self.num_examples, _batches=self._held)

    def to_dense(self, max_params: int = 4096, block_size: int = 256) -> np.ndarray:
        """The explicit block (small models only), ``block_size`` columns per vectorised pass."""
        p_rows, p_cols = self.shape
        if max(p_rows, p_cols) > max_params:
            raise ValueError(
                f"refusing to build the dense {p_rows}×{p_cols} block of {self.name}: more than "
                f"max_params={max_params} parameters; use an iterative solver (cg, cg_squared, lissa)")
        # equal-width blocks (the last one padded with zero columns): one traced kernel, not two
        n_blocks = -(-p_cols // block_size)
        width = -(-p_cols // n_blocks)
        eye = tf.eye(p_cols, n_blocks * width, dtype=self.dtype)
        cols = [self.matvec(eye[:, j:j + width]).numpy() for j in range(0, n_blocks * width, width)]
        return np.concatenate(cols, axis=1)[:, :p_cols]


def hvp(objective: Objective, dataset, group: ParameterGroup, v, mode: str = "fob") -> tf.Tensor:
    """One Hessian-vector product ``∇²_group L · v`` (convenience wrapper)."""
    return HessianOperator(objective, dataset, group, mode=mode).matvec(v)


def mixed_hvp(objective: Objective, dataset, rows: ParameterGroup, cols: ParameterGroup, v,
              mode: str = "fob") -> tf.Tensor:
    """``(∂²L / ∂rows ∂cols) · v`` — e.g. ``(∂²F/∂Θ∂W)·v`` of eq. 10 with rows=Θ, cols=W."""
    return HessianOperator(objective, dataset, rows, cols, mode=mode).matvec(v)


__all__ = ["CACHE_BYTES", "HessianOperator", "HvpKernels", "hvp", "mixed_hvp", "MODES"]

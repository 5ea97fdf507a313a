"""Deterministic training with per-example weights, for reproducible (leave-one-out) retraining.

:class:`WeightedTrainer` minimises ``Σ_i w_i l(z_i) / Σ_i w_i + R`` over a chosen set of
variables, with full-batch or fixed-order minibatch steps. A weight of 0 removes an example
*without changing anything else*: the minibatch order, the optimizer's trajectory and the
random state are identical across runs, so two runs differ only by the removed example
(Appendix B's "same process … with this leave-one-out pretraining dataset").

Adam and SGD are implemented here with their state in ``tf.Variable``s that are reset at the
start of every run, so one compiled training loop (``tf.function`` + ``tf.while_loop``)
serves all runs — no retracing per leave-one-out example.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..objective import NonFiniteError, Objective
from ..params import ParameterGroup


class WeightedTrainer:
    """Train ``group`` of ``objective.model`` on ``(x, y)`` with example weights.

    Args:
      objective: model + per-example loss (+ regularisers).
      x, y: the full training arrays (kept on device as constants).
      group: the variables to update (others stay fixed, e.g. W in finetuning case 1).
      optimizer: ``"adam"`` or ``"sgd"``.
      learning_rate: step size.
      batch_size: ``None`` for full-batch steps, else the minibatch size; minibatches follow a
        fixed seeded sequence of permutations shared by every run.
      seed: seed of the minibatch order.
    """

    def __init__(self, objective: Objective, x, y, group: ParameterGroup, optimizer: str = "adam",
                 learning_rate: float = 1e-3, batch_size: int | None = None, seed: int = 0,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-7):
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got '{optimizer}'")
        self.objective, self.group = objective, group
        self.x = tf.nest.map_structure(tf.constant, x)  # arrays, or tuples / dicts of arrays
        self.y = tf.constant(y)
        self.n = int(self.y.shape[0])
        if self.n == 0:
            raise ValueError("WeightedTrainer got no training examples")
        self.optimizer, self.lr = optimizer, float(learning_rate)
        self.batch_size, self.seed = batch_size, seed
        self.b1, self.b2, self.eps = beta1, beta2, eps
        dtype = group.dtype
        self._m = [tf.Variable(tf.zeros(s, dtype), trainable=False) for s in group.shapes]
        self._v = [tf.Variable(tf.zeros(s, dtype), trainable=False) for s in group.shapes]
        self._run = tf.function(self._run_impl)
        self._orders = {}

    def _order(self, steps: int) -> np.ndarray:
        """``[steps, batch]`` example indices: concatenated seeded permutations (epochs)."""
        if self.batch_size is None:
            return np.zeros([steps, 1], np.int32)
        key = steps
        if key not in self._orders:
            rng = np.random.default_rng(self.seed)
            need = steps * self.batch_size
            perms = [rng.permutation(self.n) for _ in range(need // self.n + 1)]
            self._orders[key] = np.concatenate(perms)[:need].reshape(steps, self.batch_size).astype(np.int32)
        return self._orders[key]

    def weighted_loss(self, x, y, w):
        """``Σ w_i l(z_i) / Σ w_i + R`` on one batch."""
        losses = self.objective.per_example_losses(x, y, training=False)
        w = tf.cast(w, losses.dtype)
        return tf.reduce_sum(w * losses) / tf.maximum(tf.reduce_sum(w), 1e-12) + self.objective.regularization()

    def _run_impl(self, steps, weights, order, full_batch: bool):
        variables = self.group.tf_variables
        dtype = self.group.dtype
        for s in tf.range(steps):
            if full_batch:
                x, y, w = self.x, self.y, weights
            else:
                idx = order[s]
                x = tf.nest.map_structure(lambda t: tf.gather(t, idx), self.x)
                y, w = tf.gather(self.y, idx), tf.gather(weights, idx)
            with tf.GradientTape() as tape:
                loss = self.weighted_loss(x, y, w)
            grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            t = tf.cast(s + 1, dtype)
            for var, g, m, v in zip(variables, grads, self._m, self._v):
                if self.optimizer == "sgd":
                    var.assign_sub(self.lr * g)
                else:
                    m.assign(self.b1 * m + (1 - self.b1) * g)
                    v.assign(self.b2 * v + (1 - self.b2) * g * g)
                    mhat = m / (1 - tf.pow(tf.cast(self.b1, dtype), t))
                    vhat = v / (1 - tf.pow(tf.cast(self.b2, dtype), t))
                    var.assign_sub(self.lr * mhat / (tf.sqrt(vhat) + self.eps))
        return self.weighted_loss(self.x, self.y, weights)

    def run(self, steps: int, weights=None) -> float:
        """Take ``steps`` optimizer steps from the current weights (fresh optimizer state).

        Returns the final weighted training loss."""
        if steps <= 0:
            return float("nan")
        w = np.ones(self.n, np.float32) if weights is None else np.asarray(weights, np.float32)
        if w.shape != (self.n,):
            raise ValueError(f"weights must have shape ({self.n},), got {w.shape}")
        for m, v in zip(self._m, self._v):
            m.assign(tf.zeros_like(m))
            v.assign(tf.zeros_like(v))
        loss = float(self._run(tf.constant(steps), tf.constant(w), tf.constant(self._order(steps)),
                               self.batch_size is None))
        if not np.isfinite(loss):
            raise NonFiniteError(f"training of {self.objective.name} diverged (loss {loss}); lower the learning rate")
        return loss


    def gradient_norm(self, weights=None) -> float:
        """Global norm of the gradient of the weighted full-data loss over the trained group."""
        w = tf.constant(np.ones(self.n, np.float32) if weights is None else np.asarray(weights, np.float32))
        with tf.GradientTape() as tape:
            loss = self.weighted_loss(self.x, self.y, w)
        g = tape.gradient(loss, self.group.tf_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return float(tf.linalg.global_norm(g))


def snapshot(model) -> list:
    """Copies of all variable values of a model (trainable and not)."""
    return [v.numpy().copy() for v in model.variables]


def restore(model, values) -> None:
    for v, val in zip(model.variables, values):
        v.assign(val)

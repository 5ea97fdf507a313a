"""PRESENCE: online microbatch reweighting by self-influence (Thakkar et al. 2023, Algorithm 2).

For a minibatch split into ``n`` contiguous microbatches ``b_i``:

    g_i = ∇ l(b_i)                                  (microbatch mean loss, one vectorised pass)
    s_i = Σ_{k∈K} ‖g_{i,k}‖²                        (MicrobatchSI_K, eq. 11 / 3)
    s   ← (s − μ(s)) / sqrt(σ²(s) + ε·μ(s)²)        (eq. 7, ε relative: see below)
    w_i = softmax(τ · s)_i                          (eq. 8)
    G   = Σ_i w_i g_i                               (eq. 9)

Eq. 7's ε is "a small number" for numerical stability. Taken literally as an absolute constant
it makes the weights depend on the loss's arbitrary scale: measured on the transformer LM of
``experiments.presence_lm`` (mean token loss), the embedding layer's microbatch SI was ~4·10⁻⁵
with σ ≈ 4·10⁻⁶ within a step between steps 20 and 120, so σ² ≈ 10⁻¹¹ ≪ ε = 10⁻⁶ and every
weight stayed within 0.009 of 0.25 — the first stage of the two-stage schedule silently did
nothing (the paper sums its loss with a normalising factor of 234,496, where the scores are
large). ε is therefore relative by default (``relative_eps=True``: ε·μ(s)², so
``normalize(c·s) = normalize(s)`` for any scale c > 0); ``relative_eps=False`` is the literal
constant.

``τ = 0`` gives ``w_i = 1/n`` and ``G`` = the ordinary minibatch gradient. τ follows a
schedule: the paper's two stages (eq. 10: ``τ1 > 0`` for steps ``i ≤ I``, then ``τ2 < 0``),
constant direct / inverse, inverse-then-direct, or any callable of the step.

Keras integration: :class:`PresenceModel` wraps any Keras 3 model and overrides ``train_step``
(so ``fit`` does the reweighted step); :class:`PresenceCallback` drives τ from a schedule and
logs per-step τ, SI statistics and microbatch weights (its ``records``, the ``History`` logs,
and TensorBoard scalars / histograms when given a ``log_dir``).

Distribution: under ``tf.distribute`` each replica splits its local batch into
``num_microbatches`` microbatches; the SI scores of **all microbatches of the global batch**
are all-gathered, normalised and soft-maxed together, each replica weights its own
microbatch gradients with its slice of the global weights, and the optimizer's cross-replica
sum yields exactly ``Σ_i w_i g_i`` over the global batch — the same update as one device
processing the global batch with ``num_microbatches × replicas`` microbatches (tested with
MirroredStrategy on two logical CPUs). :func:`get_strategy` returns a TPUStrategy when a TPU
is reachable (``TPUClusterResolver``), else MirroredStrategy over the visible GPUs / CPUs, else
the default strategy.
"""

from __future__ import annotations

import math
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from .objective import per_example_loss_fn, reduce_per_example
from .params import ParameterGroupError, find_layer, tf_variable
from .safety import function_safe

EPS = 1e-6


# -- the math -----------------------------------------------------------------------------------
def normalize_scores(si, eps: float = EPS, relative_eps: bool = True):
    """Eq. 7: ``(s − μ(s)) / sqrt(σ²(s) + ε')`` (population variance), ``ε' = ε·μ(s)²`` when
    ``relative_eps`` (scale-free; module docstring) else ``ε' = ε``.

    >>> import numpy as np
    >>> np.round(normalize_scores([1e-5, 2e-5, 3e-5]).numpy(), 3)   # tiny scores still spread
    array([-1.225,  0.   ,  1.225], dtype=float32)
    >>> np.round(normalize_scores([1e-5, 2e-5, 3e-5], relative_eps=False).numpy(), 3)
    array([-0.01,  0.  ,  0.01], dtype=float32)
    """
    si = tf.convert_to_tensor(si)
    if not si.dtype.is_floating:
        si = tf.cast(si, tf.float32)
    mean = tf.reduce_mean(si)
    var = tf.reduce_mean(tf.square(si - mean))
    e = tf.cast(eps, si.dtype)
    if relative_eps:
        e = e * tf.square(mean)
    tiny = tf.constant(np.finfo(si.dtype.as_numpy_dtype).tiny, si.dtype)   # all-equal scores → 0, not NaN
    return (si - mean) / tf.sqrt(tf.maximum(var + e, tiny))


def presence_weights(si, tau, eps: float = EPS, relative_eps: bool = True):
    """Eq. 7–8: softmax of ``τ ·`` normalised self-influence scores."""
    s = normalize_scores(si, eps, relative_eps)
    tau = tf.cast(tf.convert_to_tensor(tau, dtype_hint=s.dtype), s.dtype)  # no float32 detour for Python floats
    return tf.nn.softmax(tau * s)


def split_microbatches(x, num_microbatches: int):
    """``[B, ...]`` → ``[n, B/n, ...]`` (contiguous microbatches) for every tensor of ``x``."""
    def split(t):
        t = tf.convert_to_tensor(t)
        b = t.shape[0]
        if b is not None and b % num_microbatches:
            raise ValueError(f"batch size {b} is not divisible by num_microbatches={num_microbatches}; "
                             "use a batch size that is a multiple of it (e.g. dataset.batch(..., drop_remainder=True))")
        if b is None:
            tf.debugging.assert_equal(tf.shape(t)[0] % num_microbatches, 0, message=(
                f"batch size is not divisible by num_microbatches={num_microbatches}; "
                "use dataset.batch(..., drop_remainder=True) with a multiple of it"))
        return tf.reshape(t, tf.concat([[num_microbatches, -1], tf.shape(t)[1:]], 0))
    return tf.nest.map_structure(split, x)


def microbatch_gradients(objective_or_loss, x, y, variables, num_microbatches: int, sample_weight=None,
                         training: bool = False, return_outputs: bool = False):
    """Per-microbatch mean losses ``[n]`` and gradients (one ``[n, *shape]`` tensor per variable),
    in one ``tf.vectorized_map`` pass (unrolled over the microbatches where pfor would crash
    TensorFlow: float32 attention with oneDNN, see :mod:`tf_influence.safety`).

    ``objective_or_loss`` is an :class:`~tf_influence.objective.Objective` or a callable
    ``loss(x_mb, y_mb, sample_weight_mb) -> scalar`` (or ``-> (scalar, outputs)`` with
    ``return_outputs=True``, which also returns the outputs re-joined to ``[B, ...]``).
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be ≥ 1, got {num_microbatches}")
    tf_vars = [tf_variable(v) for v in variables]
    if hasattr(objective_or_loss, "per_example_losses"):
        obj = objective_or_loss

        def loss_fn(xm, ym, wm):
            losses = obj.per_example_losses(xm, ym, training=training)
            if wm is not None:
                losses = losses * tf.cast(wm, losses.dtype)
            return tf.reduce_mean(losses) + obj.regularization()
    else:
        loss_fn = objective_or_loss
    xs, ys = split_microbatches(x, num_microbatches), split_microbatches(y, num_microbatches)
    ws = split_microbatches(sample_weight, num_microbatches) if sample_weight is not None else None

    def one(args):
        xm, ym, wm = args if ws is not None else (*args, None)
        with tf.GradientTape() as tape:
            out = loss_fn(xm, ym, wm)
            loss, aux = out if isinstance(out, tuple) else (out, None)
        grads = tape.gradient(loss, tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return (loss, grads) if aux is None else (loss, grads, aux)

    elems = (xs, ys, ws) if ws is not None else (xs, ys)
    first = tf.nest.map_structure(lambda t: t[0], elems)
    if function_safe(lambda *a: one(a)[0], first, key=("microbatch", id(loss_fn))):
        res = tf.vectorized_map(one, elems)
    else:  # float32 attention + oneDNN: pfor would crash the process (tf_influence.safety); unroll
        outs = [one(tf.nest.map_structure(lambda t, i=i: t[i], elems)) for i in range(num_microbatches)]
        res = tf.nest.map_structure(lambda *parts: tf.stack(parts), *outs)
    if return_outputs:
        if len(res) != 3:
            raise ValueError("return_outputs=True needs a loss function returning (loss, outputs)")
        losses, grads, aux = res
        merge = lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))  # noqa: E731
        return losses, grads, tf.nest.map_structure(merge, aux)
    return res[0], res[1]


def layer_set_mask(variables, layer_variables) -> list:
    """Booleans: which of ``variables`` belong to the layer set K."""
    wanted = {id(tf_variable(v)) for v in layer_variables}
    mask = [id(tf_variable(v)) in wanted for v in variables]
    if not any(mask):
        raise ParameterGroupError("the layer set K has no trainable variables of the model")
    return mask


def self_influence_from_gradients(grads, mask) -> tf.Tensor:
    """``s_i = Σ_{k∈K} ‖g_{i,k}‖²`` from per-microbatch gradients (eq. 11 / Algorithm 2)."""
    parts = [tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1) for g, m in zip(grads, mask) if m]
    return tf.add_n(parts)


def weighted_gradient(grads, weights) -> list:
    """Eq. 9: ``G = Σ_i w_i g_i`` for each variable."""
    return [tf.tensordot(tf.cast(weights, g.dtype), g, axes=1) for g in grads]


# -- τ schedules (eq. 10) --------------------------------------------------------------------------
class TwoStageSchedule:
    """Eq. 10: ``τ1`` for steps ``i ≤ I`` (1-based), ``τ2`` after (paper: τ1 = 1, τ2 = −1)."""

    def __init__(self, tau1: float = 1.0, tau2: float = -1.0, switch_step: int = 100_000):
        self.tau1, self.tau2, self.switch_step = float(tau1), float(tau2), int(switch_step)

    def __call__(self, step: int) -> float:
        return self.tau1 if step <= self.switch_step else self.tau2

    def __repr__(self):
        return f"TwoStageSchedule(tau1={self.tau1}, tau2={self.tau2}, switch_step={self.switch_step})"


class ConstantSchedule:
    def __init__(self, tau: float):
        self.tau = float(tau)

    def __call__(self, step: int) -> float:
        return self.tau

    def __repr__(self):
        return f"ConstantSchedule({self.tau})"


def direct(tau: float = 1.0):
    """PRESENCE-D: always emphasise high-SI microbatches."""
    return ConstantSchedule(abs(tau))


def inverse(tau: float = 1.0):
    """PRESENCE-I: always de-emphasise high-SI microbatches."""
    return ConstantSchedule(-abs(tau))


def two_stage(switch_step: int, tau1: float = 1.0, tau2: float = -1.0):
    """PRESENCE: direct, then inverse (eq. 10)."""
    return TwoStageSchedule(tau1, tau2, switch_step)


def inverse_then_direct(switch_step: int, tau: float = 1.0):
    """PRESENCE-I-D ablation: inverse first, then direct."""
    return TwoStageSchedule(-abs(tau), abs(tau), switch_step)


# -- Keras integration ------------------------------------------------------------------------------
class PresenceModel(keras.Model):
    """Wrap a Keras model so that ``fit`` trains it with PRESENCE reweighted steps.

    Args:
      model: any built Keras 3 model (TensorFlow backend); its variables are trained in place.
      num_microbatches: microbatches per (per-replica) batch; the batch size must be a multiple.
      si_layers: layer / sub-model names forming the layer set K (paper: the first encoder and
        decoder layers).
      tau: initial τ (a :class:`PresenceCallback` then sets it each step).
      eps: ε of eq. 7 (relative to μ(s)² unless ``relative_eps=False``; module docstring).
      relative_eps: scale-free ε (default) or the literal absolute constant.

    ``compile`` takes the usual optimizer / loss / metrics; the loss is applied per example
    (a Keras loss object, name, or ``fn(y_true, y_pred) -> [B]``). Sample weights are supported.
    """

    def __init__(self, model, num_microbatches: int = 4, si_layers=None, tau: float = 0.0, eps: float = EPS,
                 relative_eps: bool = True, **kwargs):
        super().__init__(name=kwargs.pop("name", f"presence_{model.name}"), **kwargs)
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be ≥ 1, got {num_microbatches}")
        if si_layers is None or (not isinstance(si_layers, str) and len(list(si_layers)) == 0):
            raise ParameterGroupError("PresenceModel needs a non-empty layer set K (si_layers)")
        si_layers = [si_layers] if isinstance(si_layers, str) else list(si_layers)
        self.inner = model
        self.num_microbatches = int(num_microbatches)
        self.si_layers = si_layers
        self.eps = float(eps)
        self.relative_eps = bool(relative_eps)
        self._k_vars = []
        for name in si_layers:
            layer = find_layer(model, name)
            if not layer.trainable_weights:
                raise ParameterGroupError(f"layer '{name}' of the layer set K has no trainable variables")
            self._k_vars.extend(layer.trainable_weights)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.num_global_microbatches = self.num_microbatches * replicas
        self.presence_tau = self.add_weight(name="presence_tau", shape=(), initializer=keras.initializers.Constant(tau),
                                            trainable=False, aggregation="only_first_replica")
        self.presence_last_weights = self.add_weight(
            name="presence_last_weights", shape=(self.num_global_microbatches,),
            initializer=keras.initializers.Constant(1.0 / self.num_global_microbatches), trainable=False,
            aggregation="only_first_replica")
        self.presence_last_si = self.add_weight(
            name="presence_last_si", shape=(self.num_global_microbatches,), initializer="zeros", trainable=False,
            aggregation="only_first_replica")
        self._per_example_loss = None

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def _microbatch_loss(self, x, y, w):
        y_pred = self.inner(x, training=True)
        losses = reduce_per_example(self._per_example_loss(y, y_pred))
        if w is not None:
            losses = losses * tf.cast(w, losses.dtype)
        reg = self.inner.losses
        loss = tf.reduce_mean(losses) + (tf.add_n([tf.cast(r, losses.dtype) for r in reg]) if reg else 0.0)
        return loss, y_pred

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self._per_example_loss is None:
            if self.loss is None:
                raise ValueError("compile the PresenceModel with a loss")
            self._per_example_loss = per_example_loss_fn(self.loss)
        variables = self.inner.trainable_variables
        mask = layer_set_mask(variables, self._k_vars)
        losses, grads, y_pred = microbatch_gradients(self._microbatch_loss, x, y, variables, self.num_microbatches,
                                                     sample_weight, return_outputs=True)
        si = self_influence_from_gradients(grads, mask)
        ctx = tf.distribute.get_replica_context()
        n_rep = ctx.num_replicas_in_sync if ctx is not None else 1
        if n_rep > 1:
            all_si = ctx.all_gather(si, axis=0)
            rid = tf.cast(ctx.replica_id_in_sync_group, tf.int32) if not isinstance(
                ctx.replica_id_in_sync_group, int) else ctx.replica_id_in_sync_group
            w_all = presence_weights(all_si, tf.cast(self.presence_tau, all_si.dtype), self.eps, self.relative_eps)
            w = tf.slice(w_all, [rid * self.num_microbatches], [self.num_microbatches])
        else:
            all_si = si
            w_all = w = presence_weights(si, tf.cast(self.presence_tau, si.dtype), self.eps, self.relative_eps)
        tf.debugging.assert_all_finite(si, "PRESENCE: NaN/Inf in microbatch gradients (self-influence)")
        G = weighted_gradient(grads, w)
        self.optimizer.apply_gradients(zip(G, variables))
        self.presence_last_weights.assign(tf.cast(w_all, self.presence_last_weights.dtype))
        self.presence_last_si.assign(tf.cast(all_si, self.presence_last_si.dtype))
        # metrics on the (unweighted) batch, from the microbatch forward passes (no extra pass)
        loss = tf.reduce_mean(losses)
        self._loss_tracker.update_state(loss)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        ent = -tf.reduce_sum(w_all * tf.math.log(w_all + 1e-30))
        logs.update({"presence_tau": tf.identity(self.presence_tau), "si_mean": tf.reduce_mean(all_si),
                     "si_std": tf.math.reduce_std(all_si), "weight_max": tf.reduce_max(w_all),
                     "weight_min": tf.reduce_min(w_all), "weight_entropy": ent})
        return logs


class PresenceCallback(keras.callbacks.Callback):
    """Sets ``model.presence_tau`` from ``schedule(step)`` before every step (step = 1-based
    optimizer iteration) and records, after every step, τ, SI statistics and the microbatch
    weights in ``records``; with ``log_dir`` also writes them to TensorBoard."""

    def __init__(self, schedule: Callable[[int], float], log_dir: str | None = None, keep_weights: bool = True):
        super().__init__()
        if not callable(schedule):
            raise TypeError("schedule must be a callable of the training step (e.g. TwoStageSchedule)")
        self.schedule, self.log_dir, self.keep_weights = schedule, log_dir, keep_weights
        self.records = []
        self._writer = None

    def _check(self):
        if not isinstance(self.model, PresenceModel):
            raise TypeError("PresenceCallback drives a PresenceModel; wrap the model with PresenceModel(model, …)")

    def on_train_begin(self, logs=None):
        self._check()
        if self.log_dir:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy()) + 1
        tau = float(self.schedule(step))
        if not math.isfinite(tau):
            raise ValueError(f"schedule returned τ = {tau} at step {step}")
        self.model.presence_tau.assign(tau)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        w = np.asarray(self.model.presence_last_weights.numpy())
        si = np.asarray(self.model.presence_last_si.numpy())
        rec = {"step": step, "tau": float(self.model.presence_tau.numpy()), "si_mean": float(si.mean()),
               "si_std": float(si.std()), "weight_max": float(w.max()), "weight_min": float(w.min())}
        if self.keep_weights:
            rec["weights"] = w.tolist()
            rec["si"] = si.tolist()
        self.records.append(rec)
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for k in ("tau", "si_mean", "si_std", "weight_max", "weight_min"):
                    tf.summary.scalar(f"presence/{k}", rec[k])
                tf.summary.histogram("presence/weights", w)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()


def get_strategy(tpu: str | None = ""):
    """TPUStrategy if a TPU is reachable, else MirroredStrategy over several local devices,
    else the default strategy.

    ``tpu`` is passed to ``tf.distribute.cluster_resolver.TPUClusterResolver`` ("" = the TPU of
    this VM / the ``TPU_NAME`` environment variable); ``None`` skips the TPU probe. The resolver
    raises ``ValueError`` when no TPU is configured (CPU machines), which selects the fallback.
    """
    if tpu is not None:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver)
        except (ValueError, tf.errors.NotFoundError, RuntimeError):
            pass
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) > 1 and not gpus:
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    return tf.distribute.get_strategy()

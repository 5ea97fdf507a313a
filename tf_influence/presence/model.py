"""Keras integration: :class:`PresenceModel` (a reweighted ``train_step``), :class:`PresenceCallback`
(τ from a schedule, per-step logs) and :func:`get_strategy`."""

from __future__ import annotations

import math
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from ..objective import per_example_loss_fn, reduce_per_example
from ..params import ParameterGroupError, as_layer_list, tf_variable
from .weights import EPS, layer_set_mask, microbatch_gradients, presence_weights, self_influence_from_gradients, weighted_gradient


# -- Keras integration ------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="tf_influence")
class PresenceModel(keras.Model):
    """Wrap a Keras model so that ``fit`` trains it with PRESENCE reweighted steps.

    Args:
      model: any built Keras 3 model (TensorFlow backend); its variables are trained in place.
      num_microbatches: microbatches per (per-replica) batch; the batch size must be a multiple.
      si_layers: the layer set K (paper: the first encoder and decoder layers): layer / sub-model
        names, Keras paths or layer objects, resolved as everywhere in the library
        (:func:`tf_influence.tracin.layer_set`; ``None``: every layer with parameters); its
        variables must be trained.
      tau: initial τ (a :class:`PresenceCallback` then sets it each step).
      eps: ε of eq. 7 (relative to μ(s)² unless ``relative_eps=False``; module docstring).
      relative_eps: scale-free ε (default) or the literal absolute constant.
      memory_budget: what one step may allocate (bytes, ``"8GB"``, a fraction of the available
        memory; ``None``: 70 % of it). ``fit`` plans one step first
        (:func:`tf_influence.memory.presence_plan`: the ``M`` microbatch gradients, the optimizer's
        slots, the batch's forward / backward) and refuses a step that cannot fit before training,
        naming what is too big. Not checked with several replicas (the memory is the devices',
        not this host's).

    ``compile`` takes the usual optimizer / loss / metrics; the loss is applied per example
    (a Keras loss object, name, or ``fn(y_true, y_pred) -> [B]``). Sample weights are supported.
    """

    def __init__(self, model, num_microbatches: int = 4, si_layers=None, tau: float = 0.0, eps: float = EPS,
                 relative_eps: bool = True, memory_budget=None, **kwargs):
        super().__init__(name=kwargs.pop("name", f"presence_{model.name}"), **kwargs)
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be ≥ 1, got {num_microbatches}")
        from ..tracin import layer_set
        group = layer_set(model, si_layers)   # names, Keras paths or layer objects; the one resolver
        self.inner = model
        self.num_microbatches = int(num_microbatches)
        self.si_layers = None if si_layers is None else [  # names / Keras paths, so get_config can name them
            s if isinstance(s, str) else getattr(s, "path", s.name) for s in as_layer_list(si_layers)]
        self.eps = float(eps)
        self.relative_eps = bool(relative_eps)
        from ..memory import check_budget_value
        check_budget_value(memory_budget)
        self.memory_budget = memory_budget
        self._tau0 = float(tau)
        trained = {id(tf_variable(v)) for v in model.trainable_variables}
        frozen = [v.path for v in group.variables if id(tf_variable(v)) not in trained]
        if frozen:
            raise ParameterGroupError(
                f"PresenceModel weights microbatches by the gradients of the variables it trains, but the layer set "
                f"K={self.si_layers} holds frozen variables {frozen}: unfreeze them or choose trained layers")
        self._k_vars = list(group.variables)
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
        if model.built:   # the wrapper adds no variables the model lacks (τ and the logs are above)
            self.built = True

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def get_config(self):
        """The wrapped model (serialised) and the PRESENCE settings, so ``model.save`` /
        ``keras.models.load_model`` round-trip a :class:`PresenceModel`."""
        return {"model": keras.saving.serialize_keras_object(self.inner), "num_microbatches": self.num_microbatches,
                "si_layers": None if self.si_layers is None else list(self.si_layers), "tau": self._tau0, "eps": self.eps,
                "relative_eps": self.relative_eps, "memory_budget": self.memory_budget, "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("model"), custom_objects=custom_objects)
        return cls(inner, **config)

    def memory_plan(self, x=None, y=None, batch_size: int | None = None):
        """The plan of one reweighted step (:func:`tf_influence.memory.presence_plan`) for ``fit``'s
        arguments: a batched ``tf.data`` dataset ``x``, or arrays in batches of ``batch_size`` (default
        32; the positions from the labels ``y``)."""
        from ..memory import batch_shape, presence_plan
        optimizer = getattr(self, "optimizer", None)
        if isinstance(x, tf.data.Dataset):
            return presence_plan(self.inner, self.num_microbatches, x, optimizer)
        positions = batch_shape(y)[1] if y is not None else 1
        return presence_plan(self.inner, self.num_microbatches, optimizer=optimizer,
                             batch_shape=(int(batch_size or 32), positions))

    def fit(self, x=None, y=None, batch_size=None, *args, **kwargs):
        """``keras.Model.fit``, after checking one step's memory plan (:meth:`memory_plan`) against
        ``memory_budget`` — a step that cannot fit is refused before the first batch."""
        strategy = getattr(self, "distribute_strategy", None) or tf.distribute.get_strategy()
        if strategy.num_replicas_in_sync == 1:
            self.memory_plan(x, y, batch_size).check(self.memory_budget)
        return super().fit(x, y, batch_size, *args, **kwargs)

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

"""PRESENCE's math (eq. 7–9, 11): microbatch gradients, their self-influence over the layer set K,
normalised scores and softmax weights, the reweighted gradient."""

from __future__ import annotations


import numpy as np
import tensorflow as tf

from ..params import ParameterGroupError, tf_variable
from ..safety import function_safe


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

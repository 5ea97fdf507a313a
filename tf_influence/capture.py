"""Per-example capture, one layer of its own: record the captured layers' inputs and pre-activation outputs
in a forward pass and their output gradients in the backward pass, and per-example gradients of the
variables no captured layer covers. K-FAC / EK-FAC's factor statistics, ghost norms, the gradient
projection (index) and PRESENCE's self-influence read gradients through it.

The blocks themselves (what a captured layer's records mean for its variables) live with their users:
:mod:`tf_influence.kfac.blocks`."""

from __future__ import annotations


import tensorflow as tf

import keras

from .params import ParameterGroupError, densify, tf_variable
from .safety import per_example_map


def is_reversible(layer) -> bool:
    """A ``ReversibleEmbedding`` (or an ``Embedding`` with ``tie_weights``): called as a lookup and, with
    ``reverse=True``, as the output projection."""
    cls = getattr(keras.layers, "ReversibleEmbedding", None)
    return (cls is not None and isinstance(layer, cls)) or (
        isinstance(layer, keras.layers.Embedding) and hasattr(layer, "tie_weights"))


def is_position_embedding(layer) -> bool:
    """keras-hub's learned ``PositionEmbedding`` (``out[b, t] = E[start + t]`` or ``E[positions[b, t]]``)."""
    return type(layer).__name__ == "PositionEmbedding" and getattr(layer, "position_embeddings", None) is not None


def norm_per_example(nb, records, grads, dtype, options=None):
    """Per-example gradients of a norm / position layer's variables, summed over its calls in the
    forward pass (``options``: each call's keyword arguments, e.g. ``start_index``)."""
    total = None
    for i, ((inp, _), g) in enumerate(zip(records, grads)):
        pe = nb.per_example(inp, g, dtype, **(options[i] if options else {}))
        total = pe if total is None else [a + b for a, b in zip(total, pe)]
    return total


def vectorized_gradients(objective, variables, x, y, group=None):
    """Per-example gradients of ``variables``: one-example gradients under ``tf.vectorized_map`` (or
    ``tf.map_fn`` where pfor would crash: :mod:`tf_influence.safety`) — ``[B, *shape]`` per variable, or
    with ``group`` (a :class:`~tf_influence.params.ParameterGroup` over ``variables``) one ``[B, p]``
    block flattened inside the map. The gradient index's, ghost norms' and K-FAC's fallback for variables
    no captured layer covers, and :class:`~tf_influence.gradients.GradientKernels`' per-example kernel."""
    vars_ = [tf_variable(v) for v in variables]

    def one(example):
        xi, yi = example
        xi = tf.nest.map_structure(lambda t: t[None], xi)
        yi = tf.nest.map_structure(lambda t: t[None], yi)
        with tf.GradientTape() as tape:
            tape.watch(vars_)
            loss = tf.reduce_sum(objective.per_example_losses(xi, yi, training=False))
        g = densify(tape.gradient(loss, vars_, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        return g if group is None else group.flatten(g)
    signature = ([tf.TensorSpec(v.shape, v.dtype) for v in vars_] if group is None
                 else tf.TensorSpec([group.size], group.dtype))
    return per_example_map(one, (x, y), signature, objective, x, y)


def diagonal_squares(objective, norms, records, grads_of, rest, x, y, dtype, options=None):
    """``{id(variable): Σ_n (∂l_n/∂v)²}`` for the diagonal variables: from the captured
    ``LayerNormalization`` / position-embedding records, and by vectorised per-example gradients for
    the ``rest``."""
    out, options = {}, options or {}
    for nb in norms:
        per = norm_per_example(nb, records[nb.name], grads_of[nb.name], dtype, options.get(nb.name))
        for v, pe in zip(nb.variables, per):
            out[id(tf_variable(v))] = tf.reduce_sum(tf.square(pe), axis=0)
    if rest:
        for v, gv in zip(rest, vectorized_gradients(objective, rest, x, y)):
            out[id(tf_variable(v))] = tf.reduce_sum(tf.square(tf.cast(gv, dtype)), axis=0)
    return out


def output_gradients(tape, total, cap, layers) -> dict:
    """``{layer name: [∂total/∂output of each call]}`` for the captured ``layers`` (one gradient call);
    an output the loss does not depend on (e.g. BERT's pooler in a token-level objective) gets zeros."""
    records = cap.records
    outs = [r[1] for b in layers for r in records[b.name]]
    grads = tape.gradient(total, outs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    per, i = {}, 0
    for b in layers:
        k = len(records[b.name])
        per[b.name], i = grads[i:i + k], i + k
    return per


def captured_pass(objective, layers, x, y):
    """One ordinary forward / backward pass of the per-example losses of ``objective`` on ``(x, y)``
    with ``layers`` (blocks) captured: ``(losses [B], records, output gradients, modes, options)`` —
    what ghost norms and gradient projections are computed from."""
    model = objective.model
    cap = Capture(layers)
    with cap, tf.GradientTape() as tape:
        from .objective import reduce_per_example
        losses = reduce_per_example(objective.loss_fn(y, model(x, training=False)))
        total = tf.reduce_sum(losses)
    grads = output_gradients(tape, total, cap, layers)
    return losses, cap.records, grads, cap.modes, cap.options


class Capture:
    """Patch the blocks' layers so a forward pass records each layer's input and pre-activation output.

    Each layer is patched once, however many blocks read it (a ``ReversibleEmbedding`` has two);
    ``records[block]`` lists ``(input, pre-activation)`` of the calls the block accepts and
    ``modes[block]`` whether each was a reverse (output-projection) call."""

    def __init__(self, blocks):
        self.blocks = blocks
        names = [b.name for b in blocks]
        if len(set(names)) != len(blocks):
            raise ParameterGroupError(f"layers share a key: {sorted(names)}")
        self.layers = []
        for b in blocks:
            if all(b.layer is not layer for layer in self.layers):
                self.layers.append(b.layer)
        self._calls = {id(layer): [] for layer in self.layers}

    def _accepted(self, b):
        accepts = getattr(b, "accepts", None)
        return [c for c in self._calls[id(b.layer)] if accepts is None or accepts(c[2])]

    @property
    def records(self) -> dict:
        return {b.name: [(c[0], c[1]) for c in self._accepted(b)] for b in self.blocks}

    @property
    def modes(self) -> dict:
        return {b.name: [c[2] for c in self._accepted(b)] for b in self.blocks}

    @property
    def options(self) -> dict:
        """``{block: [call options of each call]}`` (a position embedding's ``start_index`` / ``positions``)."""
        return {b.name: [c[3] for c in self._accepted(b)] for b in self.blocks}

    def __enter__(self):
        for layer in self.layers:
            original, rec, reversible = layer.call, self._calls[id(layer)], is_reversible(layer)
            position = is_position_embedding(layer)

            def call(inputs, *args, _layer=layer, _original=original, _rec=rec, _reversible=reversible,
                     _position=position, **kwargs):
                act = getattr(_layer, "activation", None)
                if act is not None:
                    object.__setattr__(_layer, "activation", None)
                try:
                    pre = _original(inputs, *args, **kwargs)
                finally:
                    if act is not None:
                        object.__setattr__(_layer, "activation", act)
                reverse = bool(kwargs.get("reverse", args[0] if args else False)) if _reversible else False
                options = {}
                if _position:  # call(inputs, start_index=0, positions=None)
                    options = dict(zip(("start_index", "positions"), args))
                    options.update({k: kwargs[k] for k in ("start_index", "positions") if k in kwargs})
                _rec.append((inputs, pre, reverse, options))
                return act(pre) if act is not None else pre
            object.__setattr__(layer, "call", call)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            object.__delattr__(layer, "call")
        return False


__all__ = ["Capture", "captured_pass", "output_gradients", "norm_per_example", "vectorized_gradients",
           "diagonal_squares", "is_reversible", "is_position_embedding"]

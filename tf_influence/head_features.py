"""Hessian products over a model's head, on features of its frozen part computed once.

Multi-stage influence with the embedding fixed (case 1) solves ``(∂²F/∂Θ²)⁻¹ ∇_Θ f`` over the finetuning
head Θ — a ``Dense(3)`` over a 100 M-parameter backbone. Every Hessian-vector product of that solve (a
conjugate-gradient solve on ``H² + λI`` takes two per iteration, plus its Lanczos estimate of the spectrum)
would run the whole backbone forward over the finetuning data, although nothing before the head depends on
Θ. Here the model is cut where Θ starts: the tensors that feed the layers holding Θ (or layers downstream of
them) and that depend on nothing of Θ — the *frontier* — are computed once per finetuning example, and the
products run the head only, ``head(features)``. The products are the same (the features do not depend on
Θ, and the model runs with ``training=False`` in every product); the cut is checked on the first batch,
and the plain operator is used where it does not reproduce the model's outputs.

Measured on the 100 M Llama under a 3-way head (``benchmarks/real_size.py``, 64 finetuning sequences of 128
tokens): the finetuning solve took 85 s with the backbone in every product.

>>> import keras, numpy as np, tensorflow as tf
>>> from tf_influence import Objective, ParameterGroup
>>> inp = keras.Input((4,))
>>> body = keras.layers.Dense(8, name="body", trainable=False)(inp)
>>> model = keras.Model(inp, keras.layers.Dense(2, name="head")(body))
>>> model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
>>> ds = tf.data.Dataset.from_tensor_slices((np.ones((6, 4), "float32"), np.zeros(6, "int32"))).batch(3)
>>> theta = ParameterGroup("Θ", [model.get_layer("head").kernel, model.get_layer("head").bias])
>>> op = head_operator(Objective(model), ds, theta)
>>> op.objective.model.name.endswith("_head"), op.num_examples
(True, 6)
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .hessian import CACHE_BYTES, HessianOperator
from .objective import Objective, batches
from .params import ParameterGroup, tf_variable

#: The largest relative difference between ``head(features(x))`` and ``model(x)`` on the first batch for
#: the cut to be used (float32 models recompute the same ops in another order: ~1e-6).
CUT_TOLERANCE = 1e-4


def _functional(model):
    """The Functional graph of ``model`` (a ``Sequential``'s inner one), or None (a subclassed model)."""
    from keras.src.models.functional import Functional
    if isinstance(model, Functional):
        return model
    inner = getattr(model, "_functional", None)          # keras.Sequential, once built
    return inner if isinstance(inner, Functional) else None


def split_at_group(model, group: ParameterGroup):
    """``(features, head)``: ``features = keras.Model(model.inputs, frontier)`` and ``head =
    keras.Model(frontier, model.outputs)`` with ``head(features(x)) == model(x)``, where the frontier is
    the tensors of ``model``'s graph that depend on no variable of ``group`` and feed a layer that does
    (or one downstream of such a layer). None where there is nothing to cut: a subclassed model, or a group
    whose first layer reads the model's inputs directly."""
    import keras
    graph = _functional(model)
    if graph is None:
        return None
    ids = {id(tf_variable(v)) for v in group.tf_variables}
    if not ids:
        return None
    inputs = {id(t) for t in tf.nest.flatten(graph.inputs)}
    tainted, frontier, seen = set(), [], set()
    for depth in sorted(graph._nodes_by_depth, reverse=True):          # inputs first
        for node in graph._nodes_by_depth[depth]:
            op = node.operation
            ins = tf.nest.flatten(node.input_tensors)
            holds = any(id(tf_variable(w)) in ids for w in getattr(op, "weights", []))
            if holds or any(id(t) in tainted for t in ins):
                for t in ins:
                    if id(t) not in tainted and id(t) not in seen:
                        seen.add(id(t))
                        frontier.append(t)
                tainted.update(id(t) for t in tf.nest.flatten(node.outputs))
    if not frontier or all(id(t) in inputs for t in frontier):
        return None
    outputs = graph.outputs
    if not all(id(t) in tainted for t in tf.nest.flatten(outputs)):
        return None                                        # an output that does not depend on the group
    name = model.name
    frontier_arg = frontier[0] if len(frontier) == 1 else frontier
    try:
        features = keras.Model(graph.inputs, frontier_arg, name=f"{name}_features")
        head = keras.Model(frontier_arg, outputs, name=f"{name}_head")
    except (ValueError, TypeError):                        # a graph Keras cannot cut there
        return None
    held = {id(tf_variable(v)) for v in head.weights}
    if not ids <= held:                                    # a group variable outside the head: no cut
        return None
    return features, head


def _concat(parts):
    return tf.nest.map_structure(lambda *t: tf.concat(t, axis=0), *parts)


def head_operator(objective: Objective, dataset, group: ParameterGroup, mode: str = "fob", name: str | None = None,
                  num_examples: int | None = None, max_bytes: int = CACHE_BYTES) -> HessianOperator:
    """The square Hessian block of ``group`` over ``dataset`` as a :class:`HessianOperator`, on the frozen
    part's features computed once (see the module docstring) where the model can be cut before ``group``
    and the features of the whole dataset fit in ``max_bytes``; else the operator over the whole model.
    Either way the operator's products are ``∂²L/∂group² · v``. ``op.objective.model`` is the head when the
    features are used."""
    def plain():
        return HessianOperator(objective, dataset, group, mode=mode, name=name, num_examples=num_examples)
    cut = split_at_group(objective.model, group)
    if cut is None:
        return plain()
    features_model, head = cut
    held, size, checked = [], 0, False
    for x, y in batches(dataset, f"dataset of {name or 'the head block'}", objective.model):
        f = features_model(x, training=False)
        size += sum(int(np.prod(t.shape)) * t.dtype.size for t in tf.nest.flatten((f, y)))
        if 2 * size > max_bytes:                           # the dataset below and the operator's held batches
            return plain()
        if not checked:
            full = tf.cast(tf.nest.flatten(objective.model(x, training=False))[0], tf.float64)
            cut_out = tf.cast(tf.nest.flatten(head(f, training=False))[0], tf.float64)
            scale = float(tf.reduce_max(tf.abs(full))) + 1e-30
            if full.shape != cut_out.shape or float(tf.reduce_max(tf.abs(full - cut_out))) > CUT_TOLERANCE * scale:
                return plain()
            checked = True
        held.append((f, y))
    if not held:
        return plain()                                     # empty: the plain operator names the dataset
    batch = int(tf.shape(tf.nest.flatten(held[0][1])[0])[0])
    data = tf.data.Dataset.from_tensor_slices((_concat([f for f, _ in held]), _concat([y for _, y in held])))
    data = data.batch(batch)
    head_objective = Objective(head, objective.loss, objective.include_model_losses,
                               name=f"{objective.name} (head on held features)")
    op = HessianOperator(head_objective, data, group, mode=mode, name=name, num_examples=num_examples,
                         _batches=held)
    op.features_of, op.held_bytes = features_model, 2 * size     # the features' dataset and the held batches
    return op


__all__ = ["CUT_TOLERANCE", "head_operator", "split_at_group"]

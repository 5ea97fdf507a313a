"""Per-example maps that cannot take the process down.

TensorFlow 2.16's CPU build with oneDNN (on by default) aborts the whole process — SIGSEGV,
"corrupted double-linked list", "free(): invalid pointer", no Python error — when ``tf.vectorized_map``
(pfor) vectorises the backward pass of a batched ``Einsum`` / batch matmul in float32: a plain
``keras.layers.MultiHeadAttention`` or ``EinsumDense`` model is enough, and every transformer has one.
The same code runs with ``TF_ENABLE_ONEDNN_OPTS=0`` or in float64 (oneDNN does not handle float64).

:func:`per_example_map` is the one place the library vectorises over examples. It inspects the
graph of the objective's loss once per (objective, input signature): when the loss contains such
an op and oneDNN may be active, it maps with ``tf.map_fn`` (a ``while_loop`` of ordinary one-example
passes — slower, never vectorised) instead of ``tf.vectorized_map``. :func:`vectorization_safe` says
which was chosen; ``TF_INFLUENCE_VECTORIZE=always|never`` overrides the check.
"""

from __future__ import annotations

import os

import tensorflow as tf

#: Op types whose pfor-vectorised gradient crashes with oneDNN in float32 (TensorFlow 2.16).
RISKY_OPS = frozenset({"Einsum", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"})

_DECISIONS = {}


def onednn_may_be_active() -> bool:
    """oneDNN is on by default in TensorFlow ≥ 2.9 on x86 Linux unless ``TF_ENABLE_ONEDNN_OPTS=0``."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip() not in ("0", "false", "False")


def _library_op_types(graph) -> set:
    """Op types inside the functions a graph calls (Keras layers compiled as separate functions)."""
    types = set()
    for fn in getattr(graph, "_functions", {}).values():
        fdef = getattr(fn, "definition", None)
        if fdef is not None:
            types.update(node.op for node in fdef.node_def)
    return types


def _spec(t):
    return tf.TensorSpec(t.shape, t.dtype)


def function_safe(fn, args, key=None) -> bool:
    """Whether pfor may vectorise the gradient of ``fn(*args)`` here (``args``: tensors, symbolic or
    eager, or ``None``). Decided once per ``key`` (default: ``fn``) and argument signature."""
    forced = os.environ.get("TF_INFLUENCE_VECTORIZE", "").lower()
    if forced in ("always", "never"):
        return forced == "always"
    if not onednn_may_be_active():
        return True
    specs = tf.nest.map_structure(lambda t: None if t is None else _spec(t), args)
    cache_key = (id(fn) if key is None else key, repr(specs))
    if cache_key not in _DECISIONS:
        graph = tf.function(fn).get_concrete_function(*specs).graph
        risky = any(op.type in RISKY_OPS and op.outputs and op.outputs[0].dtype != tf.float64
                    for op in graph.get_operations())
        risky = risky or bool(_library_op_types(graph) & RISKY_OPS)   # nested functions: dtype not checked
        _DECISIONS[cache_key] = not risky
    return _DECISIONS[cache_key]


def vectorization_safe(objective, x, y) -> bool:
    """Whether ``tf.vectorized_map`` over one-example gradients of ``objective`` is safe here
    (``x``, ``y``: a batch, symbolic or eager). Decided once per objective and input signature."""
    return function_safe(lambda a, b: objective.per_example_losses(a, b, training=False), (x, y),
                         key=("objective", id(objective)))


def per_example_map(fn, elems, output_signature, objective, x, y):
    """``tf.vectorized_map(fn, elems)`` where that is safe for ``objective``, else ``tf.map_fn`` with
    ``output_signature`` (the structure of ``fn``'s result for one example)."""
    if vectorization_safe(objective, x, y):
        return tf.vectorized_map(fn, elems)
    return tf.map_fn(fn, elems, fn_output_signature=output_signature)


__all__ = ["RISKY_OPS", "function_safe", "onednn_may_be_active", "per_example_map", "vectorization_safe"]

"""Parameter groups: named, ordered sets of Keras variables flattened into one vector.

The multi-stage paper splits parameters into three groups:

* ``W`` — the shared embedding (used by the pretraining and the finetuning model),
* ``U`` — the pretraining head (only in the pretraining model),
* ``Θ`` — the finetuning head (only in the finetuning model).

Users name them by Keras layers or sub-models (``group_from_layers(model, ["embedding"])``).
Every linear-algebra routine in this package works on *flat* vectors of a group (shape
``[p]``) or on matrices of several flat vectors (shape ``[p, k]``); :class:`ParameterGroup`
converts between that flat layout and the per-variable tensors that autodiff needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorflow as tf


class ParameterGroupError(ValueError):
    """A parameter group cannot be built or does not match another group."""


def tf_variable(v):
    """The ``tf.Variable`` behind a Keras 3 variable (or ``v`` itself if it already is one).

    Keras 3 variables are not ``tf.Variable`` instances; ``GradientTape.gradient`` and
    ``ForwardAccumulator`` need the backing TensorFlow variable (passing a Keras variable
    fails with ``'str' object has no attribute 'is_floating'``).
    """
    inner = getattr(v, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    if isinstance(v, tf.Variable):
        return v
    raise TypeError(f"{v!r} is neither a Keras variable with a TensorFlow backend nor a tf.Variable")


@dataclass(frozen=True)
class GroupSpec:
    """A serialisable description of a :class:`ParameterGroup` of a model: for each variable its
    position in :func:`parameters` ``(model)`` (``model.trainable_variables`` when nothing is
    frozen), its Keras path and its shape.

    A driver builds the group, sends ``spec.to_json()`` to its workers, and every worker that
    loads the same model file rebuilds exactly the same flat layout with
    :meth:`ParameterGroup.from_spec` (which checks path and shape of every variable).

    >>> spec = GroupSpec.from_json('{"name": "W", "variables": [[0, "conv1/kernel", [3, 3, 1, 8]]]}')
    >>> spec.variables[0]
    (0, 'conv1/kernel', (3, 3, 1, 8))
    """

    name: str
    variables: tuple  # ((index, path, shape), ...)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "variables": [[i, p, list(s)] for i, p, s in self.variables]})

    @classmethod
    def from_json(cls, text) -> "GroupSpec":
        d = json.loads(text) if isinstance(text, (str, bytes)) else dict(text)
        try:
            variables = tuple((int(i), str(p), tuple(int(n) for n in s)) for i, p, s in d["variables"])
            return cls(str(d["name"]), variables)
        except (KeyError, TypeError, ValueError) as err:
            raise ParameterGroupError(f"not a parameter group spec ({err}): {str(text)[:200]}") from None


@dataclass(frozen=True)
class ParameterGroup:
    """An ordered list of a model's parameters treated as one flat parameter vector.

    A group is a set of variables, not a training switch: variables of layers frozen with
    ``layer.trainable = False`` belong to groups like any other (case 1 of the multi-stage paper
    *is* a backbone frozen during finetuning).

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="out")])
    >>> ParameterGroup.from_model(model).size   # every trainable variable: 3·2 kernel + 2 bias
    8
    """

    name: str
    variables: tuple

    @classmethod
    def from_model(cls, model, name: str = "all") -> "ParameterGroup":
        """Every parameter of ``model`` (see :func:`parameters`: frozen layers included), in
        ``model.weights`` order — ``model.trainable_variables`` order when nothing is frozen."""
        variables = tuple(parameters(model))
        if not variables:
            raise ParameterGroupError(f"model '{model.name}' has no parameters (is it built?)")
        return cls(name, variables)

    def spec(self, model) -> GroupSpec:
        """This group as a :class:`GroupSpec` over ``model`` (every variable must belong to it)."""
        index = {id(tf_variable(v)): i for i, v in enumerate(parameters(model))}
        out = []
        for v, shape in zip(self.variables, self.shapes):
            i = index.get(id(tf_variable(v)))
            if i is None:
                raise ParameterGroupError(f"variable {_path(v)} of group '{self.name}' is not a trainable variable "
                                          f"of model '{model.name}' (frozen layers included)")
            out.append((i, _path(v), tuple(shape)))
        return GroupSpec(self.name, tuple(out))

    @classmethod
    def from_spec(cls, model, spec) -> "ParameterGroup":
        """Rebuild a group from a :class:`GroupSpec` (or its JSON) on a model loaded from the same file;
        raises :class:`ParameterGroupError` naming the first variable whose position, path or shape differs."""
        spec = spec if isinstance(spec, GroupSpec) else GroupSpec.from_json(spec)
        pool = parameters(model)
        variables = []
        for i, path, shape in spec.variables:
            if i >= len(pool):
                raise ParameterGroupError(f"group '{spec.name}' names trainable variable #{i} ({path}) but model "
                                          f"'{model.name}' has only {len(pool)}")
            v = pool[i]
            got_shape = tuple(tf_variable(v).shape)
            if _path(v) != path or got_shape != shape:
                raise ParameterGroupError(
                    f"group '{spec.name}': trainable variable #{i} of model '{model.name}' is {_path(v)} {got_shape}, "
                    f"the spec expects {path} {shape} (was the model file changed?)")
            variables.append(v)
        return cls(spec.name, tuple(variables))

    def __post_init__(self):
        if len(self.variables) == 0:
            raise ParameterGroupError(f"parameter group '{self.name}' is empty: it holds no variables")
        ids = [id(tf_variable(v)) for v in self.variables]
        if len(set(ids)) != len(ids):
            raise ParameterGroupError(f"parameter group '{self.name}' lists a variable twice")

    @property
    def tf_variables(self) -> list:
        return [tf_variable(v) for v in self.variables]

    @property
    def shapes(self) -> list:
        return [tuple(tf_variable(v).shape) for v in self.variables]

    @property
    def sizes(self) -> list:
        return [int(np.prod(s)) for s in self.shapes]

    @property
    def size(self) -> int:
        return int(sum(self.sizes))

    @property
    def dtype(self):
        return tf_variable(self.variables[0]).dtype

    @property
    def variable_names(self) -> list:
        return [_path(v) for v in self.variables]

    def name_of(self, v) -> str:
        """The name (Keras path) of the group's variable ``v``, as in :attr:`variable_names`."""
        return dict(zip((id(w) for w in self.tf_variables), self.variable_names))[id(tf_variable(v))]

    def flatten(self, tensors: Sequence) -> tf.Tensor:
        """Concatenate per-variable tensors (e.g. gradients) into one ``[p]`` vector.

        ``None`` entries (a variable the loss does not depend on) become zeros.
        """
        parts = []
        for t, shape in zip(tensors, self.shapes):
            if t is None:
                t = tf.zeros(shape, dtype=self.dtype)
            parts.append(tf.reshape(tf.convert_to_tensor(t), [-1]))
        return tf.concat(parts, axis=0)

    def flatten_batched(self, tensors: Sequence) -> tf.Tensor:
        """Per-variable tensors with a leading batch axis ``[B, *shape]`` → ``[B, p]``."""
        parts = []
        batch = None
        for t in tensors:
            if t is not None:
                batch = tf.shape(t)[0]
                break
        for t, shape in zip(tensors, self.shapes):
            if t is None:
                t = tf.zeros(tf.concat([[batch], shape], 0), dtype=self.dtype)
            parts.append(tf.reshape(t, [tf.shape(t)[0], -1]))
        return tf.concat(parts, axis=1)

    def unflatten(self, vector) -> list:
        """A ``[p]`` vector → list of tensors shaped like the variables."""
        vector = tf.convert_to_tensor(vector)
        pieces = tf.split(vector, self.sizes, axis=0)
        return [tf.reshape(piece, shape) for piece, shape in zip(pieces, self.shapes)]

    def values(self) -> tf.Tensor:
        """Current variable values as one flat vector."""
        return self.flatten([tf_variable(v) for v in self.variables])

    def assign(self, vector) -> None:
        """Write a flat vector back into the variables."""
        for var, piece in zip(self.variables, self.unflatten(vector)):
            tf_variable(var).assign(tf.cast(piece, tf_variable(var).dtype))

    def ranges(self, other: "ParameterGroup") -> list:
        """``[(start, size)]`` of each of ``other``'s variables inside this group's flat vector, in
        ``other``'s order. Raises :class:`ParameterGroupError` if ``other`` is not a subset of this group."""
        offsets, start = {}, 0
        for v, n in zip(self.variables, self.sizes):
            offsets[id(tf_variable(v))] = (start, n)
            start += n
        out = []
        for v in other.variables:
            key = id(tf_variable(v))
            if key not in offsets:
                raise ParameterGroupError(
                    f"variable {_path(v)} of group '{other.name}' is not in group '{self.name}'")
            out.append(offsets[key])
        return out

    def slices(self, other: "ParameterGroup") -> np.ndarray:
        """Index positions of ``other``'s variables inside this group's flat vector (an ``int64`` array:
        a 124 M-parameter group's list of Python ints took seconds to build and to index with).

        Raises :class:`ParameterGroupError` if ``other`` is not a subset of this group.
        """
        parts = [np.arange(s, s + n, dtype=np.int64) for s, n in self.ranges(other)]
        return np.concatenate(parts) if parts else np.zeros([0], np.int64)


def densify(tensors) -> list:
    """Gradients as dense tensors: a Keras ``Embedding``'s ``tf.IndexedSlices`` gradient becomes a
    dense tensor (``ForwardAccumulator`` and Jacobians cannot handle ``IndexedSlices``); ``None`` stays."""
    return [None if t is None else tf.convert_to_tensor(t) for t in tensors]


def _path(v) -> str:
    return getattr(v, "path", None) or tf_variable(v).name


def concat_groups(name: str, *groups: ParameterGroup) -> ParameterGroup:
    """One group holding the variables of ``groups`` in order (e.g. ``(W, U)`` of eq. 9)."""
    variables = []
    for g in groups:
        variables.extend(g.variables)
    return ParameterGroup(name, tuple(variables))


def _children(layer) -> list:
    """Direct sub-layers: a model's ``layers``, and the tracked sub-layers of composite layers
    (e.g. the ``query`` / ``key`` / ``value`` / ``attention_output`` projections of ``MultiHeadAttention``)."""
    flatten = getattr(layer, "_flatten_layers", None)  # Keras 3
    if flatten is not None:
        return list(flatten(include_self=False, recursive=False))
    return list(getattr(layer, "layers", []))


def _walk(model) -> list:
    """``[(layer, tree path)]`` of every layer reachable from ``model`` (depth first; nested sub-models
    and sub-layers included). The tree path joins layer names from ``model`` down
    (``"gpt2_backbone/token_embedding"``); a layer reachable twice keeps its first path."""
    seen, out = set(), []
    stack = [(child, child.name) for child in _children(model)][::-1]
    while stack:
        layer, path = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append((layer, path))
        stack.extend([(child, f"{path}/{child.name}") for child in _children(layer)][::-1])
    return out


def all_layers(model) -> list:
    """Every layer reachable from ``model`` (depth first, nested sub-models and sub-layers included)."""
    return [layer for layer, _ in _walk(model)]


def _is_layer(obj) -> bool:
    return hasattr(obj, "weights") and hasattr(obj, "name") and callable(getattr(obj, "_flatten_layers", None))


def as_layer_list(layers) -> list:
    """A layer reference or a list of them → a list (a single name, path or layer object is one entry)."""
    if layers is None:
        return []
    if isinstance(layers, str) or _is_layer(layers):
        return [layers]
    return list(layers)


def find_layer(model, name):
    """The layer (or sub-model) ``name`` inside ``model``: a layer object, a layer name, its Keras
    path (``layer.path``, e.g. ``"attention1/query"``) or its path in the layer tree from ``model``
    down (``"gpt2_backbone/token_embedding"``, also any trailing part of it such as
    ``"backbone/token_embedding"`` when the sub-model's name ends in ``backbone``).

    Raises :class:`ParameterGroupError` naming the missing layer and listing what exists, or, when
    the name is ambiguous, listing the paths that tell the candidates apart.
    """
    walked = _walk(model)
    if _is_layer(name):
        if name is model or any(layer is name for layer, _ in walked):
            return name
        raise ParameterGroupError(f"layer '{name.name}' ({type(name).__name__}) is not part of model '{model.name}'")
    if not isinstance(name, str):
        raise ParameterGroupError(f"a layer is named by a string or given as a layer object, got {name!r}")
    rules = (lambda layer, path: getattr(layer, "path", None) == name or path == name,
             lambda layer, path: layer.name == name,
             lambda layer, path: "/" in name and (path.endswith("/" + name) or _suffix_match(path, name)))
    for rule in rules:
        hits = []
        for layer, path in walked:
            if rule(layer, path) and all(layer is not h for h, _ in hits):
                hits.append((layer, path))
        if len(hits) == 1:
            return hits[0][0]
        if len(hits) > 1:
            paths = ", ".join(path for _, path in hits)
            raise ParameterGroupError(f"model '{model.name}' has {len(hits)} layers named '{name}' ({paths}): "
                                      "name the one you mean by its path")
    available = sorted({layer.name for layer, _ in walked})
    raise ParameterGroupError(
        f"model '{model.name}' has no layer named '{name}'; its layers are: {', '.join(available)}")


def _suffix_match(path: str, name: str) -> bool:
    """``name``'s segments match the end of ``path``'s, the first one as a suffix of its segment
    (``"backbone/token_embedding"`` matches ``"gpt2_backbone/token_embedding"``)."""
    want, have = name.split("/"), path.split("/")
    if len(want) > len(have):
        return False
    tail = have[len(have) - len(want):]
    return tail[0].endswith(want[0]) and tail[1:] == want[1:]


def _parameter_ids(layer) -> set:
    """Ids of the variables created trainable in ``layer`` and its sub-layers, frozen or not
    (Keras keeps them in ``_trainable_variables``; ``layer.trainable = False`` only flips their flag)."""
    ids = set()
    for sub in [layer] + all_layers(layer):
        for v in getattr(sub, "_trainable_variables", []):
            ids.add(id(tf_variable(v)))
    for v in getattr(layer, "trainable_weights", []):   # layers that track weights another way
        ids.add(id(tf_variable(v)))
    return ids


def parameters(layer) -> list:
    """The parameters of a model or layer: every variable created trainable (``add_weight(trainable=True)``),
    whether or not its layer is frozen now, in ``layer.weights`` order; moving statistics, seeds and
    metric state are not parameters. Equal to ``layer.trainable_variables`` when nothing is frozen."""
    ids = _parameter_ids(layer)
    out, seen = [], set()
    for v in layer.weights:
        key = id(tf_variable(v))
        if key in ids and key not in seen:
            seen.add(key)
            out.append(v)
    return out


def group_from_layers(model, layer_names, name: str | None = None,
                      trainable_only: bool = True) -> ParameterGroup:
    """Group of the parameters of the given layers / sub-models of ``model``.

    ``layer_names``: one or several layer objects, names or paths (see :func:`find_layer`).
    Frozen layers (``trainable = False``) count like any other. ``trainable_only=False`` takes every
    variable of the layers, non-trainable state (e.g. moving statistics) included.
    Variables keep the order in which ``model.weights`` lists them, so the same layers give the same
    flat layout in every model that shares them.
    """
    layer_names = as_layer_list(layer_names)
    if not layer_names:
        raise ParameterGroupError("no layer names given for the parameter group")
    wanted = set()
    labels = []
    for lname in layer_names:
        layer = find_layer(model, lname)
        label = lname if isinstance(lname, str) else layer.name
        labels.append(label)
        weights = parameters(layer) if trainable_only else layer.weights
        if not weights:
            raise ParameterGroupError(
                f"layer '{label}' of model '{model.name}' has no {'parameters' if trainable_only else 'variables'} "
                "(is the model built?)")
        wanted.update(id(tf_variable(v)) for v in weights)
    pool = parameters(model) if trainable_only else model.weights
    ordered = [v for v in pool if id(tf_variable(v)) in wanted]
    return ParameterGroup(name or "+".join(labels), tuple(ordered))


def complement_group(model, *exclude: ParameterGroup, name: str = "rest", allow_empty: bool = False):
    """All parameters of ``model`` not in any of ``exclude`` (e.g. U = pretrain − W).

    With ``allow_empty`` an empty complement is ``None`` (a tied-embedding language model whose
    pretraining loss depends on W alone); otherwise it raises :class:`ParameterGroupError`."""
    excluded = {id(tf_variable(v)) for g in exclude for v in g.variables}
    rest = [v for v in parameters(model) if id(tf_variable(v)) not in excluded]
    if not rest:
        if allow_empty:
            return None
        raise ParameterGroupError(
            f"model '{model.name}' has no parameters outside group(s) "
            f"{', '.join(g.name for g in exclude)}; the head group '{name}' would be empty")
    return ParameterGroup(name, tuple(rest))


def check_groups_match(a: ParameterGroup, b: ParameterGroup) -> None:
    """Raise if two groups (e.g. W in the pretrain and in the finetune model) differ in layout."""
    if a.shapes != b.shapes:
        raise ParameterGroupError(
            f"parameter groups '{a.name}' and '{b.name}' do not match: shapes {a.shapes} vs {b.shapes}")
    if a.dtype != b.dtype:
        raise ParameterGroupError(
            f"parameter groups '{a.name}' and '{b.name}' differ in dtype: {a.dtype.name} vs {b.dtype.name}")

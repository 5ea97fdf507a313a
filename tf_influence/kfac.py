"""K-FAC and EK-FAC inverse-Hessian approximations for Keras 3 models (TensorFlow).

The Hessian of ``L = 1/N Σ_n l_n + R`` is replaced by a block-diagonal curvature: one block per
layer that owns variables of the parameter group, plus the exact Hessian of the L2 regularisers
and of any extra diagonal (the ``2α I`` of case 2, eq. 15).

Per layer (Martens & Grosse 2015; George et al. 2018 for the eigenvalue correction):

* a Kronecker block for ``Dense``, ``EinsumDense`` (the query / key / value / output projections of
  ``MultiHeadAttention``), ``Conv1D`` / ``Conv2D`` (inputs expanded into patches, each output
  position a "token"; ``valid`` / ``same`` / ``causal`` padding, strides, dilation) and ``Embedding``. With ``a`` the layer's input (plus a constant 1 for the
  bias) and ``g = ∂l_n/∂s`` the gradient of an example's loss with respect to the layer's
  *pre-activation* output ``s``, the example's kernel gradient is ``G_n = Σ_t a_t g_tᵀ`` (``t`` runs
  over sequence positions) and::

      A = 1/(N T) Σ_{n,t} a_t a_tᵀ,     S = 1/N Σ_{n,t} g_t g_tᵀ,     F_layer ≈ A ⊗ S

  For ``Embedding`` ``a`` is the one-hot token, so ``A`` is diagonal (token frequencies) and is
  never materialised as a dense ``[vocab, vocab]`` matrix's eigendecomposition.
* ``kind="kfac"``: eigenvalues of the block are ``λ_A ⊗ λ_S``;
  ``kind="ekfac"``: the eigenbasis of ``A ⊗ S`` is kept and the eigenvalues are refit in a second
  pass, ``Λ_ij = 1/N Σ_n ((Q_Aᵀ G_n Q_S)_ij)²`` — the exact diagonal of the Fisher in that basis.
* variables of other layers (``LayerNormalization``, grouped convolutions, biases that do not cover a
  kernel's outputs) get a diagonal block ``1/N Σ_n g_n²`` (the Fisher's diagonal). They are listed
  in :meth:`KFACFactors.summary` — nothing is silently approximated.

``fisher="true"`` samples the labels from the model's predictive distribution (the Fisher then
equals the Gauss-Newton matrix of a softmax cross-entropy, the Hessian's positive part);
``fisher="empirical"`` uses the observed labels. The true Fisher needs a loss whose predictive
distribution is known: sparse categorical cross-entropy (logits or probabilities).

Inverse: ``(F + D + λ)⁻¹ v`` with ``D`` the regulariser / extra diagonal projected on the
eigenbasis (``(Q_A²)ᵀ D (Q_S²)``; exact when ``D`` is constant over a block, e.g. an L2 penalty on
a kernel without bias) and ``λ = damping + relative_damping × mean(Λ)`` per block
(kronfluence's heuristic is ``relative_damping = 0.1``).
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from .objective import batches, check_dataset, finite_check, reduce_per_example
from .params import GroupSpec, ParameterGroup, ParameterGroupError, densify, parameters, tf_variable
from .safety import per_example_map

KINDS = ("ekfac", "kfac")
FISHERS = ("true", "empirical")


# -- the layers --------------------------------------------------------------------------------
def _layers(model) -> list:
    return list(model._flatten_layers(include_self=False, recursive=True))  # noqa: SLF001 (Keras 3 API)


def _owners(model) -> dict:
    """``id(tf variable) → the innermost layer owning it``."""
    owner, sizes = {}, {}
    for layer in _layers(model):
        params = parameters(layer)          # frozen layers too: a group is a set of variables
        sizes[id(layer)] = len(params)
        for v in params:
            key = id(tf_variable(v))
            if key not in owner or sizes[id(owner[key])] > len(params):
                owner[key] = layer
    return owner


def _l2(regularizer) -> float | None:
    """The coefficient ``c`` of an L2 penalty ``c Σ w²`` (Hessian ``2c I``), 0 for none, None if unknown."""
    if regularizer is None:
        return 0.0
    if isinstance(regularizer, keras.regularizers.L2):
        return float(regularizer.l2)
    if isinstance(regularizer, keras.regularizers.L1L2) and float(regularizer.l1) == 0.0:
        return float(regularizer.l2)
    return None


class _Block:
    """One Kronecker block: a layer's kernel (and bias) seen as a ``[d_in(+1), d_out]`` matrix."""

    def __init__(self, layer, kind: str, kernel, bias, mode: str | None = None, suffix: str = ""):
        self.layer, self.kind, self.kernel, self.bias = layer, kind, kernel, bias
        # mode: which calls of a ReversibleEmbedding this block sees ("forward" lookups, "reverse"
        # output projections, None: all); suffix tells apart two blocks of one layer
        self.mode, self.suffix = mode, suffix
        self.name = layer.name + suffix  # made unique by _assign_keys
        if kind in ("dense", "tied"):
            self.d_in, self.d_out = int(kernel.shape[0]), int(kernel.shape[1])
        elif kind == "conv":  # kernel [k..., c_in, c_out] → [prod(k...)·c_in, c_out], rows in patch order
            if getattr(layer, "groups", 1) != 1 or getattr(layer, "data_format", "channels_last") != "channels_last":
                raise ParameterGroupError("grouped or channels_first convolution")
            self.d_in, self.d_out = int(np.prod(kernel.shape[:-1])), int(kernel.shape[-1])
        elif kind == "embedding":
            self.d_in, self.d_out = int(kernel.shape[0]), int(kernel.shape[1])
        else:  # einsum
            in_spec, rest = layer.equation.split(",")
            k_spec, out_spec = rest.split("->")
            if "." in layer.equation:
                raise ParameterGroupError("ellipsis")
            self.batch = in_spec[0]
            self.contract = [c for c in k_spec if c in in_spec]
            self.kout = [c for c in k_spec if c in out_spec]
            self.pos = [c for c in in_spec[1:] if c not in k_spec]
            if (set(self.contract) & set(self.kout) or len(self.contract) + len(self.kout) != len(k_spec)
                    or [c for c in out_spec[1:] if c not in k_spec] != self.pos or out_spec[0] != self.batch):
                raise ParameterGroupError("unsupported equation")
            sizes = dict(zip(k_spec, kernel.shape))
            self.k_spec, self.in_spec, self.out_spec = k_spec, in_spec, out_spec
            self.d_in = int(np.prod([sizes[c] for c in self.contract]))
            self.d_out = int(np.prod([sizes[c] for c in self.kout]))
            self.k_shape = [int(s) for s in kernel.shape]
        self.rows = self.d_in + (1 if bias is not None else 0)
        self.variables = [kernel] + ([bias] if bias is not None else [])

    # activations and output gradients as [B, P, d] -------------------------------------------
    def _patches(self, inputs):
        """Input patches ``[B, P, k·c_in]`` in the kernel's ``(k..., c_in)`` order (Conv1D / Conv2D)."""
        layer = self.layer
        x = inputs if len(layer.kernel_size) == 2 else inputs[:, None]  # Conv1D as a 1×k Conv2D
        size = list(layer.kernel_size) if len(layer.kernel_size) == 2 else [1, layer.kernel_size[0]]
        strides = list(layer.strides) if len(layer.strides) == 2 else [1, layer.strides[0]]
        rates = list(layer.dilation_rate) if len(layer.dilation_rate) == 2 else [1, layer.dilation_rate[0]]
        padding = layer.padding.upper()
        if padding == "CAUSAL":
            x = tf.pad(x, [[0, 0], [0, 0], [rates[1] * (size[1] - 1), 0], [0, 0]])
            padding = "VALID"
        p = tf.image.extract_patches(x, sizes=[1, *size, 1], strides=[1, *strides, 1], rates=[1, *rates, 1],
                                     padding=padding)
        return tf.reshape(p, [tf.shape(inputs)[0], -1, self.d_in])

    def activations(self, inputs):
        if self.kind == "dense":
            a = tf.reshape(inputs, [tf.shape(inputs)[0], -1, self.d_in])
        elif self.kind == "conv":
            a = self._patches(inputs)
        elif self.kind == "einsum":
            order = self.batch + "".join(self.pos) + "".join(self.contract)
            a = tf.einsum(f"{self.in_spec}->{order}", inputs)
            a = tf.reshape(a, [tf.shape(inputs)[0], -1, self.d_in])
        else:
            return tf.reshape(tf.cast(inputs, tf.int32), [tf.shape(inputs)[0], -1])  # token ids [B, P]
        if self.bias is not None:
            a = tf.concat([a, tf.ones_like(a[..., :1])], axis=-1)
        return a

    def accepts(self, reverse: bool) -> bool:
        return self.mode is None or (self.mode == "reverse") == bool(reverse)

    def pairs(self, inputs, g, reverse: bool):
        """``(a, g)`` of one call in the block's ``[rows, d_out]`` layout, ``G_n = Σ_t a_t g_tᵀ``.

        A tied ``ReversibleEmbedding`` (one ``[vocab, d]`` matrix ``E`` used as the lookup and as the
        output projection ``logits = h Eᵀ``) contributes ``e_token g_tᵀ`` per looked-up token and
        ``s_t h_tᵀ`` per projected position (``s`` the logits' gradient, ``h`` the projected input):
        both uses are "tokens" of one block, as K-FAC treats shared weights."""
        if self.kind != "tied":
            return self.activations(inputs), self.out_grads(g)
        n = tf.shape(g)[0]
        if reverse:
            return (tf.reshape(g, [n, -1, self.d_in]),
                    tf.cast(tf.reshape(inputs, [n, -1, self.d_out]), g.dtype))
        ids = tf.reshape(tf.cast(inputs, tf.int32), [n, -1])
        return tf.one_hot(ids, self.d_in, dtype=g.dtype), tf.reshape(g, [n, -1, self.d_out])

    def out_grads(self, g):
        if self.kind == "einsum":
            order = self.batch + "".join(self.pos) + "".join(self.kout)
            g = tf.einsum(f"{self.out_spec}->{order}", g)
        return tf.reshape(g, [tf.shape(g)[0], -1, self.d_out])

    # kernel (+ bias) ↔ matrix [rows, d_out] ------------------------------------------------------
    def to_matrix(self, parts):
        """Per-variable tensors (kernel[, bias]) with an optional leading batch axis → ``[..., rows, d_out]``."""
        k = parts[0]
        lead = k.shape.rank - len(self.kernel.shape)
        if self.kind == "einsum":
            letters = string.ascii_uppercase[:lead]
            src = letters + self.k_spec
            dst = letters + "".join(self.contract) + "".join(self.kout)
            k = tf.einsum(f"{src}->{dst}", k)
        k = tf.reshape(k, tf.concat([tf.shape(k)[:lead], [self.d_in, self.d_out]], 0))  # dense, conv (patch order)
        if self.bias is not None:
            b = tf.reshape(parts[1], tf.concat([tf.shape(parts[1])[:lead], [1, self.d_out]], 0))
            k = tf.concat([k, b], axis=-2)
        return k

    def from_matrix(self, m):
        lead = m.shape.rank - 2
        k = m[..., :self.d_in, :]
        out = []
        if self.kind == "einsum":
            sizes = dict(zip(self.k_spec, self.k_shape))
            shape = [sizes[c] for c in self.contract] + [sizes[c] for c in self.kout]
            k = tf.reshape(k, tf.concat([tf.shape(k)[:lead], shape], 0))
            letters = string.ascii_uppercase[:lead]
            k = tf.einsum(f"{letters}{''.join(self.contract)}{''.join(self.kout)}->{letters}{self.k_spec}", k)
        else:
            k = tf.reshape(k, tf.concat([tf.shape(k)[:lead], self.kernel.shape], 0))
        out.append(k)
        if self.bias is not None:
            out.append(tf.reshape(m[..., self.d_in, :], tf.concat([tf.shape(m)[:lead], self.bias.shape], 0)))
        return out


def _assign_keys(blocks, what: str):
    """Key each block by its layer's name, or — where names repeat, as the ``query`` / ``key`` / …
    sub-layers of every ``MultiHeadAttention`` do — by its Keras path (``"attention1/query"``)."""
    names = [b.layer.name + getattr(b, "suffix", "") for b in blocks]
    for b, name in zip(blocks, names):
        b.name = name if names.count(name) == 1 else (getattr(b.layer, "path", None) or b.layer.name) + getattr(
            b, "suffix", "")
    keys = [b.name for b in blocks]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ParameterGroupError(f"two {what} layers share the key(s) {dup}: give the layers distinct names")
    return blocks


def kronecker_blocks(model, group: ParameterGroup):
    """``(blocks, diagonal_variables)``: a Kronecker block for each layer of the group that supports
    one (``Dense``, ``EinsumDense`` with a Dense-like equation, ``Embedding``); the group's other
    variables get a diagonal block."""
    owner = _owners(model)
    in_group = {id(tf_variable(v)) for v in group.variables}
    blocks, covered, seen = [], set(), set()
    for v in group.variables:
        layer = owner.get(id(tf_variable(v)))
        if layer is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        if _is_reversible(layer):
            for block in _reversible_blocks(layer, in_group):
                blocks.append(block)
                covered.update(id(tf_variable(x)) for x in block.variables)
            continue
        kernel = getattr(layer, "embeddings" if isinstance(layer, keras.layers.Embedding) else "kernel", None)
        if kernel is None or id(tf_variable(kernel)) not in in_group:
            continue
        bias = getattr(layer, "bias", None)
        if bias is not None and id(tf_variable(bias)) not in in_group:
            bias = None
        try:
            if isinstance(layer, keras.layers.Embedding):
                block = _Block(layer, "embedding", kernel, None)
            elif isinstance(layer, keras.layers.EinsumDense):
                block = _Block(layer, "einsum", kernel, None)
                if bias is not None and "".join(block.kout) == (layer.bias_axes or ""):
                    block = _Block(layer, "einsum", kernel, bias)
            elif type(layer).__name__ == "Dense":
                block = _Block(layer, "dense", kernel, bias)
            elif type(layer).__name__ in ("Conv1D", "Conv2D"):
                block = _Block(layer, "conv", kernel, bias)
            else:
                continue
        except ParameterGroupError:
            continue
        blocks.append(block)
        covered.update(id(tf_variable(x)) for x in block.variables)
    _assign_keys(blocks, "Kronecker-factored")
    diagonal = [v for v in group.variables if id(tf_variable(v)) not in covered]
    return blocks, diagonal


def _is_reversible(layer) -> bool:
    cls = getattr(keras.layers, "ReversibleEmbedding", None)
    return (cls is not None and isinstance(layer, cls)) or (
        isinstance(layer, keras.layers.Embedding) and hasattr(layer, "tie_weights"))


def _reversible_blocks(layer, in_group) -> list:
    """Blocks of a ``ReversibleEmbedding`` (GPT-2's tied token embedding, Llama's untied one).

    * untied: the lookup table ``embeddings`` is an ``Embedding`` block over the forward calls and
      ``reverse_embeddings`` (``[d, vocab]``) a ``Dense`` block over the reverse calls;
    * tied: one ``[vocab, d]`` block over both uses (:meth:`_Block.pairs`): ``A`` sums the one-hot
      tokens' and the logits gradients' outer products, ``S`` the lookups' output gradients' and the
      projected inputs'. EK-FAC's eigenvalue correction then makes the block's eigenvalues the exact
      Fisher diagonal in that eigenbasis (per-example ``G_n`` summed over both uses).

    A logit soft cap (Gemma 2) makes the reverse call non-linear: its variable gets a diagonal block."""
    blocks = []
    emb = getattr(layer, "embeddings", None)
    capped = getattr(layer, "logit_soft_cap", None) is not None
    if getattr(layer, "tie_weights", False):
        if emb is not None and id(tf_variable(emb)) in in_group and not capped:
            blocks.append(_Block(layer, "tied", emb, None))
        return blocks
    if emb is not None and id(tf_variable(emb)) in in_group:
        blocks.append(_Block(layer, "embedding", emb, None, mode="forward"))
    rev = getattr(layer, "reverse_embeddings", None)
    if rev is not None and id(tf_variable(rev)) in in_group and not capped:
        blocks.append(_Block(layer, "dense", rev, None, mode="reverse", suffix="/reverse"))
    return blocks


class _NormBlock:
    """A ``LayerNormalization`` over the last axis: its ``γ`` / ``β`` keep a *diagonal* curvature, but
    their per-example gradients come from the captured input and output gradient —
    ``∂l/∂γ = Σ_t g_t ⊙ x̂_t``, ``∂l/∂β = Σ_t g_t`` (``x̂`` the normalised input) — instead of
    vectorised per-example backward passes."""

    kind = "norm"

    def __init__(self, layer, gamma, beta):
        self.layer, self.name, self.gamma, self.beta = layer, layer.name, gamma, beta  # unique: _assign_keys
        self.variables = [v for v in (gamma, beta) if v is not None]

    def per_example(self, inputs, g, dtype, **_call_options):
        """Per-example gradients ``[B, d]`` of (γ, β) present in the group, in ``variables`` order
        (the layer's call options change nothing here)."""
        x = tf.cast(inputs, dtype)
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        xhat = (x - mean) * tf.math.rsqrt(var + self.layer.epsilon)
        d = int(x.shape[-1])
        g = tf.reshape(tf.cast(g, dtype), [tf.shape(g)[0], -1, d])
        xhat = tf.reshape(xhat, [tf.shape(g)[0], -1, d])
        out = []
        if self.gamma is not None:
            out.append(tf.reduce_sum(g * xhat, axis=1))
        if self.beta is not None:
            out.append(tf.reduce_sum(g, axis=1))
        return out


class _PositionBlock:
    """A learned position embedding (keras-hub's ``PositionEmbedding``: ``out[b, t] = E[start + t]``,
    or ``E[positions[b, t]]``): its per-example gradient is the output gradient placed at the rows of
    the positions it read — ``∂l_n/∂E[r] = Σ_{t: pos(t) = r} g_{n,t}`` — so it comes from the captured
    output gradient instead of per-example backward passes (diagonal curvature, like the norms)."""

    kind = "position"

    def __init__(self, layer, table):
        self.layer, self.name, self.table = layer, layer.name, table
        self.variables = [table]

    @staticmethod
    def owns(layer) -> bool:
        return type(layer).__name__ == "PositionEmbedding" and getattr(layer, "position_embeddings", None) is not None

    def per_example(self, inputs, g, dtype, start_index=0, positions=None):
        rows = int(self.table.shape[0])
        g = tf.cast(g, dtype)                                                  # [B, P, d]
        if positions is None:
            where = tf.one_hot(tf.range(tf.shape(g)[1]) + tf.cast(start_index, tf.int32), rows, dtype=dtype)
            return [tf.einsum("bpd,pr->brd", g, where)]
        where = tf.one_hot(tf.cast(positions, tf.int32), rows, dtype=dtype)    # [1 or B, P, rows]
        where = tf.broadcast_to(where, tf.concat([tf.shape(g)[:2], [rows]], 0))
        return [tf.einsum("bpd,bpr->brd", g, where)]


def norm_blocks(model, variables):
    """``(norm_blocks, rest)``: the layers whose per-example gradients come from their captured input
    and output gradient — ``LayerNormalization`` (last axis, no RMS scaling) and learned position
    embeddings (:class:`_PositionBlock`) — owning some of ``variables``, and the variables no such
    layer covers."""
    owner = _owners(model)
    wanted = {id(tf_variable(v)) for v in variables}
    blocks, covered, seen = [], set(), set()
    for v in variables:
        layer = owner.get(id(tf_variable(v)))
        if layer is None or id(layer) in seen:
            continue
        if _PositionBlock.owns(layer) and id(tf_variable(layer.position_embeddings)) in wanted:
            seen.add(id(layer))
            blocks.append(_PositionBlock(layer, layer.position_embeddings))
            covered.add(id(tf_variable(layer.position_embeddings)))
            continue
        if not isinstance(layer, keras.layers.LayerNormalization):
            continue
        seen.add(id(layer))
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        gamma, beta = (getattr(layer, attr, None) for attr in ("gamma", "beta"))
        last = gamma is not None and len(gamma.shape) == 1
        if getattr(layer, "rms_scaling", False) or len(axis) != 1 or not (axis[0] == -1 or last):
            continue
        gamma, beta = (w if w is not None and id(tf_variable(w)) in wanted else None for w in (gamma, beta))
        if gamma is None and beta is None:
            continue
        blk = _NormBlock(layer, gamma, beta)
        blocks.append(blk)
        covered.update(id(tf_variable(x)) for x in blk.variables)
    _assign_keys(blocks, "LayerNormalization")
    return blocks, [v for v in variables if id(tf_variable(v)) not in covered]


def _norm_per_example(nb, records, grads, dtype, options=None):
    """Per-example gradients of a norm / position layer's variables, summed over its calls in the
    forward pass (``options``: each call's keyword arguments, e.g. ``start_index``)."""
    total = None
    for i, ((inp, _), g) in enumerate(zip(records, grads)):
        pe = nb.per_example(inp, g, dtype, **(options[i] if options else {}))
        total = pe if total is None else [a + b for a, b in zip(total, pe)]
    return total


def _vectorized_gradients(objective, variables, x, y):
    """Per-example gradients ``[B, *shape]`` of ``variables`` (one-example gradients under
    ``tf.vectorized_map``, or ``tf.map_fn`` where pfor would crash: :mod:`tf_influence.safety`): the
    fallback for variables no captured layer covers."""
    vars_ = [tf_variable(v) for v in variables]

    def one(example):
        xi, yi = example
        xi = tf.nest.map_structure(lambda t: t[None], xi)
        yi = tf.nest.map_structure(lambda t: t[None], yi)
        with tf.GradientTape() as tape:
            tape.watch(vars_)
            loss = tf.reduce_sum(objective.per_example_losses(xi, yi))
        return densify(tape.gradient(loss, vars_, unconnected_gradients=tf.UnconnectedGradients.ZERO))
    signature = [tf.TensorSpec(v.shape, v.dtype) for v in vars_]
    return per_example_map(one, (x, y), signature, objective, x, y)


def _diagonal_squares(objective, norms, records, grads_of, rest, x, y, dtype, options=None):
    """``{id(variable): Σ_n (∂l_n/∂v)²}`` for the diagonal variables: from the captured
    ``LayerNormalization`` / position-embedding records, and by vectorised per-example gradients for
    the ``rest``."""
    out, options = {}, options or {}
    for nb in norms:
        per = _norm_per_example(nb, records[nb.name], grads_of[nb.name], dtype, options.get(nb.name))
        for v, pe in zip(nb.variables, per):
            out[id(tf_variable(v))] = tf.reduce_sum(tf.square(pe), axis=0)
    if rest:
        for v, gv in zip(rest, _vectorized_gradients(objective, rest, x, y)):
            out[id(tf_variable(v))] = tf.reduce_sum(tf.square(tf.cast(gv, dtype)), axis=0)
    return out


def _output_grads(tape, total, cap, layers) -> dict:
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


class _Capture:
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
            original, rec, reversible = layer.call, self._calls[id(layer)], _is_reversible(layer)
            position = _PositionBlock.owns(layer)

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


def _sample_labels(loss, y_pred, y, fisher: str, seed):
    if fisher == "empirical":
        return y
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    from .lm import CausalLMLoss
    if isinstance(loss, CausalLMLoss):   # next-token softmax: sample every labelled position, keep IGNORE
        flat = tf.reshape(y_pred, [-1, tf.shape(y_pred)[-1]])
        sample = tf.random.stateless_categorical(tf.cast(flat, tf.float32), 1, seed=seed)[:, 0]
        sample = tf.cast(tf.reshape(sample, tf.shape(y_pred)[:-1]), y.dtype)
        return tf.where(y >= 0, sample, y)
    cfg = loss.get_config() if isinstance(loss, keras.losses.Loss) else {}
    fn = getattr(loss, "fn", loss)  # a compiled / loaded model's loss is a LossFunctionWrapper around the function
    names = {type(loss).__name__, getattr(fn, "__name__", ""), str(cfg.get("name", ""))}
    if not any(n.replace("_", "").lower() == "sparsecategoricalcrossentropy" for n in names):
        raise ValueError(f"fisher='true' samples labels from the model's predictive distribution, which is only "
                         f"known for sparse categorical cross-entropy (got {sorted(n for n in names if n)}); "
                         "use fisher='empirical'")
    from_logits = cfg.get("from_logits", getattr(loss, "_fn_kwargs", {}).get("from_logits", False))
    logits = y_pred if from_logits else tf.math.log(tf.maximum(y_pred, 1e-12))
    flat = tf.reshape(logits, [-1, tf.shape(logits)[-1]])
    sample = tf.random.stateless_categorical(tf.cast(flat, tf.float32), 1, seed=seed)[:, 0]
    return tf.cast(tf.reshape(sample, tf.shape(logits)[:-1]), y.dtype)


# -- the factors ---------------------------------------------------------------------------------
@dataclass
class KFACFactors:
    """Fitted factors of one (model, loss, group): per block ``Q_A``, ``Q_S`` and the eigenvalues
    ``Λ`` ([rows, d_out]); per diagonal variable its Fisher diagonal. Built by :func:`fit_factors`."""

    kind: str
    fisher: str
    num_examples: int
    group_spec: GroupSpec
    blocks: dict = field(default_factory=dict)      # name → {"QA", "QS", "eig", "A_diag"(embedding)}
    diagonal: dict = field(default_factory=dict)    # variable path → Fisher diagonal (variable shape)

    def summary(self) -> dict:
        return {"kind": self.kind, "fisher": self.fisher, "num_examples": self.num_examples,
                "kronecker_blocks": {k: list(np.shape(v["eig"])) for k, v in self.blocks.items()},
                "diagonal_variables": sorted(self.diagonal)}

    def save(self, directory: str) -> str:
        """Write ``factors.npz`` + ``factors.json`` to ``directory`` (a local path or any
        ``tf.io.gfile`` URL, e.g. ``gs://``)."""
        import io
        tf.io.gfile.makedirs(directory)
        arrays = {}
        for name, blk in self.blocks.items():
            for key, val in blk.items():
                arrays[f"block/{name}/{key}"] = val
        for path, val in self.diagonal.items():
            arrays[f"diag/{path}"] = val
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        with tf.io.gfile.GFile(os.path.join(directory, "factors.npz"), "wb") as fh:
            fh.write(buf.getvalue())
        with tf.io.gfile.GFile(os.path.join(directory, "factors.json"), "w") as fh:
            fh.write(json.dumps({"kind": self.kind, "fisher": self.fisher, "num_examples": self.num_examples,
                                 "group_spec": json.loads(self.group_spec.to_json())}, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str) -> "KFACFactors":
        import io
        meta_path = os.path.join(directory, "factors.json")
        if not tf.io.gfile.exists(meta_path):
            raise FileNotFoundError(f"no K-FAC factors in {directory} (missing factors.json)")
        with tf.io.gfile.GFile(meta_path) as fh:
            meta = json.load(fh)
        with tf.io.gfile.GFile(os.path.join(directory, "factors.npz"), "rb") as fh:
            data = np.load(io.BytesIO(fh.read()))
        blocks, diagonal = {}, {}
        for key in data.files:
            kind, rest = key.split("/", 1)
            if kind == "block":
                name, field_ = rest.rsplit("/", 1)
                blocks.setdefault(name, {})[field_] = data[key]
            else:
                diagonal[rest] = data[key]
        return cls(meta["kind"], meta["fisher"], meta["num_examples"], GroupSpec.from_json(meta["group_spec"]),
                   blocks, diagonal)


class FactorStatistics:
    """The two streaming passes of :func:`fit_factors` as separate, mergeable steps — what a
    distributed engine (a Beam combiner, ``tf.distribute``) needs to fit factors over a corpus that
    no single process holds.

    Sums are plain numpy (picklable) dicts that add with :func:`add_statistics`; every step is a
    pure function of the model's weights, the batch and ``step`` (the sampling seed of the batch)::

        stats = FactorStatistics(objective, group)
        sums = add_statistics(stats.covariances(x1, y1, 0), stats.covariances(x2, y2, 1))
        bases = stats.eigenbases(sums)                               # pass 1 → eigenbases
        corr = add_statistics(stats.correction(x1, y1, 0, bases), stats.correction(x2, y2, 1, bases))
        factors = stats.factors(sums, bases, corr)                   # EK-FAC (kind="kfac": corr=None)

    ``strategy``: covariances / corrections of a distributed batch are summed across replicas.
    """

    def __init__(self, objective, group: ParameterGroup, kind: str = "ekfac", fisher: str = "true",
                 seed: int = 0, strategy=None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got '{fisher}'")
        self.objective, self.group, self.kind, self.fisher = objective, group, kind, fisher
        self.seed, self.strategy = int(seed), strategy
        self.blocks, self.diag_vars = kronecker_blocks(objective.model, group)
        self.norms, self.rest = norm_blocks(objective.model, self.diag_vars)
        # per-batch products in the model's precision (float32 models: 2–4× faster einsums on the
        # big layers), sums accumulated in float64
        self.compute = tf.float64 if group.dtype == tf.float64 else tf.float32
        self._stats = tf.function(self._stats_fn, reduce_retracing=True)
        self._correction = tf.function(self._correction_fn, reduce_retracing=True)

    # -- compiled per-batch kernels ---------------------------------------------------------------
    def _forward(self, x, y, step, with_norms=False):
        """Kronecker blocks' ``(activations, output gradients)`` per call, the sampled labels, and
        (``with_norms``) the captured ``LayerNormalization`` records with their output gradients."""
        model, objective = self.objective.model, self.objective
        layers = self.blocks + (self.norms if with_norms else [])
        cap = _Capture(layers)
        with cap, tf.GradientTape() as tape:
            y_pred = model(x, training=False)
            ys = _sample_labels(objective.loss, y_pred, y, self.fisher, tf.stack([tf.constant(self.seed, tf.int64),
                                                                                  tf.cast(step, tf.int64)]))
            losses = reduce_per_example(objective.loss_fn(ys, y_pred))
            total = tf.reduce_sum(losses)
        grads = _output_grads(tape, total, cap, layers)
        records, modes = cap.records, cap.modes
        res = {}
        for b in self.blocks:
            res[b.name] = []
            for (inp, _), g, rev in zip(records[b.name], grads[b.name], modes[b.name]):
                a, gg = b.pairs(inp, g, rev)
                res[b.name].append((a, tf.cast(gg, self.compute)))
        if with_norms:
            return res, ys, (records, grads, cap.options)
        return res, ys

    def _stats_fn(self, x, y, step):
        dtype = tf.float64
        res, ys, (records, layer_grads, options) = self._forward(x, y, step, with_norms=True)
        out = {}
        for b in self.blocks:
            A = tf.zeros([b.rows] if b.kind == "embedding" else [b.rows, b.rows], dtype)
            S = tf.zeros([b.d_out, b.d_out], dtype)
            tokens = tf.constant(0.0, dtype)
            for a, g in res[b.name]:
                if b.kind == "embedding":
                    ids = tf.reshape(a, [-1])
                    A += tf.math.unsorted_segment_sum(tf.ones_like(ids, dtype), ids, b.rows)
                else:
                    a = tf.cast(a, self.compute)
                    A += tf.cast(tf.einsum("bpi,bpj->ij", a, a), dtype)
                tokens += tf.cast(tf.shape(g)[0] * tf.shape(g)[1], dtype)
                S += tf.cast(tf.einsum("bpi,bpj->ij", g, g), dtype)
            out[b.name] = (A, S, tokens)
        sq = _diagonal_squares(self.objective, self.norms, records, layer_grads, self.rest, x, ys, dtype, options)
        diag = [sq[id(tf_variable(v))] for v in self.diag_vars]
        return out, diag, tf.cast(tf.shape(tf.nest.flatten(y)[0])[0], dtype)

    def _correction_fn(self, x, y, step, bases):
        dtype = tf.float64
        res, _ = self._forward(x, y, step)
        out = {}
        for b in self.blocks:
            QA, QS = (tf.cast(q, self.compute) for q in bases[b.name])
            lam = tf.zeros([b.rows, b.d_out], dtype)
            if not res[b.name]:       # a block the loss never calls: no gradient, zero eigenvalues
                out[b.name] = lam
                continue
            # G_n sums over every call of the layer in the forward pass (a tied ReversibleEmbedding:
            # its lookup and its output projection), so the calls are joined along the positions
            # before the square — squaring per call would drop the cross terms between calls
            a = tf.concat([tf.cast(r[0], tf.int32) if b.kind == "embedding" else tf.cast(r[0], self.compute)
                           for r in res[b.name]], axis=1)
            g = tf.concat([r[1] for r in res[b.name]], axis=1)
            gq = tf.einsum("bpo,oc->bpc", g, QS)
            if b.kind == "embedding":  # G_n Q_S row v = Σ_{t: token v} (g_t Q_S)
                # only the (example, token) pairs present in the batch have non-zero rows: sum
                # over those (≤ B·P of them, not B·vocabulary), square, then add up by token
                n = tf.shape(a)[0]
                pairs = tf.reshape(tf.cast(a, tf.int64) + tf.range(tf.cast(n, tf.int64))[:, None] * b.rows, [-1])
                present, idx = tf.unique(pairs)
                rows = tf.math.unsorted_segment_sum(tf.reshape(gq, [-1, b.d_out]), idx, tf.size(present))
                token = tf.cast(present % b.rows, tf.int32)
                lam += tf.cast(tf.math.unsorted_segment_sum(tf.square(rows), token, b.rows), dtype)
            else:
                aq = tf.einsum("bpi,ia->bpa", a, QA)
                lam += tf.cast(tf.reduce_sum(tf.square(tf.einsum("bpa,bpc->bac", aq, gq)), axis=0), dtype)
            out[b.name] = lam
        return out

    def _run(self, fn, *args):
        """``fn`` on the batch (on every replica's share of it, summed across replicas)."""
        if self.strategy is None:
            out = fn(*args)
        else:
            per_replica = self.strategy.run(fn, args=args)
            out = tf.nest.map_structure(
                lambda t: self.strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None), per_replica)
        return tf.nest.map_structure(lambda t: t.numpy(), out)

    # -- the steps ------------------------------------------------------------------------------------
    def covariances(self, x, y, step: int) -> dict:
        """Pass 1 sums of one batch: ``{"n", "blocks": {name: (Σ aaᵀ, Σ ggᵀ, tokens)}, "diag": [Σ g²]}``."""
        out, diag, n = self._run(self._stats, x, y, tf.constant(step, tf.int64))
        return {"n": float(n), "blocks": {k: tuple(v) for k, v in out.items()}, "diag": list(diag)}

    def eigenbases(self, sums: dict) -> dict:
        """Eigendecomposition of the pass-1 averages (see :func:`eigenbases`)."""
        return eigenbases(sums)

    def correction(self, x, y, step: int, bases: dict) -> dict:
        """Pass 2 sums of one batch (EK-FAC): ``{name: Σ_n ((Q_Aᵀ G_n Q_S)_ij)²}``."""
        tb = {k: (tf.constant(v["QA"]), tf.constant(v["QS"])) for k, v in bases.items()}
        return self._run(self._correction, x, y, tf.constant(CORRECTION_SEED_OFFSET + step, tf.int64), tb)

    def factors(self, sums: dict, bases: dict, correction: dict | None = None) -> KFACFactors:
        """The fitted :class:`KFACFactors` (``correction`` required for ``kind="ekfac"`` with blocks)."""
        n = sums["n"]
        fitted = {k: dict(v) for k, v in bases.items()}
        if self.kind == "ekfac" and self.blocks:
            if correction is None:
                raise ValueError("EK-FAC needs the eigenvalue-correction sums of the second pass")
            for b in self.blocks:
                fitted[b.name]["eig"] = correction[b.name] / n
        diagonal = {getattr(v, "path", tf_variable(v).name): d / n for v, d in zip(self.diag_vars, sums["diag"])}
        return KFACFactors(self.kind, self.fisher, int(round(n)), self.group.spec(self.objective.model), fitted,
                           diagonal)


def eigenbases(sums: dict) -> dict:
    """Pass-1 sums of :class:`FactorStatistics` → ``{block: {"QA", "QS", "eig"}}`` with the K-FAC
    eigenvalues ``λ_A ⊗ λ_S`` (an ``Embedding`` block's ``A`` is diagonal: its ``QA`` is empty and
    its eigenvalues are the token frequencies). Needs only the sums, not the model."""
    n = sums["n"]
    if n == 0:
        from .objective import EmptyDatasetError
        raise EmptyDatasetError("no examples: the K-FAC covariances are empty")
    fitted = {}
    for name, (A, S, tokens) in sums["blocks"].items():
        A = A / max(float(tokens), 1.0)   # a block its loss never calls (an unused reverse projection): zeros
        S = S / n
        eS, QS = np.linalg.eigh(0.5 * (S + S.T))
        if A.ndim == 1:  # Embedding
            eA, QA = A, np.zeros((0, 0))
        else:
            eA, QA = np.linalg.eigh(0.5 * (A + A.T))
        fitted[name] = {"QA": QA, "QS": QS, "eig": np.outer(np.maximum(eA, 0), np.maximum(eS, 0))}
    return fitted


CORRECTION_SEED_OFFSET = 10_000_019  # the second pass draws its labels with other seeds than the first


def add_statistics(a, b):
    """Sum of two (nested) statistics of :class:`FactorStatistics`; ``None`` is the empty sum."""
    if a is None:
        return b
    if b is None:
        return a
    return tf.nest.map_structure(lambda u, v: u + v, a, b)


def _global_batch_size(y, strategy) -> int:
    t = tf.nest.flatten(y)[0]
    if strategy is None:
        return int(tf.shape(t)[0])
    return int(sum(int(tf.shape(v)[0]) for v in strategy.experimental_local_results(t)))


def fit_factors(objective, dataset, group: ParameterGroup, kind: str = "ekfac", fisher: str = "true",
                seed: int = 0, progress: bool = False, name: str = "dataset", strategy=None,
                max_examples: int | None = None) -> KFACFactors:
    """Fit (E)K-FAC factors of ``objective`` on ``dataset`` for ``group`` (one pass, two for EK-FAC).

    The passes are :class:`FactorStatistics`' steps, summed batch by batch in bounded memory (the
    same steps run as a Beam combiner in ``tfx_components.beam_factors``).
    With a ``tf.distribute`` ``strategy`` each replica accumulates the covariances (and the
    eigenvalue sums) of its share of every global batch and the sums are all-reduced: the factors
    equal the single-device ones (tested with MirroredStrategy on two logical CPUs; with
    ``fisher="true"`` each replica draws its own labels, an equally valid Monte Carlo sample).

    ``max_examples``: fit both passes on the dataset's first ``max_examples`` examples only (shuffle
    it first), as kronfluence's ``covariance_max_examples`` / ``lambda_max_examples`` (its default:
    100,000) — the factor passes cost about 1.5 and 2 training epochs over the examples they see
    (``benchmarks/scale.py``), while the scores of every example still come from one pass; with a
    ``strategy`` the cap is applied in whole global batches.

    >>> import keras, tensorflow as tf                                    # doctest: +SKIP
    >>> factors = fit_factors(Objective(model), train_ds, ParameterGroup.from_model(model))  # doctest: +SKIP
    >>> factors.summary()["diagonal_variables"]      # what has no Kronecker block  # doctest: +SKIP
    """
    stats = FactorStatistics(objective, group, kind, fisher, seed, strategy)
    model = objective.model
    if max_examples is not None and int(max_examples) < 1:
        raise ValueError(f"max_examples must be a positive number of examples, got {max_examples}")

    def capped(it):
        if max_examples is None:
            yield from it
            return
        seen = 0
        for x, y in it:
            if seen >= max_examples:
                return
            k = _global_batch_size(y, strategy)
            if strategy is None and seen + k > max_examples:  # cut the last batch (whole batches under a strategy)
                k = int(max_examples) - seen
                x, y = (tf.nest.map_structure(lambda t: t[:k], z) for z in (x, y))
            seen += k
            yield x, y

    def loop(desc):
        if strategy is not None:
            check_dataset(dataset, name, model)
            it = iter(strategy.experimental_distribute_dataset(dataset))
        else:
            it = batches(dataset, name, model)
        it = capped(it)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=desc, leave=False)
        return enumerate(it)

    sums = None
    with finite_check(f"K-FAC factors of {objective.name} on {name}"):
        for step, (x, y) in loop("K-FAC covariances"):
            sums = add_statistics(sums, stats.covariances(x, y, step))
    if sums is None or sums["n"] == 0:
        from .objective import EmptyDatasetError
        raise EmptyDatasetError(f"{name} is empty: it yielded no examples")
    bases = stats.eigenbases(sums)
    corr = None
    if kind == "ekfac" and stats.blocks:
        with finite_check(f"EK-FAC eigenvalue correction of {objective.name} on {name}"):
            for step, (x, y) in loop("EK-FAC eigenvalue correction"):
                corr = add_statistics(corr, stats.correction(x, y, step, bases))
    return stats.factors(sums, bases, corr)


# -- per-example squared gradient norms without per-example gradients ("ghost norms") --------------
class GhostNorms:
    """``‖∇_K l(z)‖²`` for every example of a batch over a parameter group K, from one ordinary
    forward / backward pass. For a block with per-example gradient ``G_n = Σ_t a_t g_tᵀ``::

        ‖G_n‖²_F = Σ_{t,t'} (a_t·a_t') (g_t·g_t')

    (``a`` = input, plus 1 for the bias; for ``Embedding`` ``a_t·a_t' = [token_t = token_t']``), or
    ``‖G_n‖²`` from the explicit ``G_n`` when ``d_in·d_out`` is smaller than ``P²`` (for ``Embedding``
    a segment sum of ``g`` per token). Variables without
    a block (e.g. ``LayerNormalization``) fall back to vectorised per-example gradients. Compiled once
    per (model, loss, group) through :mod:`compiled`.
    """

    def __init__(self, objective, group: ParameterGroup):
        self.objective, self.group = objective, group
        self.blocks, self.diagonal = kronecker_blocks(objective.model, group)
        self.norms, self.rest = norm_blocks(objective.model, self.diagonal)
        self.fn = tf.function(self._norms, reduce_retracing=True)

    @classmethod
    def get(cls, objective, group):
        from .compiled import cached_kernel
        return cached_kernel(objective, "ghost_norms", (group,), lambda: cls(objective, group))

    def _norms(self, x, y):
        model, obj = self.objective.model, self.objective
        cap = _Capture(self.blocks + self.norms)
        with cap, tf.GradientTape() as tape:
            losses = reduce_per_example(obj.loss_fn(y, model(x, training=False)))
            total = tf.reduce_sum(losses)
        grads = _output_grads(tape, total, cap, self.blocks + self.norms)
        records, modes, options = cap.records, cap.modes, cap.options
        sq = tf.zeros_like(losses)
        for b in self.blocks:
            # a layer called several times in one forward pass: G_n sums over its calls
            pairs = [b.pairs(inp, gr, rev) for (inp, _), gr, rev in
                     zip(records[b.name], grads[b.name], modes[b.name])]
            a = tf.concat([p[0] for p in pairs], axis=1)
            g = tf.concat([tf.cast(p[1], losses.dtype) for p in pairs], axis=1)
            positions = a.shape[1]
            pairwise = positions is not None and positions * positions <= b.rows * b.d_out
            if b.kind == "embedding" and pairwise:
                same = tf.cast(tf.equal(a[:, :, None], a[:, None, :]), g.dtype)      # [B, P, P]
                sq += tf.einsum("bpq,bpq->b", same, tf.einsum("bpo,bqo->bpq", g, g))
                continue
            if b.kind == "embedding":  # G_n row v = Σ_{t: token v} g_t: a segment sum per example
                n = tf.shape(a)[0]
                seg = tf.reshape(a + tf.range(n)[:, None] * b.rows, [-1])
                rows = tf.math.unsorted_segment_sum(tf.reshape(g, [-1, b.d_out]), seg, n * b.rows)
                sq += tf.reduce_sum(tf.reshape(tf.square(rows), [n, -1]), axis=1)
                continue
            a = tf.cast(a, g.dtype)
            if pairwise:
                sq += tf.einsum("bpq,bpq->b", tf.einsum("bpi,bqi->bpq", a, a), tf.einsum("bpo,bqo->bpq", g, g))
            else:
                sq += tf.reduce_sum(tf.square(tf.einsum("bpi,bpo->bio", a, g)), axis=[1, 2])
        # diagonal variables, per example: Σ over each variable of (Σ_t ...)², not summed over the batch
        for nb in self.norms:
            for pe in _norm_per_example(nb, records[nb.name], grads[nb.name], losses.dtype, options.get(nb.name)):
                sq += tf.reduce_sum(tf.reshape(tf.square(pe), [tf.shape(pe)[0], -1]), axis=1)
        if self.rest:
            for gv in _vectorized_gradients(obj, self.rest, x, y):
                gv = tf.cast(gv, losses.dtype)
                sq += tf.reduce_sum(tf.reshape(tf.square(gv), [tf.shape(gv)[0], -1]), axis=1)
        return sq


# -- the inverse -----------------------------------------------------------------------------------
def regularizer_diagonal(model, group: ParameterGroup):
    """``(diag, unmodelled)``: the Hessian diagonal of the L2 penalties on the group's variables
    (``2c`` per entry for ``L2(c)`` / ``L1L2(0, c)``) and the layers whose penalty is not an L2."""
    owner = _owners(model)
    parts, unmodelled = [], []
    for v in group.variables:
        layer = owner.get(id(tf_variable(v)))
        coef = 0.0
        if layer is not None:
            for attr, reg_attr in (("kernel", "kernel_regularizer"), ("bias", "bias_regularizer"),
                                   ("embeddings", "embeddings_regularizer"), ("gamma", "gamma_regularizer"),
                                   ("beta", "beta_regularizer")):
                w = getattr(layer, attr, None)
                if w is not None and id(tf_variable(w)) == id(tf_variable(v)):
                    c = _l2(getattr(layer, reg_attr, None))
                    if c is None:
                        unmodelled.append(layer.name)
                        c = 0.0
                    coef = c
        parts.append(np.full(tf_variable(v).shape, 2.0 * coef))
    return parts, unmodelled


class KFACInverse:
    """``v ↦ (F̂ + D + λ)⁻¹ v`` for fitted factors over a group (flat ``[p]`` or ``[p, k]``)."""

    def __init__(self, factors: KFACFactors, model, group: ParameterGroup, damping: float = 0.0,
                 relative_damping: float = 0.0, extra_diagonal=None, include_regularizers: bool = True):
        # the inverse works per layer / variable, so only the set of variables must match (not their order)
        if sorted(group.spec(model).variables) != sorted(factors.group_spec.variables):
            raise ParameterGroupError("the K-FAC factors were fitted for another parameter group "
                                      f"('{factors.group_spec.name}'); refit them for '{group.name}'")
        self.group, self.model = group, model
        self.blocks, _ = kronecker_blocks(model, group)
        diag_parts = [np.zeros(s) for s in group.shapes]
        self.unmodelled = []
        if include_regularizers:
            reg, self.unmodelled = regularizer_diagonal(model, group)
            diag_parts = [d + r for d, r in zip(diag_parts, reg)]
        if extra_diagonal is not None:
            extra = group.unflatten(tf.cast(tf.reshape(extra_diagonal, [-1]), group.dtype))
            diag_parts = [d + e.numpy() for d, e in zip(diag_parts, extra)]
        index = {id(tf_variable(v)): i for i, v in enumerate(group.variables)}
        self.denominators = {}
        self._curvature = []  # F̂ + D per block / diagonal variable, before the damping (spectrum())
        for b in self.blocks:
            f = factors.blocks[b.name]
            D = b.to_matrix([tf.constant(diag_parts[index[id(tf_variable(x))]]) for x in b.variables]).numpy()
            QS2 = f["QS"] ** 2
            projected = (D @ QS2) if b.kind == "embedding" else (f["QA"] ** 2).T @ D @ QS2
            lam = damping + relative_damping * float(np.mean(f["eig"]))
            self._curvature.append(f["eig"] + projected)
            self.denominators[b.name] = tf.constant(f["eig"] + projected + lam)
            b.QA = None if b.kind == "embedding" else tf.constant(f["QA"])
            b.QS = tf.constant(f["QS"])
        self.diag = {}
        for v in group.variables:
            path = getattr(v, "path", tf_variable(v).name)
            if path in factors.diagonal:
                d = factors.diagonal[path]
                lam = damping + relative_damping * float(np.mean(d))
                self._curvature.append(d + diag_parts[index[id(tf_variable(v))]])
                self.diag[id(tf_variable(v))] = tf.constant(d + diag_parts[index[id(tf_variable(v))]] + lam)
        self.index = index

    def spectrum(self) -> tuple:
        """``(smallest, largest)`` eigenvalue of the curvature this inverse inverts, ``F̂ + D`` without
        the damping (EK-FAC: corrected eigenvalues plus the diagonal's projection, per block)."""
        vals = [float(np.min(c)) for c in self._curvature if c.size] or [0.0]
        highs = [float(np.max(c)) for c in self._curvature if c.size] or [0.0]
        return min(vals), max(highs)

    def __call__(self, V):
        V = tf.cast(tf.convert_to_tensor(V), tf.float64)
        was_vector = V.shape.rank == 1
        M = V[:, None] if was_vector else V                       # [p, k]
        cols = tf.transpose(M)                                      # [k, p]
        sizes = self.group.sizes
        pieces = tf.split(cols, sizes, axis=1)
        per_var = [tf.reshape(pc, [-1] + list(s)) for pc, s in zip(pieces, self.group.shapes)]  # [k, *shape]
        out = list(per_var)
        for b in self.blocks:
            idx = [self.index[id(tf_variable(x))] for x in b.variables]
            m = b.to_matrix([per_var[i] for i in idx])              # [k, rows, d_out]
            if b.kind == "embedding":
                r = tf.einsum("kro,oc->krc", m, b.QS) / self.denominators[b.name]
                m = tf.einsum("krc,oc->kro", r, b.QS)
            else:
                r = tf.einsum("ra,kro,oc->kac", b.QA, m, b.QS) / self.denominators[b.name]
                m = tf.einsum("ra,kac,oc->kro", b.QA, r, b.QS)
            for i, piece in zip(idx, b.from_matrix(m)):
                out[i] = piece
        for i, v in enumerate(self.group.variables):
            key = id(tf_variable(v))
            if key in self.diag:
                out[i] = per_var[i] / self.diag[key]
        flat = tf.concat([tf.reshape(o, [tf.shape(o)[0], -1]) for o in out], axis=1)  # [k, p]
        res = tf.transpose(flat)
        return res[:, 0] if was_vector else res


__all__ = ["FactorStatistics", "GhostNorms", "KFACFactors", "KFACInverse", "add_statistics", "eigenbases",
           "fit_factors", "kronecker_blocks", "regularizer_diagonal",
           "KINDS", "FISHERS"]

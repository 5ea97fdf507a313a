"""Which layers the K-FAC / EK-FAC and ghost-norm code factors, and how: one ``_Block`` per
Kronecker-factored use of a layer (``Dense``, ``EinsumDense``, convolutions, ``Embedding``, both uses of
a ``ReversibleEmbedding``), ``_NormBlock`` / ``_PositionBlock`` for the layers whose per-example
gradients come from captured inputs and output gradients (normalisations, position embeddings)."""

from __future__ import annotations

import string

import keras
import numpy as np
import tensorflow as tf

from ..capture import is_position_embedding, is_reversible
from ..params import ParameterGroup, ParameterGroupError, parameters, tf_variable


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
        # which sides of the Kronecker factor A ⊗ S are kept diagonal (identity eigenbasis) instead of a
        # dense covariance and its eigendecomposition: an Embedding's token side always (it *is* diagonal);
        # vocabulary-sized sides of output projections when FactorStatistics says so (see set_sides)
        self.diag_in, self.diag_out = kind == "embedding", False

    def set_sides(self, dense_factor_max: int | None):
        """Keep a side diagonal when it has more than ``dense_factor_max`` entries (a vocabulary:
        GPT-2's tied ``[50257, d]`` table, an untied ``Dense(vocab)`` head); ``None``: every side dense
        but an ``Embedding``'s token side. Returns the block."""
        limit = float("inf") if dense_factor_max is None else int(dense_factor_max)
        self.diag_in = self.kind == "embedding" or self.rows > limit
        self.diag_out = self.d_out > limit
        return self

    def sparse_pairs(self, inputs, g, reverse: bool):
        """``(a, g, ids)``: like :meth:`pairs`, but a token lookup (an ``Embedding``, a tied table's
        forward call) gives its token ids ``[B, P]`` with ``ids=True`` instead of one-hot rows — what
        a diagonal token side needs (``Σ_t e_t e_tᵀ`` is the token counts) without a ``[B, P, vocab]``
        tensor."""
        if self.kind == "embedding":
            return self.activations(inputs), self.out_grads(g), True
        if self.kind == "tied" and not reverse:
            n = tf.shape(g)[0]
            return tf.reshape(tf.cast(inputs, tf.int32), [n, -1]), tf.reshape(g, [n, -1, self.d_out]), True
        a, gg = self.pairs(inputs, g, reverse)
        return a, gg, False

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

    def activation_key(self):
        """What :meth:`activations` does to a layer's input, as a hashable key (None for token lookups and
        tied tables): blocks whose layers are called on one tensor and share this key have the same activations
        — a transformer's query, key and value projections, a gated MLP's gate and up projections — so the
        same covariance ``A`` and the same eigenbasis ``Q_A``, which the factor passes then compute once."""
        if self.kind == "dense":
            key = ("dense", self.d_in)
        elif self.kind == "einsum":
            key = ("einsum", self.in_spec, self.batch + "".join(self.pos) + "".join(self.contract), self.d_in)
        elif self.kind == "conv":
            layer = self.layer
            key = ("conv", self.d_in, tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate),
                   layer.padding)
        else:
            return None
        return key + (self.bias is not None,)

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
        if is_reversible(layer):
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


#: keras-hub's RMS normalisations ``out = x · rsqrt(mean(x², last axis) + ε) · scale`` (computed in float32),
#: by class name: Llama, Mistral, Mixtral, Qwen (and MoE), Qwen3 (and MoE), Phi-3, GPT-OSS — and Gemma's
#: ``RMSNormalization`` (``· (1 + scale)``: the same gradient in ``scale``), recognised by its module. Their
#: ``scale`` gets its per-example gradient from the captured input and output gradient
#: (:class:`_RMSNormBlock`); another layer with the same computation can be added here by its class name.
RMS_NORM_CLASSES = {"LlamaLayerNorm", "MistralLayerNormalization", "MixtralLayerNormalization", "QwenLayerNorm",
                    "QwenMoeLayerNorm", "Qwen3LayerNorm", "Qwen3MoeLayerNorm", "Phi3LayerNorm",
                    "GptOssLayerNormalization"}


class _RMSNormBlock(_NormBlock):
    """An RMS normalisation over the last axis (:data:`RMS_NORM_CLASSES`, ``x̂ = x · rsqrt(mean(x²) + ε)``
    in float32, ``out = x̂ · scale``): ``∂l/∂scale = Σ_t g_t ⊙ x̂_t`` from the captured input and output
    gradient, instead of vectorised per-example backward passes (the fallback for any other layer)."""

    def __init__(self, layer, scale):
        super().__init__(layer, scale, None)

    @staticmethod
    def owns(layer) -> bool:
        scale, cls = getattr(layer, "scale", None), type(layer)
        known = cls.__name__ in RMS_NORM_CLASSES or (
            cls.__name__ == "RMSNormalization" and cls.__module__.startswith("keras_hub.src.models.gemma"))
        return known and scale is not None and len(scale.shape) == 1 and hasattr(layer, "epsilon") and len(
            layer.weights) == 1

    def per_example(self, inputs, g, dtype, **_call_options):
        x = tf.cast(inputs, tf.float32)                  # as the layer computes x̂: in float32
        xhat = tf.cast(x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + self.layer.epsilon),
                       dtype)
        d = int(x.shape[-1])
        g = tf.reshape(tf.cast(g, dtype), [tf.shape(g)[0], -1, d])
        return [tf.reduce_sum(g * tf.reshape(xhat, [tf.shape(g)[0], -1, d]), axis=1)]


class _PositionBlock:
    """A learned position embedding (keras-hub's ``PositionEmbedding``: ``out[b, t] = E[start + t]``,
    or ``E[positions[b, t]]``): its per-example gradient is the output gradient placed at the rows of
    the positions it read — ``∂l_n/∂E[r] = Σ_{t: pos(t) = r} g_{n,t}`` — so it comes from the captured
    output gradient instead of per-example backward passes (diagonal curvature, like the norms)."""

    kind = "position"

    def __init__(self, layer, table):
        self.layer, self.name, self.table = layer, layer.name, table
        self.variables = [table]

    owns = staticmethod(is_position_embedding)

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
    and output gradient — ``LayerNormalization`` (last axis, no RMS scaling), keras-hub's RMS
    normalisations (:data:`RMS_NORM_CLASSES`: Llama, Mistral, Qwen, …) and learned position
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
        if _RMSNormBlock.owns(layer) and id(tf_variable(layer.scale)) in wanted:
            seen.add(id(layer))
            blocks.append(_RMSNormBlock(layer, layer.scale))
            covered.add(id(tf_variable(layer.scale)))
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

"""Per-example squared gradient norms without per-example gradients ("ghost norms"), from the
same captured layer inputs and output gradients as K-FAC."""

from __future__ import annotations


import tensorflow as tf

from .compiled import function
from .params import ParameterGroup
from .kfac.blocks import kronecker_blocks, norm_blocks
from .capture import captured_pass, norm_per_example, vectorized_gradients


def _mixed_gram(pairs, dtype):
    """``[B, T, T]`` inner products ``a_t·a_t'`` over the positions of all calls of a block, where some
    calls give token ids (one-hot rows: ``e_i·e_j = [i = j]``, ``e_i·s = s[i]``) and others dense rows."""
    rows = []
    for ai, _, ids_i in pairs:
        row = []
        for aj, _, ids_j in pairs:
            if ids_i and ids_j:
                m = tf.cast(tf.equal(ai[:, :, None], aj[:, None, :]), dtype)
            elif ids_i:                       # e_{token_p} · s_q = s_q[token_p]
                m = tf.transpose(tf.gather(tf.cast(aj, dtype), ai, axis=2, batch_dims=1), [0, 2, 1])
            elif ids_j:
                m = tf.gather(tf.cast(ai, dtype), aj, axis=2, batch_dims=1)
            else:
                m = tf.einsum("bpi,bqi->bpq", tf.cast(ai, dtype), tf.cast(aj, dtype))
            row.append(m)
        rows.append(tf.concat(row, axis=2))
    return tf.concat(rows, axis=1)


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
        self.fn = function(self._norms, reduce_retracing=True)

    @classmethod
    def get(cls, objective, group):
        from .compiled import cached_kernel
        return cached_kernel(objective, "ghost_norms", (group,), lambda: cls(objective, group))

    def _norms(self, x, y):
        parts, losses = self.segments(x, y)
        return tf.add_n(list(parts.values())) if parts else tf.zeros_like(losses)

    def segments(self, x, y):
        """``({segment: [B] squared norms}, losses)``: one entry per Kronecker block (its key) and per
        other variable (its path) — what :meth:`_norms` sums, and what the gradient index's budget is
        shared by (:func:`tf_influence.projection.calibrate`)."""
        obj = self.objective
        losses, records, grads, modes, options = captured_pass(obj, self.blocks + self.norms, x, y)
        out = {}
        for b in self.blocks:
            # a layer called several times in one forward pass: G_n sums over its calls
            sparse = [b.sparse_pairs(inp, gr, rev) for (inp, _), gr, rev in
                      zip(records[b.name], grads[b.name], modes[b.name])]
            mixed = b.kind == "tied" and any(p[2] for p in sparse) and not all(p[2] for p in sparse)
            positions = sum(int(p[0].shape[1]) if p[0].shape[1] is not None else -10 ** 9 for p in sparse)
            if mixed and 0 < positions and positions * positions <= b.rows * b.d_out:
                # a tied table's lookups (token ids) and output projections (logit gradients): the Gram of
                # the one-hot rows against the logit gradients is a gather, never a [B, P, vocab] one-hot
                g = tf.concat([tf.cast(p[1], losses.dtype) for p in sparse], axis=1)
                out[b.name] = tf.einsum("bpq,bpq->b", _mixed_gram(sparse, g.dtype),
                                        tf.einsum("bpo,bqo->bpq", g, g))
                continue
            pairs = [b.pairs(inp, gr, rev) for (inp, _), gr, rev in
                     zip(records[b.name], grads[b.name], modes[b.name])]
            a = tf.concat([p[0] for p in pairs], axis=1)
            g = tf.concat([tf.cast(p[1], losses.dtype) for p in pairs], axis=1)
            positions = a.shape[1]
            pairwise = positions is not None and positions * positions <= b.rows * b.d_out
            if b.kind == "embedding" and pairwise:
                same = tf.cast(tf.equal(a[:, :, None], a[:, None, :]), g.dtype)      # [B, P, P]
                out[b.name] = tf.einsum("bpq,bpq->b", same, tf.einsum("bpo,bqo->bpq", g, g))
            elif b.kind == "embedding":  # G_n row v = Σ_{t: token v} g_t: a segment sum per example
                n = tf.shape(a)[0]
                seg = tf.reshape(a + tf.range(n)[:, None] * b.rows, [-1])
                rows = tf.math.unsorted_segment_sum(tf.reshape(g, [-1, b.d_out]), seg, n * b.rows)
                out[b.name] = tf.reduce_sum(tf.reshape(tf.square(rows), [n, -1]), axis=1)
            else:
                a = tf.cast(a, g.dtype)
                if pairwise:
                    out[b.name] = tf.einsum("bpq,bpq->b", tf.einsum("bpi,bqi->bpq", a, a),
                                            tf.einsum("bpo,bqo->bpq", g, g))
                else:
                    out[b.name] = tf.reduce_sum(tf.square(tf.einsum("bpi,bpo->bio", a, g)), axis=[1, 2])
        # diagonal variables, per example: Σ over each variable of (Σ_t ...)², not summed over the batch
        for nb in self.norms:
            per = norm_per_example(nb, records[nb.name], grads[nb.name], losses.dtype, options.get(nb.name))
            for v, pe in zip(nb.variables, per):
                out[self.group.name_of(v)] = tf.reduce_sum(tf.reshape(tf.square(pe), [tf.shape(pe)[0], -1]), axis=1)
        if self.rest:
            for v, gv in zip(self.rest, vectorized_gradients(obj, self.rest, x, y)):
                gv = tf.cast(gv, losses.dtype)
                out[self.group.name_of(v)] = tf.reduce_sum(tf.reshape(tf.square(gv), [tf.shape(gv)[0], -1]), axis=1)
        return out, losses

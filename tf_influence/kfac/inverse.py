"""The damped inverse ``(F̂ + D + λ)⁻¹`` of fitted factors over a parameter group."""

from __future__ import annotations


import numpy as np
import tensorflow as tf

from ..params import ParameterGroup, ParameterGroupError, tf_variable
from .blocks import _l2, _owners, kronecker_blocks
from .factors import KFACFactors


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
            # an empty Q is the identity: a side kept diagonal (tokens, a vocabulary)
            QA = f["QA"] if np.size(f["QA"]) else None
            QS = f["QS"] if np.size(f["QS"]) else None
            projected = D if QA is None else (QA ** 2).T @ D
            projected = projected if QS is None else projected @ (QS ** 2)
            lam = damping + relative_damping * float(np.mean(f["eig"]))
            self._curvature.append(f["eig"] + projected)
            self.denominators[b.name] = tf.constant(f["eig"] + projected + lam)
            b.QA = None if QA is None else tf.constant(QA)
            b.QS = None if QS is None else tf.constant(QS)
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
            r = m if b.QA is None else tf.einsum("ra,kro->kao", b.QA, m)
            r = r if b.QS is None else tf.einsum("kao,oc->kac", r, b.QS)
            r = r / self.denominators[b.name]
            r = r if b.QS is None else tf.einsum("kac,oc->kao", r, b.QS)
            m = r if b.QA is None else tf.einsum("ra,kao->kro", b.QA, r)
            for i, piece in zip(idx, b.from_matrix(m)):
                out[i] = piece
        for i, v in enumerate(self.group.variables):
            key = id(tf_variable(v))
            if key in self.diag:
                out[i] = per_var[i] / self.diag[key]
        flat = tf.concat([tf.reshape(o, [tf.shape(o)[0], -1]) for o in out], axis=1)  # [k, p]
        res = tf.transpose(flat)
        return res[:, 0] if was_vector else res

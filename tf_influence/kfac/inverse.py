"""The damped inverse ``(F̂ + D + λ)⁻¹`` of fitted factors over a parameter group."""

from __future__ import annotations


import numpy as np
import tensorflow as tf

from ..params import ParameterGroup, ParameterGroupError, tf_variable
from .blocks import _l2, _owners, kronecker_blocks
from .factors import KFACFactors


#: Bytes of one block's columns transformed at a time by :meth:`KFACInverse.__call__` (at least one
#: column: a vocabulary-sized block's is ``[vocab, d]``, 154 MB at GPT-2 small in float32).
APPLY_CHUNK_BYTES = 256 << 20


# -- the inverse -----------------------------------------------------------------------------------
def regularizer_coefficients(model, group: ParameterGroup):
    """``(coefficients, unmodelled)``: per variable of the group the Hessian diagonal of its L2 penalty, one
    number (``2c`` for ``L2(c)`` / ``L1L2(0, c)``; 0 without one), and the layers whose penalty is not an L2."""
    owner = _owners(model)
    coefs, unmodelled = [], []
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
        coefs.append(2.0 * coef)
    return coefs, unmodelled


def regularizer_diagonal(model, group: ParameterGroup):
    """``(diag, unmodelled)``: :func:`regularizer_coefficients` as arrays shaped like the variables."""
    coefs, unmodelled = regularizer_coefficients(model, group)
    return [np.full(tf_variable(v).shape, c) for v, c in zip(group.variables, coefs)], unmodelled


def _one_value(parts) -> float | None:
    """The one number that every part of a block's extra diagonal ``D`` holds (numbers, or arrays shaped like the
    variables), or ``None`` where they hold more than one."""
    values = set()
    for p in parts:
        if np.isscalar(p):
            values.add(float(p))
        else:
            a = np.asarray(p)
            if a.size == 0:
                continue
            lo, hi = float(a.min()), float(a.max())
            if lo != hi:
                return None
            values.add(lo)
        if len(values) > 1:
            return None
    return values.pop() if values else 0.0


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
        # the extra diagonal D per variable: a number (an L2 penalty's 2c, or 0) or, with extra_diagonal, an
        # array — never a float64 copy of every parameter where D is constant (1 GB at GPT-2 small, held
        # through the solve); a block whose D is 0 adds nothing to its eigenvalues
        coefs, self.unmodelled = (regularizer_coefficients(model, group) if include_regularizers
                                  else ([0.0] * len(group.variables), []))
        extra = (group.unflatten(tf.cast(tf.reshape(extra_diagonal, [-1]), group.dtype))
                 if extra_diagonal is not None else None)

        def diag_part(i):
            """Variable ``i``'s D: a float, or an array shaped like the variable."""
            return coefs[i] if extra is None else extra[i].numpy() + coefs[i]

        def full(i, part):
            """``part`` (variable ``i``'s D) as an array shaped like the variable (a view for a number)."""
            return np.broadcast_to(np.asarray(part, np.float64), group.shapes[i])

        index = {id(tf_variable(v)): i for i, v in enumerate(group.variables)}
        self.denominators = {}
        self._curvature = []  # (min, max) of F̂ + D per block / diagonal variable, before the damping (spectrum())
        for b in self.blocks:
            f = factors.blocks[b.name]
            ids = [index[id(tf_variable(x))] for x in b.variables]
            parts = [diag_part(i) for i in ids]
            # an empty Q is the identity: a side kept diagonal (tokens, a vocabulary)
            QA = f["QA"] if np.size(f["QA"]) else None
            QS = f["QS"] if np.size(f["QS"]) else None
            lam = damping + relative_damping * float(np.mean(f["eig"]))
            same = _one_value(parts)
            if same is not None:
                # D = c on the whole block (0; an L2 penalty's 2c on a kernel without bias; case 2's 2α on W): its
                # projection (Q_A²)ᵀ D (Q_S²) is c, since the bases' columns have unit norm — no [rows, d_out]
                # products (at GPT-2 small case 2's 2α diagonal made them 9 of the 12 s this constructor took)
                curvature = np.array(f["eig"], copy=True)
                if same:
                    curvature += np.asarray(same, curvature.dtype)
            else:
                D = b.to_matrix([tf.constant(full(i, p)) for i, p in zip(ids, parts)]).numpy()
                projected = D if QA is None else (QA ** 2).T @ D
                projected = projected if QS is None else projected @ (QS ** 2)
                # in the eigenvalues' dtype (float32 factors of a float32 model: half the memory of float64)
                curvature = f["eig"] + np.asarray(projected, f["eig"].dtype)
                del D, projected
            self._curvature.append((float(np.min(curvature)), float(np.max(curvature))) if curvature.size else None)
            curvature += lam                               # in place: a vocabulary block's is [vocab, d]
            # numpy, not tensors: the factors' own arrays are used as they are (no second copy of every
            # eigenbasis — 1.2 GB at GPT-2 small); the products run in numpy's BLAS
            self.denominators[b.name] = curvature
            del curvature
            b.QA, b.QS = QA, QS
        self.diag = {}
        for i, v in enumerate(group.variables):
            path = getattr(v, "path", tf_variable(v).name)
            if path in factors.diagonal:
                d = factors.diagonal[path]
                lam = damping + relative_damping * float(np.mean(d))
                c = d + full(i, diag_part(i))
                self._curvature.append((float(np.min(c)), float(np.max(c))) if c.size else None)
                self.diag[id(tf_variable(v))] = c + lam
        self.index = index
        arrays = [a for b in self.blocks for a in (b.QA, b.QS) if a is not None] + list(self.denominators.values())
        self.dtype = np.float32 if arrays and all(a.dtype == np.float32 for a in arrays) else np.float64

    def spectrum(self) -> tuple:
        """``(smallest, largest)`` eigenvalue of the curvature this inverse inverts, ``F̂ + D`` without
        the damping (EK-FAC: corrected eigenvalues plus the diagonal's projection, per block)."""
        vals = [c[0] for c in self._curvature if c is not None] or [0.0]
        highs = [c[1] for c in self._curvature if c is not None] or [0.0]
        return min(vals), max(highs)

    def __call__(self, V):
        """``(F̂ + D + λ)⁻¹ V`` for ``V`` ``[p]`` or ``[p, k]``, in TensorFlow, one block at a time: each
        block's slice of the columns (a few columns at a time, :data:`APPLY_CHUNK_BYTES`), its eigenbases and
        denominators become tensors only while that block is transformed, and the result is assembled from the
        blocks' parts. Everything it allocates is TensorFlow memory that the factor passes before it already
        reserved — TensorFlow's default CPU allocator keeps what it freed and reuses it — rather than host
        memory on top of it (a numpy version of this loop, with one host copy of the columns, added 1.1 GB to
        the peak of multi-stage influence at GPT-2 small). In the factors' precision: float32 factors (a
        float32 model's, :meth:`FactorStatistics.add`) apply in float32 — their eigenvectors hold no more —
        and float64 factors in float64."""
        dtype = tf.float32 if self.dtype == np.float32 else tf.float64
        V = tf.cast(tf.convert_to_tensor(V), dtype)
        was_vector = V.shape.rank == 1
        M = V[:, None] if was_vector else V                         # [p, k]
        k = int(M.shape[1])
        offsets = np.concatenate([[0], np.cumsum(self.group.sizes)]).astype(np.int64)
        parts = [None] * len(self.group.variables)

        def piece(i, j0, j1):                                       # variable i's columns j0:j1 as [c, *shape]
            return tf.reshape(tf.transpose(M[offsets[i]:offsets[i + 1], j0:j1]),
                              [j1 - j0] + list(self.group.shapes[i]))

        for b in self.blocks:
            idx = [self.index[id(tf_variable(x))] for x in b.variables]
            den_np = self.denominators[b.name]
            step = max(1, int(APPLY_CHUNK_BYTES // max(1, den_np.size * den_np.itemsize)))
            QA = None if b.QA is None else tf.constant(b.QA, dtype)
            QS = None if b.QS is None else tf.constant(b.QS, dtype)
            den = tf.constant(den_np, dtype)
            chunks = {i: [] for i in idx}
            for j0 in range(0, k, step):
                j1 = min(k, j0 + step)
                m = b.to_matrix([piece(i, j0, j1) for i in idx])              # [c, rows, d_out]
                r = m if QA is None else tf.linalg.matmul(QA, m, transpose_a=True)   # Q_Aᵀ M Q_S, per column
                r = r if QS is None else tf.linalg.matmul(r, QS)
                r = r / den
                r = r if QS is None else tf.linalg.matmul(r, QS, transpose_b=True)
                m = r if QA is None else tf.linalg.matmul(QA, r)
                del r
                for i, part in zip(idx, b.from_matrix(m)):
                    chunks[i].append(tf.transpose(tf.reshape(part, [j1 - j0, -1])))
                del m
            for i in idx:
                parts[i] = chunks[i][0] if len(chunks[i]) == 1 else tf.concat(chunks[i], axis=1)
            del QA, QS, den, chunks
        for i, v in enumerate(self.group.variables):
            if parts[i] is not None:
                continue
            key = id(tf_variable(v))
            rows = M[offsets[i]:offsets[i + 1]]
            if key in self.diag:                                    # a variable kept diagonal; the others no
                d = tf.constant(np.reshape(np.asarray(self.diag[key]), [-1, 1]), dtype)   # block covers: as given
                rows = rows / d
            parts[i] = rows
        out = tf.concat(parts, axis=0) if len(parts) > 1 else parts[0]
        del parts
        return out[:, 0] if was_vector else out

"""The two dense products the factor passes spend their time on, written the way TensorFlow's CPU kernels
(oneDNN) run them fastest: a covariance ``Σ_{b,p} x_{bp} x_{bpᵀ}`` (:func:`token_gram`) and a rotation of every
token by one matrix (:func:`token_matmul`).

Both were ``tf.einsum`` calls (``"bpi,bpj->ij"``, ``"bpo,oc->bpc"``). TensorFlow lowers those to batched
matrix products that re-read the ``[d, d]`` operand once per example; at the MLP's width of GPT-2 small and
BERT base (3,072) that made a batch of 8 × 128 tokens' rotation 268 ms instead of 93 ms as one
``[B·P, d] @ [d, d]`` product, and its covariance 234 ms instead of 92 ms as the tiled product below
(``python -m benchmarks.products``; ``docs/results/products.json``). The values are the same products
(each entry is the same dot product over the tokens); only the order TensorFlow's kernels sum in differs.

>>> import numpy as np, tensorflow as tf
>>> x = tf.random.stateless_normal([2, 3, 600], seed=[0, 1])
>>> ref = tf.einsum("bpi,bpj->ij", x, x)
>>> bool(np.allclose(token_gram(x), ref, atol=1e-4)), token_gram(x).shape
(True, TensorShape([600, 600]))
>>> Q = tf.random.stateless_normal([600, 5], seed=[2, 3])
>>> bool(np.allclose(token_matmul(x, Q), tf.einsum("bpo,oc->bpc", x, Q), atol=1e-4))
True
"""

from __future__ import annotations

import tensorflow as tf

#: Column block of :func:`token_gram`: a side of at least twice this many columns is multiplied as the upper
#: triangle of its ``[block, block]`` tiles (the lower triangle mirrored), which skips almost half the work and
#: runs at a better rate than one ``[d, d]`` product on this project's 2-core machine (of tiles of 256 / 384 / 512,
#: 256 were the fastest at widths 768 – 2,048 and 9 % slower than 512 at 3,072: ``benchmarks/products.py``).
GRAM_BLOCK = 256


def _tiles(d: int, block: int) -> list[int]:
    """``d`` columns as ``round(d / block)`` nearly equal tiles (the first ones one column longer)."""
    k = max(1, round(d / block))
    base, extra = divmod(d, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _tokens(x):
    """``x: [..., d]`` as ``[tokens, d]`` (the static width where it is known)."""
    d = x.shape[-1]
    return tf.reshape(x, [-1, tf.shape(x)[-1] if d is None else d])


def token_gram(x, block: int | None = None):
    """``Σ_{b,p} x[b, p] x[b, p]ᵀ`` of ``x: [..., d]`` (every leading axis summed) as a ``[d, d]`` matrix,
    exactly symmetric: tiles ``i ≤ j`` of about ``[block, block]`` (default :data:`GRAM_BLOCK`) are computed,
    the diagonal ones symmetrised and the ones below the diagonal their transposes. A side narrower than
    ``2 × block`` (or of unknown width) is one product."""
    block = GRAM_BLOCK if block is None else int(block)
    d = x.shape[-1]
    flat = _tokens(x)
    if d is None or d < 2 * block:
        return tf.matmul(flat, flat, transpose_a=True)
    parts = tf.split(flat, _tiles(d, block), axis=1)
    k = len(parts)
    upper = {(i, j): tf.matmul(parts[i], parts[j], transpose_a=True) for i in range(k) for j in range(i, k)}
    for i in range(k):              # a diagonal tile is a full product: its two triangles may differ in the last bit
        upper[i, i] = 0.5 * (upper[i, i] + tf.transpose(upper[i, i]))
    return tf.concat([tf.concat([upper[i, j] if i <= j else tf.transpose(upper[j, i]) for j in range(k)], axis=1)
                      for i in range(k)], axis=0)


def token_matmul(x, m):
    """``x @ m`` for ``x: [..., d]`` and ``m: [d, c]`` as one ``[tokens, d] @ [d, c]`` product (``tf.einsum``'s
    ``"bpo,oc->bpc"`` re-reads ``m`` once per leading index)."""
    return tf.reshape(tf.matmul(_tokens(x), m), tf.concat([tf.shape(x)[:-1], tf.shape(m)[-1:]], axis=0))


__all__ = ["GRAM_BLOCK", "token_gram", "token_matmul"]

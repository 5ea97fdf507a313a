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

import functools

import numpy as np
import tensorflow as tf

#: Column block of :func:`token_gram`: a side of at least twice this many columns is multiplied as the upper
#: triangle of its ``[block, block]`` tiles (the lower triangle mirrored), which skips almost half the work and
#: runs at a better rate than one ``[d, d]`` product on this project's 2-core machine. Of tiles of 256 / 384 / 512
#: columns (``benchmarks/products.py``, float32 and bfloat16): on GPT-2 small's and BERT base's 3,072-wide sides in
#: bfloat16 (how ``product_dtype="auto"`` runs them on AMX) 384 and 512 took 46 ms and 256 took 53; on the 768-wide
#: sides, which ``"auto"`` keeps in float32, 256 took 6.4 ms, 384 7.2 and 512 (one product) 8.1. 384 gives the
#: smallest sum over GPT-2 small's sides with half the graph operations of 256: a compiled covariance step's trace
#: and first call (graph optimisation) grow with its operations, and at GPT-2 small they cost seconds of each fit.
GRAM_BLOCK = 384


def _tiles(d: int, block: int) -> list[int]:
    """``d`` columns as ``round(d / block)`` nearly equal tiles (the first ones one column longer)."""
    k = max(1, round(d / block))
    base, extra = divmod(d, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _tokens(x):
    """``x: [..., d]`` as ``[tokens, d]`` (the static width where it is known)."""
    d = x.shape[-1]
    return tf.reshape(x, [-1, tf.shape(x)[-1] if d is None else d])


def gram_tiles(d: int | None, block: int | None = None) -> list:
    """The column tiles :func:`token_gram` splits a side of ``d`` columns into: ``[d]`` (one product) for a side
    narrower than ``2 × block`` (default :data:`GRAM_BLOCK`) or of unknown width, else :func:`_tiles`.

    >>> gram_tiles(3072), gram_tiles(700), gram_tiles(None)
    ([384, 384, 384, 384, 384, 384, 384, 384], [700], [None])
    """
    block = GRAM_BLOCK if block is None else int(block)
    return [d] if d is None or d < 2 * block else _tiles(d, block)


def upper_tiles(sizes) -> dict:
    """``{(i, j): (rows, columns)}`` of the tiles ``i ≤ j`` of a ``[d, d]`` matrix cut at column tiles ``sizes``
    (:func:`gram_tiles`), in row-major order: the tiles :func:`token_gram` computes and a running sum keeps.

    >>> upper_tiles([3, 2])
    {(0, 0): (3, 3), (0, 1): (3, 2), (1, 1): (2, 2)}
    """
    k = len(sizes)
    return {(i, j): (sizes[i], sizes[j]) for i in range(k) for j in range(i, k)}


def _upper_products(flat, sizes) -> dict:
    """``{(i, j): parts[i]ᵀ parts[j]}`` for ``i ≤ j`` of ``flat: [tokens, d]`` split into column tiles ``sizes``."""
    parts = tf.split(flat, sizes, axis=1) if len(sizes) > 1 else [flat]
    return {(i, j): tf.matmul(parts[i], parts[j], transpose_a=True) for i, j in upper_tiles(sizes)}


def token_gram(x, block: int | None = None, dtype=None):
    """``Σ_{b,p} x[b, p] x[b, p]ᵀ`` of ``x: [..., d]`` (every leading axis summed) as a ``[d, d]`` matrix,
    exactly symmetric: tiles ``i ≤ j`` of about ``[block, block]`` (default :data:`GRAM_BLOCK`) are computed,
    the diagonal ones symmetrised and the ones below the diagonal their transposes. A side narrower than
    ``2 × block`` (or of unknown width) is one product. ``dtype``: multiply in this dtype (``tf.bfloat16``:
    :func:`product_dtype`) and return ``x``'s."""
    out = x.dtype
    if dtype is not None and tf.as_dtype(dtype) != out:
        return tf.cast(token_gram(tf.cast(x, dtype), block), out)
    flat = _tokens(x)
    sizes = gram_tiles(x.shape[-1], block)
    if len(sizes) == 1:
        return tf.matmul(flat, flat, transpose_a=True)
    upper, k = _upper_products(flat, sizes), len(sizes)
    for i in range(k):              # a diagonal tile is a full product: its two triangles may differ in the last bit
        upper[i, i] = 0.5 * (upper[i, i] + tf.transpose(upper[i, i]))
    return tf.concat([tf.concat([upper[i, j] if i <= j else tf.transpose(upper[j, i]) for j in range(k)], axis=1)
                      for i in range(k)], axis=0)


def token_gram_upper(x, sizes, dtype=None) -> dict:
    """The tiles ``i ≤ j`` of :func:`token_gram` before it completes them — ``{(i, j): Σ x[..., tile i]ᵀ x[..., tile
    j]}`` for column tiles ``sizes`` (:func:`gram_tiles`), the diagonal ones as computed (not symmetrised) — in
    ``x``'s dtype (``dtype``: multiplied in it). What a running sum over batches adds up: it holds and adds only
    these (56 % of a ``[3072, 3072]`` side in tiles of 384), and :func:`gram_from_upper` completes the sum once,
    where :func:`token_gram` mirrors and concatenates every batch's whole matrix.

    >>> x = tf.random.stateless_normal([2, 3, 800], seed=[0, 1])
    >>> tiles = token_gram_upper(x, gram_tiles(800))
    >>> sorted(tiles), tuple(tiles[0, 1].shape)
    ([(0, 0), (0, 1), (1, 1)], (400, 400))
    >>> full = gram_from_upper({k: v.numpy() for k, v in tiles.items()}, gram_tiles(800))
    >>> bool(np.allclose(full, token_gram(x).numpy(), atol=1e-4))
    True
    """
    out = x.dtype
    low = None if dtype is None or tf.as_dtype(dtype) == out else tf.as_dtype(dtype)
    flat = _tokens(x if low is None else tf.cast(x, low))
    tiles = _upper_products(flat, list(sizes))
    return tiles if low is None else {k: tf.cast(t, out) for k, t in tiles.items()}


def gram_from_upper(tiles, sizes, read=None):
    """The ``[d, d]`` NumPy matrix whose tiles ``i ≤ j`` are ``tiles[i, j]`` (sums of :func:`token_gram_upper`):
    each diagonal tile symmetrised, the tiles below the diagonal the transposes of those above — what
    :func:`token_gram` makes of each batch, made once of the sum. ``read``: how one tile becomes an array
    (default ``numpy.asarray``; a running sum's reader can empty its variable as it goes)."""
    read = read or np.asarray
    offsets = np.cumsum([0] + list(sizes))
    out = None
    for (i, j) in sorted(tiles):
        t = read(tiles[i, j])
        if out is None:
            out = np.empty((offsets[-1], offsets[-1]), t.dtype)
        ri, rj = slice(offsets[i], offsets[i + 1]), slice(offsets[j], offsets[j + 1])
        if i == j:
            out[ri, ri] = 0.5 * (t + t.T)
        else:
            out[ri, rj] = t
            out[rj, ri] = t.T
    return out


def token_matmul(x, m, dtype=None, cast_back: bool = True):
    """``x @ m`` for ``x: [..., d]`` and ``m: [d, c]`` as one ``[tokens, d] @ [d, c]`` product (``tf.einsum``'s
    ``"bpo,oc->bpc"`` re-reads ``m`` once per leading index). ``dtype``: multiply in this dtype and return
    ``x``'s — or, ``cast_back=False``, the product in ``dtype`` as it is (for a caller whose next product is in
    ``dtype`` too: casting to ``x``'s dtype and back is exact, and two passes over the tokens for nothing)."""
    if dtype is not None and tf.as_dtype(dtype) != x.dtype:
        out = token_matmul(tf.cast(x, dtype), tf.cast(m, dtype))
        return tf.cast(out, x.dtype) if cast_back else out
    return tf.reshape(tf.matmul(_tokens(x), m), tf.concat([tf.shape(x)[:-1], tf.shape(m)[-1:]], axis=0))


#: The choices of ``product_dtype`` (:func:`~tf_influence.kfac.fit_factors`, ``FactorArgs``, ``KroneckerOptions``):
#: ``"model"`` multiplies every side in the model's own dtype (float32 or float64), ``"bfloat16"`` every dense side
#: of a float32 model in bfloat16, ``"auto"`` (the default) the products with a side of at least
#: :data:`BFLOAT16_MIN` columns of a float32 model in bfloat16 where the hardware does so natively
#: (:func:`native_bfloat16`).
PRODUCT_DTYPES = ("model", "bfloat16", "auto")

#: The default ``product_dtype`` of every function, configuration and component that takes one.
DEFAULT_PRODUCT_DTYPE = "auto"

#: The help of the ``product_dtype`` fields (``FactorArgs``, ``KroneckerOptions``) and flags.
PRODUCT_DTYPE_HELP = ("dtype of the fit's large per-batch products: 'auto' (bfloat16 for the products with a side of "
                      "≥ 1,024 columns, a vocabulary's included, where the hardware multiplies bfloat16 natively; else "
                      "the model's dtype), 'bfloat16' (every dense factor side of a float32 model) or 'model' (the "
                      "model's dtype)")

#: ``product_dtype="auto"``: a dense factor side of at least this many columns is multiplied in bfloat16, and so are
#: the per-example gradients of a block with such a side (the same width from which
#: :func:`~tf_influence.kfac.statistics.eigenbases` decomposes in float32); narrower ones cost little either way
#: and keep the model's precision — the small models the exact tests check are fitted as before.
BFLOAT16_MIN = 1024


def check_product_dtype(value: str, owner: str = "product_dtype") -> str:
    """``value`` if it is one of :data:`PRODUCT_DTYPES`, else a ``ValueError`` naming ``owner``."""
    if value not in PRODUCT_DTYPES:
        raise ValueError(f"{owner} must be one of {PRODUCT_DTYPES}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def native_bfloat16() -> bool:
    """Whether TensorFlow multiplies bfloat16 in hardware here: a visible GPU of compute capability 8.0 or
    more, or (no GPU) a CPU with AMX-BF16 or AVX512-BF16 and TensorFlow's oneDNN kernels on (not
    ``TF_ENABLE_ONEDNN_OPTS=0``). Elsewhere a bfloat16 product is emulated and slower than float32."""
    import os
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        try:
            cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") or (0, 0)
        except Exception:                              # pragma: no cover - a driver without details
            return False
        return tuple(cc) >= (8, 0)
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") == "0":
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def product_dtype(requested: str, width: int, compute, native: bool | None = None):
    """The dtype the factor passes multiply a dense side of ``width`` columns in: ``tf.bfloat16``, or ``None``
    for the compute dtype (``compute``: the model's float32 or float64). ``requested`` is one of
    :data:`PRODUCT_DTYPES`; ``native``: :func:`native_bfloat16` when None.

    >>> product_dtype("auto", 3072, tf.float32, native=True), product_dtype("auto", 768, tf.float32, native=True)
    (tf.bfloat16, None)
    >>> product_dtype("auto", 3072, tf.float32, native=False), product_dtype("bfloat16", 8, tf.float32)
    (None, tf.bfloat16)
    """
    check_product_dtype(requested)
    if requested == "model" or tf.as_dtype(compute) != tf.float32:
        return None
    if requested == "bfloat16":
        return tf.bfloat16
    if width < BFLOAT16_MIN:
        return None
    return tf.bfloat16 if (native_bfloat16() if native is None else native) else None


__all__ = ["BFLOAT16_MIN", "DEFAULT_PRODUCT_DTYPE", "GRAM_BLOCK", "PRODUCT_DTYPES", "PRODUCT_DTYPE_HELP", "check_product_dtype", "gram_from_upper", "gram_tiles",
           "native_bfloat16", "product_dtype", "token_gram", "token_gram_upper", "token_matmul", "upper_tiles"]

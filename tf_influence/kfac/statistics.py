"""The two streaming passes that fit the factors (covariances, then the eigenvalue correction):
:class:`FactorStatistics` (mergeable, for Beam / Dask / ``tf.distribute``) and :func:`fit_factors`."""

from __future__ import annotations


import keras
import numpy as np
import tensorflow as tf

from ..compiled import function
from ..objective import batches, check_dataset, finite_check, reduce_per_example
from ..params import ParameterGroup, tf_variable
from .blocks import kronecker_blocks, norm_blocks
from ..capture import Capture, diagonal_squares, output_gradients
from .factors import FISHERS, KFACFactors, KINDS
from .products import (DEFAULT_PRODUCT_DTYPE, check_product_dtype, gram_from_upper, gram_tiles,
                       product_dtype as resolve_product_dtype, token_gram, token_gram_upper, token_matmul,
                       upper_tiles)


def _sample_labels(loss, y_pred, y, fisher: str, seed):
    if fisher == "empirical":
        return y
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    from ..lm import CausalLMLoss
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


#: Largest factor side (rows of ``A``, or ``d_out`` of ``S``) kept as a dense covariance with a dense
#: eigendecomposition; a larger side — a vocabulary: GPT-2's 50,257-token tied table, BERT's or Llama's
#: ``Dense(vocab)`` head — is kept diagonal (``docs/guides/ekfac.md``). A ``[4096, 4096]`` float64 factor is
#: 128 MB and its ``eigh`` takes seconds; GPT-2's would be 20 GB and 10¹⁴ flops.
DENSE_FACTOR_MAX = 4096

def dense_factor_limit(configured: int | None) -> int:
    """A configuration's ``dense_factor_max`` (``SolverConfig``'s ``kronecker`` options, ``FactorArgs``) as
    :class:`FactorStatistics` takes it: ``None`` there is the default, :data:`DENSE_FACTOR_MAX` (in
    :class:`FactorStatistics` itself ``None`` keeps every side dense).

    >>> dense_factor_limit(None) == DENSE_FACTOR_MAX, dense_factor_limit(512)
    (True, 512)
    """
    return DENSE_FACTOR_MAX if configured is None else configured


#: One step of a factor fit holds at most about this many bytes of per-batch products (captured activations,
#: output gradients, per-example ``G_n``; :func:`tf_influence.memory.factor_microbatch`): a larger batch is
#: split into microbatches. TensorFlow's default CPU allocator keeps its high-water mark, so a pass's
#: per-batch memory stays resident through the rest of the process. The split costs time (GPT-2 small,
#: 48 sequences of 128 tokens: microbatches of 3 instead of batches of 8 took 299 s instead of 242 s and
#: peaked at 7.8 GB instead of 8.6 GB), so the limit is set where a batch of 8 such sequences (2.5 GB in
#: the correction pass) is not split and a batch of 32 (9 GB) is.
FACTOR_BATCH_BYTES = 3 << 30

#: Blocks whose one-example ``G_n`` has at most this many entries get their EK-FAC correction from a
#: batch of ``G_n`` at once; larger ones (vocabulary-sized) one example at a time.
PER_EXAMPLE_BATCHED_MAX = 1 << 21


def _token_rows(ids, gq, rows):
    """``[B, rows, d]``: per example, ``Σ_{t: token v} gq_t`` in row ``v`` (small ``rows`` only)."""
    n = tf.shape(ids)[0]
    seg = tf.reshape(tf.cast(ids, tf.int32) + tf.range(n)[:, None] * rows, [-1])
    d = tf.shape(gq)[-1]
    out = tf.math.unsorted_segment_sum(tf.reshape(gq, [-1, d]), seg, n * rows)
    return tf.reshape(out, [n, rows, d])


def _token_rows_squared(ids, gq, rows, dtype):
    """``Σ_n (G_n)²`` for token lookups, ``G_n`` row ``v`` = ``Σ_{t: token v} gq_t``: only the
    (example, token) pairs present in the batch have non-zero rows — sum over those (≤ B·P of them,
    not B·vocabulary), square, then add up by token."""
    d = tf.shape(gq)[-1]
    n = tf.shape(ids)[0]
    pairs = tf.reshape(tf.cast(ids, tf.int64) + tf.range(tf.cast(n, tf.int64))[:, None] * rows, [-1])
    present, idx = tf.unique(pairs)
    summed = tf.math.unsorted_segment_sum(tf.reshape(gq, [-1, d]), idx, tf.size(present))
    token = tf.cast(present % rows, tf.int32)
    return tf.cast(tf.math.unsorted_segment_sum(tf.square(summed), token, rows), dtype)


def _upper_tiles_of(M, sizes) -> dict:
    """The tiles ``i ≤ j`` of a whole ``[d, d]`` matrix ``M`` cut at column tiles ``sizes``."""
    offsets = np.cumsum([0] + list(sizes))
    return {(i, j): M[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]] for i, j in upper_tiles(sizes)}


def _basis_tensor(Q, compute, dtype):
    """An eigenbasis as a tensor in ``dtype``, converted through the compute dtype (as a cast inside the step
    would: the same values)."""
    t = tf.constant(np.asarray(Q), compute)
    return t if dtype == compute else tf.cast(t, dtype)


class _Tiles:
    """A dense side's running sum in :meth:`FactorStatistics.add`: one variable per upper tile."""

    def __init__(self, sizes, tiles: dict):
        self.sizes, self.tiles = list(sizes), tiles


# -- the factors ---------------------------------------------------------------------------------

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
                 seed: int = 0, strategy=None, dense_factor_max: int | None = DENSE_FACTOR_MAX,
                 product_dtype: str = DEFAULT_PRODUCT_DTYPE):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got '{fisher}'")
        if dense_factor_max is not None and int(dense_factor_max) < 1:
            raise ValueError(f"dense_factor_max must be ≥ 1 or None, got {dense_factor_max}")
        self.objective, self.group, self.kind, self.fisher = objective, group, kind, fisher
        self.seed, self.strategy = int(seed), strategy
        self.dense_factor_max = dense_factor_max
        self.blocks, self.diag_vars = kronecker_blocks(objective.model, group)
        for b in self.blocks:
            b.set_sides(dense_factor_max)
        self.norms, self.rest = norm_blocks(objective.model, self.diag_vars)
        # per-batch products in the model's precision (float32 models: 2–4× faster einsums on the
        # big layers), sums accumulated in float64
        self.compute = tf.float64 if group.dtype == tf.float64 else tf.float32
        self.product_dtype = check_product_dtype(product_dtype)
        self._stats = function(self._stats_fn, reduce_retracing=True)
        self._correction = function(self._correction_fn, reduce_retracing=True)

    def low_dtype(self, width: int):
        """The dtype a dense side of ``width`` columns is multiplied in (``tf.bfloat16``), or None for the
        compute dtype (:func:`~tf_influence.kfac.products.product_dtype`)."""
        return resolve_product_dtype(self.product_dtype, int(width), self.compute)

    def basis_dtype(self, b, side: str):
        """The dtype block ``b``'s eigenbasis of ``side`` (``"A"`` or ``"S"``) is held in for the correction pass: the
        dtype that side multiplies in (:meth:`low_dtype`, else the compute dtype) — except a lookup-only
        ``Embedding``'s ``Q_A``, whose rows enter its per-example sums in the compute dtype."""
        if side == "A" and b.kind == "embedding":
            return self.compute
        return self.low_dtype(b.rows if side == "A" else b.d_out) or self.compute

    def per_example_dtype(self, b):
        """The dtype block ``b``'s correction forms its per-example ``G_n`` in: ``tf.bfloat16`` by its larger side
        (a vocabulary block's ``[rows, d_out]`` products of one example each are GPT-2 small's dearest: its
        vocabulary side is diagonal, but 50,257 rows × 128 tokens × 768 per example), or None for the compute dtype
        — always for a lookup-only ``Embedding``, which sums its rows' squares with no product."""
        return None if b.kind == "embedding" else self.low_dtype(max(b.rows, b.d_out))

    def products(self) -> dict:
        """``{block: {"in", "out", "per_example"}}``: the dtype name of each dense side's covariance and rotation
        (a diagonal side is a sum of squares in the compute dtype) and of the correction's per-example gradients in
        the eigenbasis (:meth:`per_example_dtype`): what ``product_dtype`` resolved to here."""
        name = lambda diag, w: self.compute.name if diag or self.low_dtype(w) is None else "bfloat16"  # noqa: E731
        return {b.name: {"in": name(b.diag_in, b.rows), "out": name(b.diag_out, b.d_out),
                         "per_example": "bfloat16" if self.per_example_dtype(b) is not None else self.compute.name}
                for b in self.blocks}

    def sides(self) -> dict:
        """``{block: {"in": "dense" | "diagonal", "out": …, "rows", "d_out"}}``: how each factor side is kept."""
        return {b.name: {"in": "diagonal" if b.diag_in else "dense", "out": "diagonal" if b.diag_out else "dense",
                         "rows": b.rows, "d_out": b.d_out} for b in self.blocks}

    # -- compiled per-batch kernels ---------------------------------------------------------------
    def _forward(self, x, y, step, with_norms=False):
        """Kronecker blocks' ``(activations, output gradients, ids)`` per call (``ids``: the
        activations are token ids, :meth:`_Block.sparse_pairs`), the sampled labels, and
        (``with_norms``) the captured ``LayerNormalization`` records with their output gradients."""
        model, objective = self.objective.model, self.objective
        layers = self.blocks + (self.norms if with_norms else [])
        cap = Capture(layers)
        with cap, tf.GradientTape() as tape:
            y_pred = model(x, training=False)
            ys = _sample_labels(objective.loss, y_pred, y, self.fisher, tf.stack([tf.constant(self.seed, tf.int64),
                                                                                  tf.cast(step, tf.int64)]))
            losses = reduce_per_example(objective.loss_fn(ys, y_pred))
            total = tf.reduce_sum(losses)
        grads = output_gradients(tape, total, cap, layers)
        records, modes = cap.records, cap.modes
        res, shared = {}, {}
        for b in self.blocks:
            res[b.name] = []
            key = b.activation_key()
            for (inp, _), g, rev in zip(records[b.name], grads[b.name], modes[b.name]):
                # layers called on one tensor (query / key / value) get the same activations tensor: the
                # passes compute its covariance and its rotation once (keyed by the tensor's identity)
                if key is not None and (id(inp), key) in shared:
                    a, gg, ids = shared[id(inp), key], b.out_grads(g), False
                else:
                    a, gg, ids = b.sparse_pairs(inp, g, rev)
                    if key is not None:
                        shared[id(inp), key] = a
                res[b.name].append((a, tf.cast(gg, self.compute), ids))
        if with_norms:
            return res, ys, (records, grads, cap.options)
        return res, ys

    def _stats_fn(self, x, y, step, sums_dtype=tf.float64, tiled: bool = False):
        """One batch's pass-1 sums: the blocks' ``(Σ aaᵀ, Σ ggᵀ, tokens)`` with the covariances in
        ``sums_dtype`` (float64 for the per-batch API, which Beam and ``tf.distribute`` sum across workers;
        the compute dtype for :meth:`add`'s in-graph running sums), token counts and the diagonal in float64.
        ``tiled`` (:meth:`add`): each dense covariance as its upper tiles ``{(i, j): …}``
        (:func:`~tf_influence.kfac.products.token_gram_upper`, tiles :func:`~tf_influence.kfac.products.gram_tiles`), which the running
        sums add up and :meth:`take` completes once — not as every batch's whole symmetric matrix."""
        dtype = tf.float64
        res, ys, (records, layer_grads, options) = self._forward(x, y, step, with_norms=True)
        out, covariances = {}, {}

        def gram(t, width):
            if tiled:
                return token_gram_upper(t, gram_tiles(width), dtype=self.low_dtype(width))
            return token_gram(t, dtype=self.low_dtype(width))

        def add(total, part, width, dt):
            """``total + part`` (``None``: nothing yet) of dense sides, whole or as tiles."""
            if tiled and not isinstance(part, dict):          # a whole matrix (token counts' diagonal): its tiles
                part = _upper_tiles_of(part, gram_tiles(width))
            if isinstance(part, dict):
                part = {k: tf.cast(t, dt) for k, t in part.items()}
                return part if total is None else {k: total[k] + part[k] for k in part}
            part = tf.cast(part, dt)
            return part if total is None else total + part

        for b in self.blocks:
            # a diagonal side (token counts, a vocabulary) is a vector: kept in float64 whatever sums_dtype
            A = tf.zeros([b.rows], dtype) if b.diag_in else None
            S = tf.zeros([b.d_out], dtype) if b.diag_out else None
            tokens = tf.constant(0.0, dtype)
            for a, g, ids in res[b.name]:
                if ids:   # one-hot tokens: Σ_t e_t e_tᵀ is the diagonal of token counts
                    flat = tf.reshape(a, [-1])
                    counts = tf.math.unsorted_segment_sum(tf.ones_like(flat, dtype), flat, b.rows)
                    A = A + counts if b.diag_in else add(A, tf.linalg.diag(counts), b.rows, sums_dtype)
                else:             # one product per activations tensor, however many blocks read it
                    key = (id(a), b.diag_in)
                    if key not in covariances:
                        c = tf.cast(a, self.compute)
                        covariances[key] = (tf.reduce_sum(tf.square(c), axis=[0, 1]) if b.diag_in
                                             else gram(c, b.rows))
                    A = A + tf.cast(covariances[key], dtype) if b.diag_in else add(A, covariances[key], b.rows,
                                                                                   sums_dtype)
                tokens += tf.cast(tf.shape(g)[0] * tf.shape(g)[1], dtype)
                if b.diag_out:
                    S += tf.cast(tf.reduce_sum(tf.square(g), axis=[0, 1]), dtype)
                else:
                    S = add(S, gram(g, b.d_out), b.d_out, sums_dtype)
            # a block its loss never calls: zeros
            A = A if A is not None else self._dense_zeros(b.rows, sums_dtype, tiled)
            S = S if S is not None else self._dense_zeros(b.d_out, sums_dtype, tiled)
            out[b.name] = (A, S, tokens)
        sq = diagonal_squares(self.objective, self.norms, records, layer_grads, self.rest, x, ys, dtype, options)
        diag = [sq[id(tf_variable(v))] for v in self.diag_vars]
        return out, diag, tf.cast(tf.shape(tf.nest.flatten(y)[0])[0], dtype)

    def _dense_zeros(self, width: int, dtype, tiled: bool):
        if not tiled:
            return tf.zeros([width, width], dtype)
        return {k: tf.zeros(shape, dtype) for k, shape in upper_tiles(gram_tiles(width)).items()}

    def _correction_fn(self, x, y, step, bases, dtype=tf.float64):
        """``{block: Σ_n ((Q_Aᵀ G_n Q_S)_ij)²}`` of the batch in ``dtype`` (see :meth:`_stats_fn`). The blocks are
        independent ops that TensorFlow's executor runs side by side; making each wait on the previous one (to
        hold one block's per-example ``G_n`` at a time) left the peak unchanged and made a 100 M Llama's
        correction steps slower (5.4–5.5 s against 4.2–4.6 s in runs of the same hour), so it was reverted."""
        res, _ = self._forward(x, y, step)
        rotated = {}
        return {b.name: self._block_correction(b, res[b.name], bases, dtype, rotated) for b in self.blocks}

    def _block_correction(self, b, calls, bases, dtype=tf.float64, rotated=None):
        """``bases[b.name]``: ``(Q_A, Q_S)``, with ``Q_A`` the name of another block where the two share one
        (:meth:`_bases_as_tensors`); ``rotated`` caches ``a Q_A`` per activations tensor and basis."""
        owner = bases[b.name][0] if isinstance(bases[b.name][0], str) else b.name
        # the bases come in the dtype each side is multiplied in (_bases_as_tensors), and the rotations stay in it
        # (token_matmul's cast_back=False): the per-example products below multiply in that dtype too (a side in
        # bfloat16 makes the block's per_example_dtype bfloat16), and the casts there are then no-ops — each step
        # cast every Q to bfloat16, and every rotation to float32 and back, for the same values
        QA, QS = (None if side else q for side, q in zip((b.diag_in, b.diag_out), (bases[owner][0], bases[b.name][1])))
        rotated = {} if rotated is None else rotated
        if not calls:             # a block the loss never calls: no gradient, zero eigenvalues
            return tf.zeros([b.rows, b.d_out], dtype)
        # G_n sums over every call of the layer in the forward pass (a tied ReversibleEmbedding:
        # its lookup and its output projection): the calls are summed per example before the
        # square — squaring per call would drop the cross terms between calls
        dense, sparse = [], []
        for a, g, ids in calls:
            gq = g if QS is None else token_matmul(g, QS, dtype=self.low_dtype(b.d_out), cast_back=False)
            if ids and QA is None:
                sparse.append((a, gq))
            elif ids:                 # one-hot rows times Q_A: the rows of Q_A
                dense.append((tf.gather(QA, a), gq))
            else:
                if (id(a), owner) not in rotated:
                    c = tf.cast(a, self.compute)
                    rotated[id(a), owner] = c if QA is None else token_matmul(c, QA, dtype=self.low_dtype(b.rows),
                                                                               cast_back=False)
                dense.append((rotated[id(a), owner], gq))
        compute = self.compute
        if not dense:             # token lookups only (an Embedding): sparse rows
            a = tf.concat([p[0] for p in sparse], axis=1)
            gq = tf.concat([tf.cast(p[1], compute) for p in sparse], axis=1)
            return _token_rows_squared(a, gq, b.rows, dtype)
        low = self.per_example_dtype(b)
        mul = low if low is not None else compute
        if b.rows * b.d_out <= PER_EXAMPLE_BATCHED_MAX:
            M = tf.add_n([tf.cast(tf.einsum("bpa,bpc->bac", tf.cast(aq, mul), tf.cast(gq, mul)), compute)
                          for aq, gq in dense])
            for ids_, gq in sparse:
                M += _token_rows(ids_, tf.cast(gq, compute), b.rows)
            return tf.cast(tf.reduce_sum(tf.square(M), axis=0), dtype)

        # a vocabulary-sized block (GPT-2's tied table: [50257, d]): one example's G_n at a time, so the
        # per-batch memory is one [rows, d_out] matrix, not a batch of them; the batch's squares summed in
        # the compute dtype (as the batched branch above does) and cast once — a float64 running sum
        # doubles the memory traffic, which is what this loop spends its time on
        dense = [(tf.cast(aq, mul), tf.cast(gq, mul)) for aq, gq in dense]
        sparse = [(ids_, tf.cast(gq, compute)) for ids_, gq in sparse]

        def one(acc, i):
            M = tf.add_n([tf.cast(tf.matmul(aq[i], gq[i], transpose_a=True), compute) for aq, gq in dense])
            for ids_, gq in sparse:
                M = tf.tensor_scatter_nd_add(M, tf.reshape(ids_[i], [-1, 1]), gq[i])
            return acc + tf.square(M)
        n = tf.shape(dense[0][1])[0]
        zero = tf.zeros([b.rows, b.d_out], self.compute)
        return tf.cast(tf.foldl(one, tf.range(n), initializer=zero, parallel_iterations=1), dtype)

    # -- in-graph running sums (fit_factors on one device) --------------------------------------------
    def _zeros(self, what: str):
        """Variables shaped like one batch's sums of pass ``what`` (``"covariances"`` or ``"correction"``),
        zero: the dense covariances and the eigenvalue sums in the compute dtype, counts and diagonals in
        float64.

        The variables are made with an unspecified shape so that :meth:`take` can empty them (assign a
        zero-length array) once read: TensorFlow keeps the compiled step's traced graph, and with it every
        variable the step captured, after the step itself is dropped (a C++-side reference that no
        Python ``del`` or ``gc.collect`` reaches) — so a fit's covariance sums stayed allocated for the life
        of the process: 1.1 GB at GPT-2 small through the correction pass, the solves and the scoring, twice
        over in case 2 (its finetuning fit's and its pretraining fit's)."""
        def var(shape, dtype=tf.float64):
            return tf.Variable(tf.zeros(shape, dtype), shape=tf.TensorShape(None), trainable=False)
        if what == "correction":
            return {b.name: var([b.rows, b.d_out], self.compute) for b in self.blocks}
        def dense(width):
            """A dense side's running sum: its upper tiles (:meth:`_stats_fn`'s ``tiled``)."""
            sizes = gram_tiles(width)
            return _Tiles(sizes, {k: var(shape, self.compute) for k, shape in upper_tiles(sizes).items()})
        blocks = {b.name: (var([b.rows]) if b.diag_in else dense(b.rows),
                           var([b.d_out]) if b.diag_out else dense(b.d_out), var([]))
                  for b in self.blocks}
        return {"blocks": blocks, "diag": [var(tf_variable(v).shape) for v in self.diag_vars], "n": var([])}

    def add(self, what: str, x, y, step: int, bases: dict | None = None) -> None:
        """Add one batch's sums of pass ``what`` to variables inside the compiled step (no per-batch arrays
        leave the graph: at GPT-2 small a batch's covariances are 1.2 GB in float32); :meth:`take` returns
        them as :meth:`covariances` / :meth:`correction` would have summed them. One device only (under a
        ``strategy`` the per-batch steps are summed across replicas instead).

        The dense sums run in the compute dtype (float32 for a float32 model, as its per-batch products
        are): TensorFlow's CPU allocator (oneDNN, the default) keeps the high-water mark of its memory for
        the life of the process, so float64 running sums — and each step's float64 casts of every block's
        products, alive at once in the compiled step — would stay resident through the solves and the
        scoring (measured at GPT-2 small: 18 GB peak). Counts and diagonals stay float64."""
        if getattr(self, "_sums", None) is None or self._sums[0] != what:
            self._sums = (what, self._zeros(what))
            into = self._sums[1]
            if what == "correction":
                def step_fn(x, y, step, bases):
                    for k, t in self._correction_fn(x, y, step, bases, self.compute).items():
                        into[k].assign_add(t)
            else:
                def step_fn(x, y, step):
                    out, diag, n = self._stats_fn(x, y, step, self.compute, tiled=True)
                    for k, ts in out.items():
                        for v, t in zip(into["blocks"][k], ts):
                            if isinstance(v, _Tiles):
                                for tile, part in t.items():
                                    v.tiles[tile].assign_add(part)
                            else:
                                v.assign_add(t)
                    for v, t in zip(into["diag"], diag):
                        v.assign_add(t)
                    into["n"].assign_add(n)
            self._add = function(step_fn, reduce_retracing=True)
        if what == "correction":
            self._add(x, y, tf.constant(CORRECTION_SEED_OFFSET + step, tf.int64), self._bases_as_tensors(bases))
        else:
            self._add(x, y, tf.constant(step, tf.int64))

    def take(self, what: str):
        """The running sums of :meth:`add` as numpy arrays (in the variables' dtypes), released from the graph."""
        if getattr(self, "_sums", None) is None or self._sums[0] != what:
            return None
        sums = self._sums[1]
        self._sums, self._add = None, None

        def read(v):
            """One variable as numpy, its buffer emptied at once (whatever still holds the variable: see
            :meth:`_zeros`), so the sums are never held twice (2.4 GB at GPT-2 small)."""
            out = v.numpy()
            v.assign(tf.zeros([0], v.dtype))
            return out
        def read_side(v):
            """A dense side's tiles completed into its symmetric matrix, each tile's variable emptied as read."""
            return gram_from_upper(v.tiles, v.sizes, read) if isinstance(v, _Tiles) else read(v)
        if what == "correction":
            return {k: read(v) for k, v in sums.items()}
        return {"n": float(read(sums["n"])),
                "blocks": {k: tuple(read_side(v) for v in vs) for k, vs in sums["blocks"].items()},
                "diag": [read(v) for v in sums["diag"]]}

    def _bases_as_tensors(self, bases: dict) -> dict:
        """The bases as tensors, each side in the dtype it is multiplied in (bfloat16 where ``product_dtype``
        makes it so, else the compute dtype), made once per set of bases (not per batch: at GPT-2 small they are
        2.4 GB in float64)."""
        cached = getattr(self, "_bases_tensors", None)
        if cached is None or cached[0] is not bases:
            self._bases_tensors = None
            tb, owners = {}, {}
            blocks = {b.name: b for b in self.blocks}
            for k, v in bases.items():
                qa_dtype, qs_dtype = (self.basis_dtype(blocks[k], side) for side in ("A", "S"))
                # a Q_A shared with an earlier block (one array: eigenbases) is passed as that block's name, so
                # the compiled step rotates the shared activations once (and retraces if the sharing differs)
                qa = owners.setdefault((id(v["QA"]), qa_dtype), k) if np.size(v["QA"]) else k
                tb[k] = (qa if qa != k else _basis_tensor(v["QA"], self.compute, qa_dtype),
                         _basis_tensor(v["QS"], self.compute, qs_dtype))
            self._bases_tensors = cached = (bases, tb)
        return cached[1]

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

    def eigenbases(self, sums: dict, consume: bool = False) -> dict:
        """Eigendecomposition of the pass-1 averages (see :func:`eigenbases`); EK-FAC's K-FAC
        eigenvalues are not formed (the correction replaces them: one ``[rows, d_out]`` array less per block)."""
        return eigenbases(sums, with_eigenvalues=self.kind == "kfac" or not self.blocks, consume=consume,
                          precision=np.float32 if self.compute == tf.float32 else np.float64)

    def correction(self, x, y, step: int, bases: dict) -> dict:
        """Pass 2 sums of one batch (EK-FAC): ``{name: Σ_n ((Q_Aᵀ G_n Q_S)_ij)²}``."""
        return self._run(self._correction, x, y, tf.constant(CORRECTION_SEED_OFFSET + step, tf.int64),
                         self._bases_as_tensors(bases))

    def factors(self, sums: dict, bases: dict, correction: dict | None = None,
                correction_n: float | None = None) -> KFACFactors:
        """The fitted :class:`KFACFactors` (``correction`` required for ``kind="ekfac"`` with blocks);
        ``correction_n``: the examples the correction pass saw (default: the covariances' count; they differ
        under :func:`fit_factors`' ``covariance_max_examples``)."""
        n = sums["n"]
        n_eig = n if correction_n is None else correction_n
        fitted = {k: dict(v) for k, v in bases.items()}
        if self.kind == "ekfac" and self.blocks:
            if correction is None:
                raise ValueError("EK-FAC needs the eigenvalue-correction sums of the second pass")
            for b in self.blocks:
                # in the running sums' dtype (a float32 model's: float32, as accurate as its eigenvectors)
                eig = np.asarray(correction[b.name])
                eig /= np.asarray(n_eig, eig.dtype)       # in place: a vocabulary block's is [vocab, d]
                fitted[b.name]["eig"] = eig
        diagonal = {getattr(v, "path", tf_variable(v).name): d / n for v, d in zip(self.diag_vars, sums["diag"])}
        return KFACFactors(self.kind, self.fisher, int(round(n)), self.group.spec(self.objective.model), fitted,
                           diagonal, self.products())


def eigenbases(sums: dict, with_eigenvalues: bool = True, consume: bool = False, precision=np.float64) -> dict:
    """Pass-1 sums of :class:`FactorStatistics` → ``{block: {"QA", "QS", "eig"}}`` with the K-FAC
    eigenvalues ``λ_A ⊗ λ_S``. A side kept diagonal (an ``Embedding``'s tokens, a vocabulary-sized side:
    :data:`DENSE_FACTOR_MAX`) has an empty ``Q`` (the identity) and its diagonal as eigenvalues.
    Needs only the sums, not the model. ``consume``: take each block's sums out of ``sums`` as it is
    decomposed, so the covariances and the eigenvectors are not all held at once (:func:`fit_factors`).
    ``precision``: the dtype of the eigendecomposition (``numpy.float32`` for a float32 model, whose
    per-batch products are float32 anyway: 1.8× faster than a float64 ``eigh`` on GPT-2 small's 24
    ``[3072, 3072]`` sides, :func:`_eigh`); the bases are returned in ``precision`` too (a float32 eigendecomposition's
    vectors hold float32 accuracy: storing them as float64 would double their memory for nothing)."""
    n = sums["n"]
    if n == 0:
        from ..objective import EmptyDatasetError
        raise EmptyDatasetError("no examples: the K-FAC covariances are empty")
    fitted, done = {}, {}
    for name in list(sums["blocks"]):
        A, S, tokens = sums["blocks"].pop(name) if consume else sums["blocks"][name]
        # blocks that read one activations tensor (query / key / value) have bit-identical A sums: decomposed
        # once, their blocks share the eigenbasis array (one array in memory; the correction pass then
        # rotates the shared activations once, FactorStatistics._bases_as_tensors)
        seen = _fingerprint(A, tokens) if A.ndim == 2 else None
        A = A / np.asarray(max(float(tokens), 1.0), A.dtype)  # a block its loss never calls: zeros
        S = S / np.asarray(n, S.dtype)
        # a diagonal side (token counts, a vocabulary): identity eigenbasis, stored as an empty Q
        eS, QS = (S, np.zeros((0, 0))) if S.ndim == 1 else _eigh(S, precision)
        if A.ndim == 1:
            eA, QA = A, np.zeros((0, 0))
        else:
            if seen not in done:
                done[seen] = _eigh(A, precision)
            eA, QA = done[seen]
        fitted[name] = {"QA": QA, "QS": QS}
        if with_eigenvalues:
            fitted[name]["eig"] = np.outer(np.maximum(eA, 0), np.maximum(eS, 0))
        del A, S
    return fitted


def _fingerprint(M, tokens) -> tuple:
    """A dense covariance sum's identity for :func:`eigenbases` (shape, dtype, token count and a 128-bit
    hash of its bytes)."""
    import hashlib
    data = np.ascontiguousarray(M)
    return (data.shape, str(data.dtype), float(tokens), hashlib.blake2b(data.data, digest_size=16).hexdigest())


#: Sides at least this large are decomposed in the factors' precision (float32 for a float32 model); smaller
#: ones in float64, where the time is small: a float32 ``eigh`` is accurate to float32 only, and its vectors of
#: nearly equal eigenvalues turn with float32-level changes of the covariance — the Beam fit (per-batch float64
#: sums) and the in-process fit (float32 running sums) of a small model then gave scores 0.4 % apart, 0.04 %
#: with float64 decompositions.
EIGH_FLOAT32_MIN = 1024


def _eigh(M, precision):
    """Eigendecomposition of the symmetric part of ``M``: eigenvalues float64, eigenvectors in ``precision``;
    computed in ``precision`` from :data:`EIGH_FLOAT32_MIN` rows, else in float64. LAPACK's divide-and-conquer
    driver (``ssyevd`` / ``dsyevd``) through SciPy: NumPy's ``eigh`` computes a float32 matrix in float64, so on
    this project's 2-core machine a float32 ``[3073, 3073]`` side took 3.33 s there against 1.44 s here
    (``benchmarks/eigh.py``, which also found running two decompositions at once on one BLAS thread each slower
    than one after the other: 8.9 s against 5.7 s for four). NumPy's is the fallback where SciPy is missing."""
    compute = precision if M.shape[0] >= EIGH_FLOAT32_MIN else np.float64
    S = (0.5 * (M + M.T)).astype(compute, copy=False)
    try:
        from scipy.linalg import eigh
    except ImportError:                                  # pragma: no cover - SciPy is a requirement
        e, Q = np.linalg.eigh(S)
    else:
        e, Q = eigh(S, driver="evd", overwrite_a=True, check_finite=False)
    return e.astype(np.float64), Q.astype(precision, copy=False)


CORRECTION_SEED_OFFSET = 10_000_019  # the second pass draws its labels with other seeds than the first


def add_statistics(a, b):
    """Sum of two (nested) statistics of :class:`FactorStatistics`; ``None`` is the empty sum."""
    if a is None:
        return b
    if b is None:
        return a
    return tf.nest.map_structure(lambda u, v: u + v, a, b)


def _accumulate(total, new):
    """``total + new`` like :func:`add_statistics`, adding numpy arrays into ``total`` in place (the running
    sums of :func:`fit_factors` are its own: no second ``[vocab, d]`` array per block and batch)."""
    if total is None:
        return new
    if isinstance(total, np.ndarray) and isinstance(new, np.ndarray) and total.shape == new.shape \
            and total.dtype == new.dtype:
        total += new
        return total
    if isinstance(total, dict):
        return {k: _accumulate(total[k], new[k]) for k in total}
    if isinstance(total, (list, tuple)):
        return type(total)(_accumulate(a, b) for a, b in zip(total, new))
    return total + new


def _global_batch_size(y, strategy) -> int:
    t = tf.nest.flatten(y)[0]
    if strategy is None:
        return int(tf.shape(t)[0])
    return int(sum(int(tf.shape(v)[0]) for v in strategy.experimental_local_results(t)))


def microbatches(x, y, size: int | None):
    """``(start, x_part, y_part)`` for the consecutive slices of ``size`` examples of one batch ``(x, y)`` (nests of
    tensors or arrays; the last slice may be shorter), or the batch itself (start 0) when ``size`` is None or not
    smaller: how :func:`fit_factors` and the Beam factor job (``tfx_components.beam_factors``) split a batch into
    the fit's microbatches (:func:`~tf_influence.memory.factor_microbatch`)."""
    n = _global_batch_size(y, None)
    if not size or n <= size:
        yield 0, x, y
        return
    for i in range(0, n, size):
        yield (i, *(tf.nest.map_structure(lambda t: t[i:i + size], z) for z in (x, y)))


def fit_factors(objective, dataset, group: ParameterGroup, kind: str = "ekfac", fisher: str = "true",
                seed: int = 0, progress: bool = False, name: str = "dataset", strategy=None,
                max_examples: int | None = None, dense_factor_max: int | None = DENSE_FACTOR_MAX,
                memory_budget=None, microbatch: int | None = None,
                covariance_max_examples: int | None = None,
                product_dtype: str = DEFAULT_PRODUCT_DTYPE) -> KFACFactors:
    """Fit (E)K-FAC factors of ``objective`` on ``dataset`` for ``group`` (one pass, two for EK-FAC).

    The passes are :class:`FactorStatistics`' steps, summed batch by batch in bounded memory (the
    same steps run as a Beam combiner in ``tfx_components.beam_factors``).
    With a ``tf.distribute`` ``strategy`` each replica accumulates the covariances (and the
    eigenvalue sums) of its share of every global batch and the sums are all-reduced: the factors
    equal the single-device ones (tested with MirroredStrategy on two logical CPUs; with
    ``fisher="true"`` each replica draws its own labels, an equally valid Monte Carlo sample).

    ``dense_factor_max``: a factor side larger than this (a vocabulary) is kept diagonal
    (:data:`DENSE_FACTOR_MAX`); ``memory_budget``: bytes, a fraction of the available memory, or a
    string such as ``"8GB"`` (default: :func:`tf_influence.memory.default_budget`) — the factors'
    memory plan is checked against it before the first pass (:class:`~tf_influence.memory.MemoryBudgetError`).
    ``microbatch``: examples per step (default: the whole batch where its products fit in
    :data:`FACTOR_BATCH_BYTES`, else the fewest equal microbatches that do,
    :func:`~tf_influence.memory.factor_microbatch`); the sums are the same (with ``fisher="true"`` each
    microbatch draws its own labels). One device only: under a ``strategy`` the global batch is kept.

    ``max_examples``: fit both passes on the dataset's first ``max_examples`` examples only (shuffle
    it first), as kronfluence's ``covariance_max_examples`` / ``lambda_max_examples`` (its default:
    100,000) — the factor passes cost about 1.5 and 2 training epochs over the examples they see
    (``benchmarks/scale.py``), while the scores of every example still come from one pass; with a
    ``strategy`` the cap is applied in whole global batches.

    ``covariance_max_examples``: fit the covariances — the eigenbases, and the Fisher diagonal of the variables
    no block covers — on the first N of those examples only, while EK-FAC's eigenvalue correction still sees
    every one (kronfluence's ``covariance_max_examples`` against its ``lambda_max_examples``). The correction
    is the exact second moment of the per-example gradients in whatever orthonormal basis it is given, so a
    basis estimated from fewer examples costs less than fewer examples in the correction: at the 100 M Llama
    the covariance pass is about 1.0–1.2 of the fit's 2.4–3 training epochs (``docs/guides/ekfac.md`` gives the
    measured time and the scores' agreement with the full fit).

    ``product_dtype``: the dtype of the passes' large per-batch products — the covariances ``Σ aaᵀ``, ``Σ ggᵀ``,
    the rotations into the eigenbases and the per-example gradients in them. ``"model"``: the model's dtype
    throughout. ``"bfloat16"``: every dense side of a float32 model in bfloat16, each product summing in float32 and
    its result rounded to bfloat16 (a relative 2⁻⁹; the sums over batches stay float32 / float64). ``"auto"`` (the
    default): bfloat16 for the dense sides of at least :data:`~tf_influence.kfac.products.BFLOAT16_MIN` columns
    and the per-example gradients of the blocks with such a side (a vocabulary block's, whose vocabulary side is
    diagonal, included), and only where the hardware multiplies bfloat16 natively
    (:func:`~tf_influence.kfac.products.native_bfloat16`: AMX or AVX512-BF16 CPUs, GPUs from compute capability
    8.0); elsewhere, and for a float64 model or narrower sides, ``"model"``. On GPT-2 small that makes the
    correction step about a quarter faster; the scores moved far less than by drawing the true Fisher's labels with
    another seed (``docs/guides/ekfac.md``). :meth:`KFACFactors.summary` lists the products that ran in bfloat16.

    >>> import keras, tensorflow as tf                                    # doctest: +SKIP
    >>> factors = fit_factors(Objective(model), train_ds, ParameterGroup.from_model(model))  # doctest: +SKIP
    >>> factors.summary()["diagonal_variables"]      # what has no Kronecker block  # doctest: +SKIP
    """
    stats = FactorStatistics(objective, group, kind, fisher, seed, strategy, dense_factor_max, product_dtype)
    model = objective.model
    if any(not (b.diag_in and b.diag_out) and max(b.rows, b.d_out) >= 1024 for b in stats.blocks):
        from ..console import warn_generic_blas
        warn_generic_blas()          # large eigendecompositions ahead: say so if numpy's BLAS is generic
    from ..memory import factor_microbatch, factor_plan, nbytes, release_memory
    if microbatch is not None and int(microbatch) < 1:
        raise ValueError(f"microbatch must be a positive number of examples, got {microbatch}")
    from ..memory import first_batch_shape
    shape = first_batch_shape(dataset)                 # read once: the plan and the split both use it
    if strategy is None:
        microbatch = min(shape[0], int(microbatch)) if microbatch else factor_microbatch(stats, shape)
    else:
        microbatch = None
    factor_plan(stats, batch_shape=shape, microbatch=microbatch).check(memory_budget)   # refuse before any pass
    for what, cap in (("max_examples", max_examples), ("covariance_max_examples", covariance_max_examples)):
        if cap is not None and int(cap) < 1:
            raise ValueError(f"{what} must be a positive number of examples, got {cap}")
    if covariance_max_examples is not None and kind != "ekfac":
        raise ValueError("covariance_max_examples applies to kind='ekfac' (the correction pass sees every "
                         "example); K-FAC's eigenvalues come from the covariances themselves: use max_examples")
    caps = [c for c in (max_examples, covariance_max_examples) if c is not None]
    cov_cap = min(caps) if caps else None

    def capped(it, cap):
        if cap is None:
            yield from it
            return
        seen = 0
        for x, y in it:
            if seen >= cap:
                return
            k = _global_batch_size(y, strategy)
            if strategy is None and seen + k > cap:  # cut the last batch (whole batches under a strategy)
                k = int(cap) - seen
                x, y = (tf.nest.map_structure(lambda t: t[:k], z) for z in (x, y))
            seen += k
            yield x, y

    def split(it):
        """Each batch as microbatches of ``microbatch`` examples (itself when it is no larger)."""
        for x, y in it:
            for _, xs, ys in microbatches(x, y, microbatch):
                yield xs, ys

    def loop(desc, cap):
        if strategy is not None:
            check_dataset(dataset, name, model)
            it = iter(strategy.experimental_distribute_dataset(dataset))
        else:
            it = split(batches(dataset, name, model))
        it = capped(it, cap)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=desc, leave=False)
        return enumerate(it)

    in_graph = strategy is None      # one device: the running sums stay in the graph (FactorStatistics.add)
    sums = None
    with finite_check(f"K-FAC factors of {objective.name} on {name}"):
        for step, (x, y) in loop("K-FAC covariances", cov_cap):
            if in_graph:
                stats.add("covariances", x, y, step)
            else:
                sums = _accumulate(sums, stats.covariances(x, y, step))
        if in_graph:
            sums = stats.take("covariances")
    if sums is None or sums["n"] == 0:
        from ..objective import EmptyDatasetError
        raise EmptyDatasetError(f"{name} is empty: it yielded no examples")
    freed = nbytes(sums)                                # what each release below lets go, about
    release_memory(freed)
    if kind == "kfac":                                  # K-FAC's eigenvalues need the sums' diagonal parts whole
        bases = stats.eigenbases(sums)
    else:                                               # each block's covariances freed once decomposed
        bases = stats.eigenbases(sums, consume=True)
    sums = {"n": sums["n"], "diag": sums["diag"]}       # the covariances are no longer needed: free them
    release_memory(freed)
    corr, n_corr = None, 0
    if kind == "ekfac" and stats.blocks:
        with finite_check(f"EK-FAC eigenvalue correction of {objective.name} on {name}"):
            for step, (x, y) in loop("EK-FAC eigenvalue correction", max_examples):
                n_corr += _global_batch_size(y, strategy)
                if in_graph:
                    stats.add("correction", x, y, step, bases)
                else:
                    corr = _accumulate(corr, stats.correction(x, y, step, bases))
            if in_graph:
                corr = stats.take("correction")
        stats._bases_tensors = None                     # the bases as tensors are not needed any more
        release_memory(freed)
    return stats.factors(sums, bases, corr, n_corr if corr is not None else None)   # the correction's own count

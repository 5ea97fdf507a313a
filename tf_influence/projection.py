"""Projected per-example gradients without materialising them (LoGra's Kronecker projection).

For a layer whose per-example gradient is ``G_n = Σ_t a_t g_tᵀ`` (``a`` its inputs — plus 1 for a
bias —, ``g`` its output gradients; the Kronecker blocks of :mod:`tf_influence.kfac`: ``Dense``,
``EinsumDense``, convolutions, ``Embedding``, tied / untied ``ReversibleEmbedding``) the projection is
``P_inᵀ G_n P_out = Σ_t (P_inᵀ a_t)(P_outᵀ g_t)ᵀ``, a ``k_in × k_out`` matrix computed from the
projected inputs and output gradients captured in one ordinary forward / backward pass — the
``d_in × d_out`` gradient is never formed (Choe et al. 2024, "LoGra"). ``P_in ⊗ P_out`` is a
Kronecker-structured random projection of ``vec(G_n)``. Variables no block covers (normalisations,
position embeddings: from their captured gradients; anything else: vectorised per-example
gradients) get a dense Gaussian projection ``P`` of ``k_other`` columns, or none (identity) when
the variable is that small.

What it approximates: every entry of ``P_in``, ``P_out``, ``P`` is drawn from ``N(0, 1/k)``, so
``E[P Pᵀ] = I`` and ``⟨P g, P s⟩`` is an unbiased estimate of ``g·s`` whose error shrinks as
``1/√k`` (Johnson–Lindenstrauss); a side whose ``k`` reaches the dimension uses the identity and is
exact. Applied to the same ``P``, projected products are *exactly* ``P``-applied exact per-example
gradients (``tests/tf_influence/test_index.py`` checks both). Projections are seeded per block (``seed`` and the
block's key), so two processes, or an index and a later query, draw the same ``P``.

Example::

    >>> import keras, numpy as np, tensorflow as tf
    >>> import tf_influence as tfi
    >>> from tf_influence.projection import GradientProjector, ProjectionArgs
    >>> keras.utils.set_random_seed(0)
    >>> x = keras.Input((6,))
    >>> model = keras.Model(x, keras.layers.Dense(3)(keras.layers.Dense(5, name="embedding")(x)))
    >>> obj = tfi.Objective(model, "sparse_categorical_crossentropy")
    >>> proj = GradientProjector(obj, args=ProjectionArgs(k=4))      # default: k from the max_dim budget
    >>> proj.dim            # (7 inputs → 4) × (5 outputs → 4) + (6 → 4) × (3 outputs, exact)
    28
    >>> data = tf.data.Dataset.from_tensor_slices((np.ones((2, 6), "float32"), np.array([0, 2]))).batch(2)
    >>> proj.project(data).shape
    (2, 28)
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import tensorflow as tf

from .compiled import function
from .configs import JsonConfig
from .kfac.blocks import kronecker_blocks, norm_blocks
from .capture import captured_pass, norm_per_example, vectorized_gradients
from .objective import batches
from .params import ParameterGroup, tf_variable


@dataclass(frozen=True)
class ProjectionArgs(JsonConfig):
    """How per-example gradients are projected (one default each; JSON round trip)."""

    k: Optional[int] = field(default=None, metadata={
        "help": "projection size per side of each Kronecker block: k_in = min(k, rows), k_out = min(k, d_out), "
                "so a block gives at most k² numbers; None: the largest k that keeps the whole projection "
                "within the budget (max_dim, max_fraction)"})
    max_dim: int = field(default=7680, metadata={
        "help": "with k=None, the budget of the whole projection (7,680 int8 numbers + a scale: 7.5 KB per example)"})
    max_fraction: float = field(default=0.5, metadata={
        "help": "with k=None, the budget is also at most this fraction of the group's parameters: an index as "
                "large as the gradient stores it whole and makes a query cost as much as scoring every stored "
                "gradient (1.0: allow it)"})
    k_other: int = field(default=32, metadata={
        "help": "projection size of each variable outside the blocks (identity when the variable is smaller)"})
    layer_k: dict = field(default_factory=dict, metadata={
        "help": "per-block override of k (block key: layer name or Keras path; a number, or [k_in, k_out]), or "
                "of k_other (variable path)"})
    allocation: str = field(default="gradient_norm", metadata={
        "help": "with k=None, how max_dim is shared: 'gradient_norm' — in proportion to each block's mean squared "
                "per-example gradient norm on a calibration sample (build_index / the Beam job measure it), "
                "which minimises the estimate's variance; 'uniform' — the same k for every block",
        "choices": ("gradient_norm", "uniform")})
    seed: int = field(default=0, metadata={"help": "seed of the projections (with each block's key)"})
    dtype: str = field(default="int8", metadata={
        "help": "storage of an index: int8 (per-example scale: max |v| / 127; the rounding error, ≤ 0.4 % of the "
                "largest entry, is far below the projection's), float16 or float32",
        "choices": ("int8", "float16", "float32")})

    def __post_init__(self):
        if not 0.0 < float(self.max_fraction) <= 1.0:
            raise ValueError(f"ProjectionArgs: max_fraction must be in (0, 1], got {self.max_fraction}")
        if (self.k is not None and int(self.k) < 1) or int(self.k_other) < 1 or int(self.max_dim) < 1:
            raise ValueError(f"ProjectionArgs: k, k_other and max_dim must be ≥ 1, got {self.k}, {self.k_other}, "
                             f"{self.max_dim}")
        if self.allocation not in ("gradient_norm", "uniform"):
            raise ValueError(f"ProjectionArgs: allocation must be 'gradient_norm' or 'uniform', got '{self.allocation}'")
        if self.dtype not in ("int8", "float16", "float32"):
            raise ValueError(f"ProjectionArgs: dtype must be 'int8', 'float16' or 'float32', got '{self.dtype}'")
        bad = {name: v for name, v in dict(self.layer_k).items()
               if (isinstance(v, (list, tuple)) and len(v) != 2)
               or any(int(x) < 1 for x in (v if isinstance(v, (list, tuple)) else [v]))}
        if bad:
            raise ValueError(f"ProjectionArgs: layer_k values must be a number ≥ 1 or [k_in, k_out] ≥ 1, got {bad}")

    def to_dict(self) -> dict:
        return asdict(self)


def _gaussian(seed: int, key: str, rows: int, cols: int) -> np.ndarray | None:
    """``N(0, 1/cols)`` ``[rows, cols]`` seeded by ``(seed, key)``; ``None`` (identity) when ``cols ≥ rows``."""
    if cols >= rows:
        return None
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)


#: At most this many examples' per-example gradients share out the budget (``calibrate``; the Beam
#: job's driver reads this many records).
CALIBRATION_EXAMPLES = 256
#: ``calibrate`` reads at least this many examples (all of them when the data has fewer) ...
CALIBRATION_MIN_EXAMPLES = 32
#: ... and stops once the shares are known this well: the share-weighted relative standard error of
#: the per-segment means, ``Σ_s SE_s / Σ_s mean_s``. The allocation's modelled variance is flat
#: around its optimum (it moves with the square of a share's error), so 10 % costs nothing measurable:
#: at GPT-2 small (124 segments) the allocation from the first 32 sequences (0.05) gives the same
#: modelled variance, to 4 digits, as the one from 256.
CALIBRATION_TOLERANCE = 0.1


def sides(k) -> tuple:
    """``(k_in, k_out)`` of a block's ``layer_k`` entry: one number for both sides, or ``[k_in, k_out]``."""
    return (int(k[0]), int(k[1])) if isinstance(k, (list, tuple)) else (int(k), int(k))


def budget(args: "ProjectionArgs", n_params: int) -> int:
    """Numbers per example when ``k`` is not set: ``max_dim``, at most ``max_fraction`` of the group."""
    return max(1, min(int(args.max_dim), int(float(args.max_fraction) * int(n_params))))


def _error(k: int, size: int) -> float:
    """Relative variance of one projected side of ``size`` numbers at ``k``: ``1/k``, 0 when exact."""
    return 0.0 if k >= size else 1.0 / k


def allocate(shares: dict, segments: dict, max_dim: int) -> dict:
    """Share ``max_dim`` numbers between segments in proportion to their contribution to the
    estimate's variance. ``segments``: key → ``("block", rows, d_out)`` (a Kronecker block, each side
    sized on its own), ``("rows", rows, d_out)`` (a block whose row side stays exact: only ``k_out``
    grows) or ``("variable", size)``. The variance of ``⟨Pg, Ps⟩`` in a segment is modelled as its
    share (``E‖g‖²``: with queries distributed like the gradients, the variance-optimal weight) times
    ``e_in + e_out + e_in·e_out`` for a block with ``e = 1/k`` per projected side and 0 for a side
    kept exact (``k ≥`` its size) — the error of a Kronecker projection of a low-rank per-example
    gradient (rank 1 for a dense layer on one vector, ≤ T for T tokens) is set by each side's ``k``,
    not by their product, so completing a small side (a classifier's 10 outputs, a token table's
    rows) pays more than squaring a large one — and ``e`` for a variable. Sizes grow greedily by the
    largest variance reduction per number (a step of one, or a side made exact at once) until the
    budget is used. Returns key → ``[k_in, k_out]``
    (blocks), ``k_out`` (``rows`` segments) or numbers (variables, ≥ 1)."""
    def var(seg, lv):
        if seg[0] == "block":
            e_in, e_out = _error(lv[0], seg[1]), _error(lv[1], seg[2])
            return e_in + e_out + e_in * e_out
        return _error(lv[0], seg[2] if seg[0] == "rows" else seg[1])

    def dim(seg, lv):
        if seg[0] == "block":
            return min(lv[0], seg[1]) * min(lv[1], seg[2])
        return seg[1] * min(lv[0], seg[2]) if seg[0] == "rows" else min(lv[0], seg[1])

    def moves(seg, lv):     # one more on a side, or that side made exact at once (the greedy sees the cliff)
        if seg[0] == "block":
            return [m for m, ok in (((lv[0] + 1, lv[1]), lv[0] < seg[1]), ((seg[1], lv[1]), lv[0] < seg[1]),
                                    ((lv[0], lv[1] + 1), lv[1] < seg[2]), ((lv[0], seg[2]), lv[1] < seg[2])) if ok]
        size = seg[2] if seg[0] == "rows" else seg[1]
        return [(lv[0] + 1,), (size,)] if lv[0] < size else []

    level = {key: ((1, 1) if seg[0] == "block" else (1,)) for key, seg in segments.items()}
    used = sum(dim(segments[key], lv) for key, lv in level.items())
    while True:
        best, gain = None, 0.0
        for key, seg in segments.items():
            lv = level[key]
            v0, d0 = var(seg, lv), dim(seg, lv)
            for m in moves(seg, lv):
                d1 = dim(seg, m)
                if d1 <= d0 or used + d1 - d0 > max_dim:
                    continue
                g = shares.get(key, 0.0) * (v0 - var(seg, m)) / (d1 - d0)
                if g > gain:
                    best, gain = (key, m), g
        if best is None:
            return {key: (list(lv) if segments[key][0] == "block" else lv[0]) for key, lv in level.items()}
        key, m = best
        used += dim(segments[key], m) - dim(segments[key], level[key])
        level[key] = m


def gradient_norm_shares(objective, data, group: ParameterGroup, segments, examples: int = CALIBRATION_EXAMPLES,
                         min_examples: int = CALIBRATION_MIN_EXAMPLES,
                         tolerance: float = CALIBRATION_TOLERANCE, memory_budget=None) -> tuple:
    """Mean squared per-example gradient norm of every segment (block / variable key of
    ``segments``) over the first examples of ``data``, from one captured pass per batch (ghost norms,
    :class:`tf_influence.ghost_norms.GhostNorms`). Reads batches until it has ``min_examples`` and the
    share-weighted relative standard error ``Σ_s SE_s / Σ_s mean_s`` is at most ``tolerance``, or
    until ``examples`` (``tolerance=0``: always ``examples``). One batch's pass is planned first
    (:func:`tf_influence.memory.ghost_plan`, checked against ``memory_budget``). Returns ``(means, n,
    relative_se)``."""
    from .ghost_norms import GhostNorms
    from .objective import first_batch_size
    if int(examples) < 1:
        raise ValueError(f"calibration examples must be ≥ 1, got {examples}")
    # in the data's own batch size: a language model's per-batch logits are [B, T, vocab] (a batch of 32
    # GPT-2 sequences of 128 tokens: 0.8 GB per tensor), so re-batching larger would raise the peak
    sample = data.unbatch().take(int(examples)).batch(max(1, min(32, first_batch_size(data))))
    ghost = GhostNorms(objective, group)
    from .memory import ghost_plan
    ghost_plan(ghost, sample, "the projection budget's calibration pass").suggest(
        "ProjectionArgs(k=...) or allocation='uniform' (no calibration)").check(memory_budget)   # before the first batch
    fn = function(ghost.segments, reduce_retracing=True)
    s1, s2 = dict.fromkeys(segments, 0.0), dict.fromkeys(segments, 0.0)
    n, rse = 0, float("inf")
    for x, y in sample:
        parts, losses = fn(x, y)
        n += int(losses.shape[0])
        for key, v in parts.items():
            v = tf.cast(v, tf.float64)
            s1[key] += float(tf.reduce_sum(v))
            s2[key] += float(tf.reduce_sum(tf.square(v)))
        if n >= 2:
            se = sum(np.sqrt(max(0.0, s2[k] - s1[k] ** 2 / n) / (n - 1) / n) for k in s1)
            total = sum(s1.values()) / n
            rse = se / total if total > 0 else 0.0
        if n >= int(min_examples) and rse <= float(tolerance):
            break
    if n == 0:
        raise ValueError("calibration data is empty")
    bad = [k for k, v in s1.items() if not np.isfinite(v)]
    if bad:
        raise ValueError(f"calibration: the per-example gradients of {bad[:5]} over the first {n} examples "
                         f"contain NaN/Inf (check the data and the loss)")
    return {k: v / n for k, v in s1.items()}, n, rse


def calibrate(objective, data, group: ParameterGroup | None = None, args: "ProjectionArgs | None" = None,
              examples: int = CALIBRATION_EXAMPLES, min_examples: int = CALIBRATION_MIN_EXAMPLES,
              tolerance: float = CALIBRATION_TOLERANCE, memory_budget=None,
              report: dict | None = None) -> "ProjectionArgs":
    """``args`` with the budget (:func:`budget`) shared by mean squared per-example gradient norm
    (:func:`allocate`), measured on the first examples of ``data`` (a batched ``(x, y)`` dataset) —
    at least ``min_examples``, then batch by batch until the shares are known to ``tolerance``, at most
    ``examples`` (:func:`gradient_norm_shares`): every block's and variable's size written into
    ``layer_k``, so the projection no longer depends on data and an index rebuilds it from its
    metadata alone. Unchanged when ``args.k`` is set or ``allocation="uniform"``. ``report``: a dict
    that receives what the calibration read (``examples``, ``relative_standard_error`` and the rule's
    bounds; an index keeps it in its ``index.json`` as ``calibration``)."""
    from dataclasses import replace
    args = args or ProjectionArgs()
    if args.k is not None or args.allocation != "gradient_norm":
        return args
    group = group if group is not None else ParameterGroup.from_model(objective.model)
    probe = GradientProjector(objective, group, replace(args, allocation="uniform"))
    segments = {}
    for b in probe.blocks:
        # token tables (Embedding, tied ReversibleEmbedding): keep the token side exact when the table is
        # small enough — a per-example gradient touches only its tokens' rows, and mixing rows with a random
        # P_in is what makes a Kronecker projection noisy there
        token = b.kind in ("embedding", "tied") and b.rows * 8 <= budget(args, group.size)
        segments[b.name] = ("rows" if token else "block", b.rows, b.d_out)
    for v in [w for nb in probe.norms for w in nb.variables] + list(probe.rest):
        segments[group.name_of(v)] = ("variable", int(np.prod(v.shape)))
    shares, n, rse = gradient_norm_shares(objective, data, group, segments, examples, min_examples, tolerance,
                                          memory_budget)
    if report is not None:
        report.update({"examples": int(n), "relative_standard_error": float(rse), "min_examples": int(min_examples),
                       "max_examples": int(examples), "tolerance": float(tolerance)})
    fixed = {k: v for k, v in args.layer_k.items() if k in segments}
    free = {k: s for k, s in segments.items() if k not in fixed}
    def fixed_dim(v, seg):
        if seg[0] == "variable":
            return min(int(v), seg[1])
        k_in, k_out = sides(v)
        return min(k_in, seg[1]) * min(k_out, seg[2])
    spent = sum(fixed_dim(v, segments[k]) for k, v in fixed.items())
    level = allocate({k: shares[k] for k in free}, free, max(len(free), budget(args, group.size) - spent))
    sized = {k: ([segments[k][1], int(v)] if segments[k][0] == "rows" else v) for k, v in level.items()}
    return replace(args, layer_k={**sized, **fixed})


class GradientProjector:
    """Projected per-example gradients of ``objective``'s loss over ``group`` (default: every
    parameter) — see the module docstring for what is computed and what it approximates.

    ``project(dataset)`` → ``[N, dim]``; ``project_batch(x, y)`` → ``[B, dim]`` (compiled once);
    ``project_vector(v)`` maps a vector over the group (e.g. the multi-stage test vector ``s``, or
    its columns ``[p, Q]``) with the same ``P``. ``layout`` lists the segments (block / variable,
    sizes) in output order."""

    def __init__(self, objective, group: ParameterGroup | None = None, args: ProjectionArgs | None = None):
        self.objective, self.args = objective, args or ProjectionArgs()
        self.group = group if group is not None else ParameterGroup.from_model(objective.model)
        self.dtype = self.group.dtype
        blocks, diagonal = kronecker_blocks(objective.model, self.group)
        self.blocks = blocks
        self.norms, self.rest = norm_blocks(objective.model, diagonal)
        a, layout = self.args, []
        self._block_p = {}
        self.k = int(a.k) if a.k is not None else self._budget_k(blocks, a)   # blocks not in layer_k
        for b in blocks:
            k_in_req, k_out_req = sides(a.layer_k.get(b.name, self.k))
            p_in = _gaussian(a.seed, f"{b.name}/in", b.rows, k_in_req)
            p_out = _gaussian(a.seed, f"{b.name}/out", b.d_out, k_out_req)
            self._block_p[b.name] = (p_in, p_out)
            k_in = b.rows if p_in is None else k_in_req
            k_out = b.d_out if p_out is None else k_out_req
            layout.append({"key": b.name, "kind": b.kind, "rows": b.rows, "d_out": b.d_out, "k_in": k_in,
                           "k_out": k_out, "dim": k_in * k_out})
        self._var_p = {}
        for v in [v for nb in self.norms for v in nb.variables] + list(self.rest):
            key = self.group.name_of(v)
            size = int(np.prod(v.shape))
            p = _gaussian(a.seed, key, size, int(a.layer_k.get(key, a.k_other)))
            self._var_p[id(tf_variable(v))] = p
            layout.append({"key": key, "kind": "variable", "size": size, "dim": size if p is None else p.shape[1]})
        self.layout = layout
        self.dim = int(sum(s["dim"] for s in layout))
        self._fn = function(self._project, reduce_retracing=True)
        self._concrete = {}                                   # compiled_for: traced once per dataset spec

    def _budget_k(self, blocks, a) -> int:
        """The largest ``k`` (≥ 2) whose blocks not sized by ``layer_k``, with the other variables at
        ``k_other`` and the sized blocks at their ``layer_k``, fit the budget (the uniform rule)."""
        others = sum(min(int(np.prod(v.shape)), int(a.layer_k.get(n, a.k_other)))
                     for v, n in zip(self.group.variables, self.group.variable_names)
                     if all(v is not w for b in blocks for w in b.variables))
        sized = [b for b in blocks if b.name in a.layer_k]
        free = [b for b in blocks if b.name not in a.layer_k]
        for b in sized:
            k_in, k_out = sides(a.layer_k[b.name])
            others += min(k_in, b.rows) * min(k_out, b.d_out)

        def dim(k):
            return others + sum(min(k, b.rows) * min(k, b.d_out) for b in free)
        k = 2
        limit = budget(a, self.group.size)
        while k < 4096 and dim(k + 1) <= limit and dim(k + 1) > dim(k):
            k += 1
        return k

    # -- the projection of a batch (captured inputs and output gradients) --------------------------
    def _mat(self, p):
        """``p`` as a tensor; eagerly (:meth:`project_vector`, a query) made once per matrix and kept, not
        copied from numpy on every call."""
        if p is None:
            return None
        if not tf.executing_eagerly():
            return tf.constant(p, self.dtype)
        cache = self.__dict__.setdefault("_mats", {})
        hit = cache.get(id(p))
        if hit is None or hit[0] is not p:
            hit = cache[id(p)] = (p, tf.constant(p, self.dtype))
        return hit[1]

    def _project(self, x, y):
        obj = self.objective
        losses, records, grads, modes, options = captured_pass(obj, self.blocks + self.norms, x, y)
        n = tf.shape(losses)[0]
        out = []
        for b in self.blocks:
            p_in, p_out = (self._mat(p) for p in self._block_p[b.name])
            acc = None
            for (inp, _), gr, rev in zip(records[b.name], grads[b.name], modes[b.name]):
                a, g, ids = b.sparse_pairs(inp, gr, rev)      # lookups as token ids: no [B, T, vocab] one-hot
                g = tf.cast(g, self.dtype)
                if ids:                                       # a: token ids [B, T]; P_inᵀ e_token = P_in[token]
                    a = tf.gather(p_in, a) if p_in is not None else tf.one_hot(a, b.rows, dtype=self.dtype)
                else:
                    a = tf.cast(a, self.dtype)
                    if p_in is not None:
                        a = tf.einsum("bti,ik->btk", a, p_in)
                if p_out is not None:
                    g = tf.einsum("bto,ok->btk", g, p_out)
                term = tf.einsum("bti,bto->bio", a, g)
                acc = term if acc is None else acc + term
            out.append(tf.reshape(acc, [n, -1]))
        per_var = []
        for nb in self.norms:
            per_var += list(zip(nb.variables, norm_per_example(nb, records[nb.name], grads[nb.name], self.dtype,
                                                                options.get(nb.name))))
        if self.rest:
            per_var += list(zip(self.rest, vectorized_gradients(obj, self.rest, x, y)))
        for v, pe in per_var:
            flat = tf.reshape(tf.cast(pe, self.dtype), [n, -1])
            p = self._mat(self._var_p[id(tf_variable(v))])
            out.append(flat if p is None else flat @ p)
        return tf.concat(out, axis=1)

    def project_batch(self, x, y) -> tf.Tensor:
        """``[B, dim]`` projected per-example gradients of one batch."""
        return self._fn(x, y)

    def compiled_for(self, dataset, output_dtype=None, then=None):
        """The projection traced once for a batched dataset's element spec (batch axis unknown), so a
        short last batch does not trace it again; ``output_dtype`` (e.g. an index's float16) casts
        inside the graph; ``then`` (a function of the ``[B, dim]`` projection, e.g. the index's int8
        encoding :func:`tf_influence.index.encode_batch`) runs inside the graph too."""
        spec = dataset.element_spec
        key = (repr(spec), str(output_dtype), then)
        cache = self._concrete
        if key not in cache:
            relaxed = tf.nest.map_structure(lambda s: tf.TensorSpec([None, *s.shape[1:]], s.dtype), spec)

            def run(x, y):
                v = self._project(x, y)
                v = v if output_dtype is None else tf.cast(v, output_dtype)
                return v if then is None else then(v)
            fn = self._fn if output_dtype is None and then is None else function(run)
            cache[key] = fn.get_concrete_function(*relaxed)
        return cache[key]

    def project(self, dataset, progress: bool = False, name: str = "dataset") -> np.ndarray:
        """``[N, dim]`` projected per-example gradients of every example of a batched ``(x, y)`` dataset."""
        rows = []
        fn = self.compiled_for(dataset)
        it = batches(dataset, name, self.objective.model)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=f"projecting ({name})", unit="batch")
        for x, y in it:
            rows.append(fn(x, y).numpy())
        if not rows:
            from .gradients import EmptyDatasetError
            raise EmptyDatasetError(f"{name} is empty: it yielded no examples")
        return np.concatenate(rows)

    # -- vectors over the group (query vectors) ---------------------------------------------------
    def project_vector(self, v, vector_group: ParameterGroup | None = None) -> np.ndarray:
        """The same projection of a vector over the group: ``[p]`` → ``[dim]``, ``[p, Q]`` → ``[Q, dim]``.

        ``vector_group``: the group ``v`` is laid out over when it is not the projector's (e.g. the
        multi-stage ``(W, U)`` order); its variables are placed by identity and the projector's others
        count as 0. Each variable's slice of ``v`` is read where it lies: a 124 M-parameter query is not
        reordered or copied whole first (that copy and its conversion took half of a GPT-2 small query)."""
        group = self.group if vector_group is None else vector_group
        v = v.numpy() if tf.is_tensor(v) else np.asarray(v)
        single = v.ndim == 1
        cols = v[:, None] if single else v
        if cols.shape[0] != group.size:
            raise ValueError(f"vector has {cols.shape[0]} entries, the group '{group.name}' has {group.size} "
                             "parameters")
        q = cols.shape[1]
        self.group.ranges(group)                       # raises if a variable of the vector's group is not projected
        where = {id(tf_variable(var)): r for var, r in zip(group.variables, group.ranges(group))}   # (start, n) in v
        dtype = self.dtype.as_numpy_dtype

        def piece(var, shape):                         # [Q, *shape], from this variable's rows of v
            if id(tf_variable(var)) not in where:
                return tf.zeros([q, *shape], self.dtype)
            start, n = where[id(tf_variable(var))]
            rows = np.asarray(cols[start:start + n], dtype)          # a view when the dtype matches
            return tf.convert_to_tensor(np.ascontiguousarray(rows.T).reshape(q, *shape))

        by_var = {id(tf_variable(var)): piece(var, shape) for var, shape in zip(self.group.variables,
                                                                                self.group.shapes)}
        out = []
        for b in self.blocks:
            p_in, p_out = (self._mat(p) for p in self._block_p[b.name])
            m = b.to_matrix([by_var[id(tf_variable(w))] for w in b.variables])     # [Q, rows, d_out]
            if p_in is not None:                      # batched matmuls, not einsums: 6× faster at a [50257, 768]
                m = tf.matmul(p_in, m, transpose_a=True)                              # table (einsum transposes it)
            if p_out is not None:
                m = tf.matmul(m, p_out)
            out.append(tf.reshape(m, [tf.shape(m)[0], -1]))
        for v_ in [w for nb in self.norms for w in nb.variables] + list(self.rest):
            flat = tf.reshape(by_var[id(tf_variable(v_))], [q, -1])
            p = self._mat(self._var_p[id(tf_variable(v_))])
            out.append(flat if p is None else flat @ p)
        res = tf.concat(out, axis=1).numpy()
        return res[0] if single else res

    def describe(self) -> dict:
        """JSON-able description: arguments, dimension, segments and the group's spec."""
        blocks_k = [min(s["k_in"], s["k_out"]) for s in self.layout if "k_in" in s]
        k = int(self.args.k) if self.args.k is not None else max(blocks_k, default=0)   # the largest per-side size
        return {"args": self.args.to_dict(), "k": k, "dim": self.dim, "layout": self.layout,
                "group_spec": json.loads(self.group.spec(self.objective.model).to_json())}

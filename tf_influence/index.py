"""A gradient index of a corpus: projected per-example gradients written once, queried many times.

Every question "which training examples made the model say this?" is ``I(z) = ∇g(z)·s`` for some
test-side vector ``s`` (the multi-stage test vector after both inverse-HVP chains, a single-stage
``H⁻¹∇L_test``, or a raw test gradient). Re-scoring the corpus costs a backward pass per example per
question; an index stores ``P∇g(z)`` for every example once (:mod:`tf_influence.projection`), and a
question becomes ``⟨P∇g(z), Ps⟩`` — one matrix product per shard for a batch of questions.

Layout of an index directory: ``index.json`` (projection arguments, the parameter group's spec, the
model fingerprint, dimension, dtype, count, shards) and ``vectors-<i>-of-<n>.npz`` shards, each with
``keys`` (bytes), ``vectors`` ``[n_i, dim]`` (int8 with per-example ``scales``, float16 or float32) and ``sum_sq`` (per-dimension sums
of squares, for the diagonal preconditioner). A query against an index of another model — other
weights or another parameter group — is refused naming both fingerprints.

Example::

    >>> import keras, numpy as np, tensorflow as tf, tempfile
    >>> import tf_influence as tfi
    >>> from tf_influence.index import GradientIndex, build_index
    >>> keras.utils.set_random_seed(0)
    >>> x = keras.Input((6,))
    >>> model = keras.Model(x, keras.layers.Dense(3)(keras.layers.Dense(5)(x)))
    >>> obj = tfi.Objective(model, "sparse_categorical_crossentropy")
    >>> rng = np.random.default_rng(0)
    >>> data = tf.data.Dataset.from_tensor_slices((rng.normal(size=(50, 6)).astype("float32"),
    ...                                            rng.integers(0, 3, 50))).batch(16)
    >>> index = build_index(obj, data, tempfile.mkdtemp(), shard_size=20)
    >>> index.count, len(index.shards)
    (50, 3)
    >>> s = rng.normal(size=index.projector(obj).group.size)       # any test-side vector over the group
    >>> result = index.query(obj, s, QueryArgs(top_k=5))
    >>> result.harmful_keys[0].shape, result.harmful_scores[0][0] >= result.harmful_scores[0][-1]
    ((5,), True)
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import tensorflow as tf

from .configs import JsonConfig
from .params import ParameterGroup, tf_variable
from .projection import GradientProjector, ProjectionArgs

INDEX_FILE = "index.json"
SHARD_PATTERN = "vectors-*.npz"
#: Below this many indexed examples queries are exact (streamed matrix products); above it,
#: ``backend="auto"`` uses FAISS when it is installed.
EXACT_MAX = 1_000_000
#: Indexes up to this many bytes (as float32) stay in memory after their first query.
CACHE_BYTES = 1 << 30


PRECONDITIONERS = ("none", "diagonal", "ekfac")
BACKENDS = ("auto", "exact", "faiss")


@dataclass(frozen=True)
class QueryArgs(JsonConfig):
    """How an index answers queries (:meth:`GradientIndex.query`; the query command's flags)."""

    top_k: int = field(default=100, metadata={"help": "examples per query and side (harmful / helpful)"})
    all_scores: bool = field(default=False, metadata={"help": "also return every indexed example's score"})
    precondition: str = field(default="none", metadata={
        "choices": PRECONDITIONERS,
        "help": "none: the queries as given (multi-stage test vectors already hold both inverse Hessians); "
                "diagonal: divided by the corpus' per-dimension mean squared projected gradient; ekfac: the "
                "damped inverse of the (E)K-FAC factors in `factors`, applied to each query over the index's "
                "parameters before it is projected (for raw test gradients)"})
    damping: float = field(default=1e-3, metadata={
        "help": "the preconditioner's damping, relative to its mean curvature (diagonal: the mean square; "
                "ekfac: each block's mean eigenvalue)"})
    factors: Optional[str] = field(default=None, metadata={
        "help": "directory of (E)K-FAC factors of the index's parameters (KFACFactors.save, the FactorFitter "
                "artifact, the factor job's --output); precondition='ekfac' only, which needs them here or "
                "fitted factors passed to query(..., factors=)"})
    backend: str = field(default="auto", metadata={
        "choices": BACKENDS, "help": "exact: streamed matrix products; faiss: an inverted-file index in memory "
                                     "(approximate); auto: exact up to EXACT_MAX examples"})
    query_batch: int = field(default=256, metadata={"help": "queries per matrix product"})
    nprobe: Optional[int] = field(default=None, metadata={
        "help": "faiss: inverted lists searched per query (None: an eighth of them)"})
    higher_is_better: bool = field(default=False, metadata={
        "help": "the queries measure a quantity to raise (a log-probability: an InfluenceResult's higher_is_better), "
                "so the harmful side is the most negative scores and the helpful side the largest"})
    rerank: int = field(default=0, metadata={
        "help": "re-score the index's best `rerank` candidates per query and side with exact (unprojected) "
                "per-example gradients and keep the top_k of those: the top-k lists and their scores become "
                "exact wherever the true top-k is among the candidates, at the cost of up to 2·rerank gradients "
                "per query; needs the corpus (query(..., dataset=)); 0: off"})

    def __post_init__(self):
        if int(self.top_k) < 1 or int(self.query_batch) < 1:
            raise ValueError(f"QueryArgs: top_k and query_batch must be ≥ 1, got {self.top_k}, {self.query_batch}")
        if self.precondition not in PRECONDITIONERS:
            raise ValueError(f"QueryArgs: precondition must be one of {PRECONDITIONERS}, got '{self.precondition}'")
        if self.backend not in BACKENDS:
            raise ValueError(f"QueryArgs: backend must be one of {BACKENDS}, got '{self.backend}'")
        if float(self.damping) < 0:
            raise ValueError(f"QueryArgs: damping must be ≥ 0, got {self.damping}")
        if self.factors is not None and self.precondition != "ekfac":
            raise ValueError(f"QueryArgs: factors are only used by precondition='ekfac' (got "
                             f"precondition='{self.precondition}', factors={self.factors!r})")
        if self.all_scores and self.backend == "faiss":
            raise ValueError("QueryArgs: all_scores needs the exact backend")
        if int(self.rerank) < 0:
            raise ValueError(f"QueryArgs: rerank must be ≥ 0, got {self.rerank}")
        if self.rerank and self.precondition == "diagonal":
            raise ValueError("QueryArgs: rerank re-scores in parameter space, where the diagonal preconditioner "
                             "(of the projected space) does not exist; use precondition 'none' or 'ekfac'")


def _query_args(args: "QueryArgs | int | None", overrides: dict, where: str = "GradientIndex.query") -> QueryArgs:
    """``args`` (:class:`QueryArgs`, the one form) with the deprecated forms applied: its fields as keywords
    (``query(..., top_k=5)``) and the old positional ``top_k`` in the place of ``args`` — each with a
    ``DeprecationWarning`` naming ``args=QueryArgs(...)`` (removed in 0.4). An unknown keyword is a
    ``TypeError``."""
    from .deprecation import typed_options, warn
    if args is not None and not isinstance(args, QueryArgs):
        warn(f"{where}(objective, vectors, {args!r}) with top_k in the place of args",
             f"{where}(objective, vectors, QueryArgs(top_k={args!r}))", stacklevel=4)
        if "top_k" in overrides:
            raise TypeError(f"{where}: top_k given twice (in the place of args and as top_k=)")
        args = QueryArgs(top_k=args)
    return typed_options(where, QueryArgs, args, overrides)


def weights_sample(group: ParameterGroup, per_variable: int = 1024) -> str:
    """SHA-256 of the group's shapes and a strided sample of about ``per_variable`` numbers of each variable:
    a cheap check that weights once fingerprinted in full (:func:`fingerprint`) have not changed since —
    training or loading other weights changes nearly every number, so it changes the sample."""
    h = hashlib.sha256()
    for v in group.variables:
        t = tf_variable(v)
        flat = tf.reshape(t, [-1])
        n = int(flat.shape[0])
        h.update(f"{t.shape}{t.dtype.name}".encode())
        h.update(np.ascontiguousarray(flat[::max(1, n // per_variable)].numpy()).tobytes())
    return h.hexdigest()


class IndexMismatchError(ValueError):
    """A query's model or parameter group is not the one the index was built with."""


def fingerprint(model, group: ParameterGroup) -> str:
    """SHA-256 (first 16 hex digits) of the group's spec and the current values of its variables."""
    h = hashlib.sha256(group.spec(model).to_json().encode())
    for v in group.variables:
        h.update(np.ascontiguousarray(tf_variable(v).numpy()).tobytes())
    return h.hexdigest()[:16]


def _placed(group: ParameterGroup, vectors, vector_group: ParameterGroup | None) -> np.ndarray:
    """``vectors`` (``[p]`` or ``[p, Q]`` over ``vector_group``) laid out over ``group``, with 0 for the
    variables ``vector_group`` lacks; unchanged when ``vector_group`` is ``None``."""
    v = np.asarray(vectors)
    if vector_group is None:
        return v
    placed = np.zeros((group.size,) + v.shape[1:], v.dtype)
    at = 0
    for start, n in group.ranges(vector_group):     # contiguous copies, variable by variable
        placed[start:start + n] = v[at:at + n]
        at += n
    return placed


def _key_bytes(k) -> bytes:
    """An example key as an index stores it."""
    return k if isinstance(k, bytes) else str(k).encode()


def _write_npz(path, **arrays):
    """``np.savez`` to ``path`` (through ``tf.io.gfile`` for remote paths such as ``gs://``)."""
    import io
    if "://" not in path:
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with tf.io.gfile.GFile(path, "wb") as fh:
        fh.write(buf.getvalue())


def _read_npz(path) -> dict:
    import io
    with tf.io.gfile.GFile(path, "rb") as fh:
        data = np.load(io.BytesIO(fh.read()), allow_pickle=False)
        return {k: data[k] for k in data.files}


def encode_batch(v, dtype: str) -> dict:
    """Projected gradients ``[B, dim]`` as an index stores them, in TensorFlow ops (inside the
    projection's graph — :func:`build_index` — or eagerly): ``vectors`` in ``dtype`` (int8 with a
    per-example ``scales``: max ``|v|`` ↦ 127, rounded half to even), ``sum_sq`` the per-dimension sums
    of squares of the *stored* values (what the index holds, for the diagonal preconditioner) and
    ``finite`` (False when a value is NaN/Inf, or overflows float16)."""
    v = tf.convert_to_tensor(v)
    v32 = tf.cast(v, tf.float32)
    out = {"finite": tf.math.is_finite(tf.reduce_sum(v32))}        # a NaN or an Inf makes the sum non-finite
    if dtype == "int8":
        scales = tf.reduce_max(tf.abs(v32), axis=1) / 127.0
        q = tf.round(v32 / tf.where(scales > 0, scales, 1.0)[:, None])
        out.update(vectors=tf.cast(q, tf.int8), scales=scales,
                   sum_sq=tf.linalg.matvec(tf.square(q), tf.square(scales), transpose_a=True))   # Σ_n (q s)²
    else:
        out["vectors"] = tf.cast(v, dtype)
        stored = tf.cast(out["vectors"], tf.float32)
        out["finite"] = tf.math.is_finite(tf.reduce_sum(stored))    # also a float16 overflow (|v| > 65504)
        out["sum_sq"] = tf.reduce_sum(tf.square(stored), axis=0)
    return out


def decode(vectors, scales=None) -> np.ndarray:
    """Stored vectors as float32 (int8 times their per-example ``scales``)."""
    v = np.asarray(vectors).astype(np.float32)
    if scales is not None:
        v *= np.asarray(scales, np.float32)[:, None]
    return v


def write_shard(path: str, keys, vectors, dtype: str, scales=None, sum_sq=None) -> dict:
    """One shard file; returns its entry for ``index.json`` (file name, count). ``vectors``: float
    projections (encoded here, :func:`encode_batch`), or already encoded ones with their ``scales``
    (int8) and ``sum_sq``."""
    if sum_sq is None:
        enc = {k: t.numpy() for k, t in encode_batch(np.asarray(vectors), dtype).items()}
        if not enc["finite"]:
            raise ValueError(f"{path}: projected gradients contain NaN/Inf")
        vectors, scales, sum_sq = enc["vectors"], enc.get("scales"), enc["sum_sq"]
    keys = np.array([_key_bytes(k) for k in keys], dtype=bytes)
    arrays = dict(keys=keys, vectors=np.asarray(vectors), sum_sq=np.asarray(sum_sq, np.float64))
    if dtype == "int8":
        arrays["scales"] = np.asarray(scales, np.float32)
    _write_npz(path, **arrays)
    return {"file": os.path.basename(path), "count": int(len(keys))}


def write_metadata(directory: str, projector_description: dict, model_fingerprint: str, shards: list,
                   dtype: str) -> dict:
    """Write ``index.json`` last (an index without it is incomplete and is not read)."""
    meta = {"format": 1, "dim": projector_description["dim"], "k": projector_description.get("k"), "dtype": dtype,
            "count": int(sum(s["count"] for s in shards)), "shards": shards,
            "projection": projector_description["args"], "layout": projector_description["layout"],
            "group_spec": projector_description["group_spec"], "model_fingerprint": model_fingerprint}
    if projector_description.get("calibration"):      # what the budget's calibration read (build_index, the Beam job)
        meta["calibration"] = projector_description["calibration"]
    with tf.io.gfile.GFile(os.path.join(directory, INDEX_FILE), "w") as fh:
        fh.write(json.dumps(meta, indent=1))
    return meta


def publish(directory: str, parts, projector_description: dict, model_fingerprint: str, dtype: str) -> dict:
    """Move finished shard files ``parts`` (``(temporary path, count)``, in order) into ``directory`` as
    ``vectors-<i>-of-<n>.npz`` after removing an earlier index there, then write ``index.json`` last —
    the one publishing step of :func:`build_index` and the Beam job."""
    tf.io.gfile.makedirs(directory)
    for old in tf.io.gfile.glob(os.path.join(directory, SHARD_PATTERN)) + tf.io.gfile.glob(
            os.path.join(directory, INDEX_FILE)):
        tf.io.gfile.remove(old)
    shards = []
    for i, (tmp, count) in enumerate(parts):
        name = f"vectors-{i:05d}-of-{len(parts):05d}.npz"
        tf.io.gfile.rename(tmp, os.path.join(directory, name), overwrite=True)
        shards.append({"file": name, "count": int(count)})
    return write_metadata(directory, projector_description, model_fingerprint, shards, dtype)


@dataclass
class QueryResult:
    """Top-k per query: ``harmful_*`` the largest scores (removal predicted to lower the test loss),
    ``helpful_*`` the most negative — the other way round for a measurement to raise
    (``QueryArgs.higher_is_better``) — each ``[Q, k]`` (keys as bytes), most harmful / helpful first;
    ``scores`` ``[Q, N]`` and ``keys`` ``[N]`` (index order) when all scores were asked for."""

    harmful_keys: np.ndarray
    harmful_scores: np.ndarray
    helpful_keys: np.ndarray
    helpful_scores: np.ndarray
    scores: np.ndarray | None = None
    keys: np.ndarray | None = None
    backend: str = "exact"

    def _sides_for(self, higher_is_better: bool) -> "QueryResult":
        """The result with its sides named for the measurement (swapped for one to raise)."""
        if higher_is_better:
            self.harmful_keys, self.helpful_keys = self.helpful_keys, self.harmful_keys
            self.harmful_scores, self.helpful_scores = self.helpful_scores, self.harmful_scores
        return self


def _merge_top(best_s, best_k, s, k, top_k, largest):
    """Keep the ``top_k`` largest (or smallest) of the running best and a new block, per query row."""
    if best_s is not None:
        s = np.concatenate([best_s, s], axis=1)
        k = np.concatenate([best_k, np.broadcast_to(k, (s.shape[0], k.shape[-1])) if k.ndim == 1 else k], axis=1)
    elif k.ndim == 1:
        k = np.broadcast_to(k, s.shape)
    m = min(top_k, s.shape[1])
    sign = -1.0 if largest else 1.0
    part = np.argpartition(sign * s, m - 1, axis=1)[:, :m]
    s_m, k_m = np.take_along_axis(s, part, 1), np.take_along_axis(k, part, 1)
    order = np.argsort(sign * s_m, axis=1, kind="stable")
    return np.take_along_axis(s_m, order, 1), np.take_along_axis(k_m, order, 1)


class GradientIndex:
    """A written index (see the module docstring); :func:`build_index` writes one in process, the
    Beam job ``tfx_components.beam_index`` and the ``GradientIndexer`` component at corpus scale."""

    def __init__(self, directory: str, cache_bytes: int = CACHE_BYTES):
        """``cache_bytes``: shards are kept in memory (float32) after their first read while the
        whole index fits in this many bytes — repeated queries then cost only the products;
        larger indexes are streamed one shard at a time on every query (flat memory)."""
        path = os.path.join(directory, INDEX_FILE)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"no gradient index at {directory} (no {INDEX_FILE}: not built, or its build did "
                                    "not finish)")
        with tf.io.gfile.GFile(path) as fh:
            self.meta = json.loads(fh.read())
        self.directory = directory
        self.shards = [os.path.join(directory, s["file"]) for s in self.meta["shards"]]
        self._cache = {} if self.count * self.dim * 4 <= cache_bytes else None
        missing = [p for p in self.shards if not tf.io.gfile.exists(p)]
        if missing:
            raise FileNotFoundError(f"gradient index {directory}: shard(s) {missing[:3]} are missing")

    @classmethod
    def load(cls, directory: str, cache_bytes: int = CACHE_BYTES) -> "GradientIndex":
        return cls(directory, cache_bytes)

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def projection_args(self) -> ProjectionArgs:
        return ProjectionArgs.from_dict(self.meta["projection"])

    def bytes_per_example(self) -> float:
        size = sum(tf.io.gfile.stat(p).length for p in self.shards)
        return size / max(1, self.count)

    def projector(self, objective) -> GradientProjector:
        """The index's projection rebuilt on ``objective``'s model (same group, same ``P``); refuses
        another model or group by fingerprint."""
        group = ParameterGroup.from_spec(objective.model, json.dumps(self.meta["group_spec"]))
        # the whole weights are hashed the first time a model object is queried, and again only when a strided
        # sample of every variable changed (hashing 124 M parameters on every query took 1 s)
        verified = self.__dict__.setdefault("_verified", {})
        sample = weights_sample(group)
        seen = verified.get(id(objective.model))
        if seen is None or seen[0] is not objective.model or seen[1] != sample:
            got = fingerprint(objective.model, group)
            if got != self.meta["model_fingerprint"]:
                raise IndexMismatchError(
                    f"gradient index {self.directory} was built from model fingerprint "
                    f"{self.meta['model_fingerprint']}, but model '{objective.model.name}' has fingerprint {got}: other "
                    "weights or another parameter group; rebuild the index for this model")
            verified[id(objective.model)] = (objective.model, sample)
        # kept per objective while its weights keep the index's fingerprint (checked above on every call)
        cache = self.__dict__.setdefault("_projectors", {})
        if id(objective) in cache and cache[id(objective)][0] is objective:
            return cache[id(objective)][1]
        proj = GradientProjector(objective, group, self.projection_args)
        if proj.dim != self.dim:
            raise IndexMismatchError(f"gradient index {self.directory}: projection of dimension {proj.dim}, index "
                                     f"has {self.dim}")
        cache[id(objective)] = (objective, proj)
        return proj

    def iter_shards(self):
        """``(keys, vectors float32)`` of each shard in order (one shard in memory unless cached)."""
        for p in self.shards:
            if self._cache is not None and p in self._cache:
                yield self._cache[p]
                continue
            d = _read_npz(p)
            item = (d["keys"], decode(d["vectors"], d.get("scales")))
            if self._cache is not None:
                self._cache[p] = item
            yield item

    def mean_square(self) -> np.ndarray:
        """Per-dimension mean of the squared projected gradients over the corpus."""
        total = np.zeros(self.dim)
        for p in self.shards:
            total += _read_npz(p)["sum_sq"]
        return total / max(1, self.count)

    def self_influence(self):
        """``(keys, ‖P∇g(z)‖²)`` — TracIn self-influence (η = 1) of every example, free from the index."""
        keys, sq = [], []
        for k, v in self.iter_shards():
            keys.append(k)
            sq.append(np.einsum("nd,nd->n", v, v))
        return np.concatenate(keys), np.concatenate(sq)

    def query(self, objective, vectors, args: QueryArgs | None = None, *,
              vector_group: ParameterGroup | None = None, factors=None, dataset=None, keys=None,
              **options) -> QueryResult:
        """Score queries against the index: ``vectors`` over the index's parameter group (``[p]`` one
        query, ``[p, Q]`` one per column — e.g. ``MultiStageInfluence.test_vectors(..., "each")``),
        projected with the index's ``P`` on ``objective``'s model (refused if it is another model).
        ``args``: :class:`QueryArgs` (its fields as keywords, ``top_k=5``, are deprecated). ``vector_group``: the
        group the vectors are laid out over when it is not the index's (e.g. the multi-stage (W, U)
        order); its variables are placed by identity, the index's others get 0. ``factors``: fitted
        :class:`~tf_influence.kfac.KFACFactors` for ``precondition="ekfac"`` instead of ``args.factors``'
        directory — the queries become ``(F̂ + λ)⁻¹ q`` over the index's parameters, so a score is
        ``⟨P∇g(z), P(F̂ + λ)⁻¹q⟩``: the EK-FAC influence of a raw test gradient, projected.
        ``dataset`` (and ``keys``, when the index was built with keys): the indexed corpus, batched as
        for :func:`build_index`, for ``rerank`` — the index's candidates are re-scored exactly there."""
        from dataclasses import replace
        args = _query_args(args, options, "GradientIndex.query")
        fitted = None
        if factors is not None:   # fitted factors (or their directory): EK-FAC-preconditioned unless said otherwise
            precondition = "ekfac" if args.precondition == "none" else args.precondition
            if isinstance(factors, (str, os.PathLike)):
                args = replace(args, precondition=precondition, factors=os.fspath(factors))
            else:
                fitted, args = factors, replace(args, precondition=precondition)
        if args.precondition == "ekfac" and fitted is None and args.factors is None:
            raise ValueError("precondition='ekfac' needs factors: QueryArgs.factors (a directory of saved factors) or "
                             "query(..., factors=<fitted KFACFactors>)")
        proj = self.projector(objective)
        if args.precondition == "ekfac":
            from .kfac import KFACFactors, KFACInverse
            fitted = fitted if fitted is not None else KFACFactors.load(args.factors)
            inverse = KFACInverse(fitted, objective.model, proj.group, relative_damping=args.damping)
            v = _placed(proj.group, vectors, vector_group)
            vectors, vector_group = inverse(tf.constant(v, proj.group.dtype)).numpy(), None
            args = replace(args, precondition="none", factors=None)
        q = np.atleast_2d(proj.project_vector(vectors, vector_group))   # each variable read where it lies
        if not args.rerank:
            return self.query_projected(q, args)
        if dataset is None:
            raise ValueError("QueryArgs.rerank re-scores candidates with exact gradients: pass the indexed corpus, "
                             "query(..., dataset=...)")
        wide = replace(args, rerank=0, top_k=max(args.top_k, args.rerank), higher_is_better=False)
        return self._rerank(objective, proj.group, _placed(proj.group, vectors, vector_group),
                            self.query_projected(q, wide), args, dataset, keys)._sides_for(args.higher_is_better)

    def _rerank(self, objective, group, vectors, approx: QueryResult, args: QueryArgs, dataset, keys):
        """Exact scores of the approximate result's candidates (one pass over ``dataset`` that computes
        gradients of the candidates only); each query's ``top_k`` per side among its candidates."""
        from .gradients import per_example_dot
        from .objective import first_batch_size, take_positions
        V = vectors if vectors.ndim == 2 else vectors[:, None]
        position = {_key_bytes(k): i for i, k in enumerate(range(self.count) if keys is None else keys)}
        wanted = np.unique(np.concatenate([approx.harmful_keys.ravel(), approx.helpful_keys.ravel()]))
        missing = [k for k in wanted[:3] if k not in position]
        if missing:
            raise ValueError(f"rerank: keys {missing} of the index are not in the dataset's keys (pass the keys the "
                             "index was built with)")
        rows = np.array(sorted(position[k] for k in wanted))
        mask = np.zeros(rows.max() + 1, bool)
        mask[rows] = True
        subset = take_positions(dataset, mask, first_batch_size(dataset))
        # few queries: forward mode (no per-example gradient block); many: blocks of at most 2^26 numbers
        exact = per_example_dot(objective, subset, group, V, method="jvp" if V.shape[1] <= 4 else "jacobian",
                                chunk_size=max(1, min(64, (1 << 26) // group.size)), name="rerank candidates")
        if len(exact) != len(rows):
            raise ValueError(f"rerank: the dataset yielded {len(exact)} of the {len(rows)} candidate examples — "
                             "is it the corpus the index was built from?")
        row_of = {int(r): j for j, r in enumerate(rows)}
        out = {"harmful_keys": [], "harmful_scores": [], "helpful_keys": [], "helpful_scores": []}
        for qi in range(V.shape[1]):
            cand = np.unique(np.concatenate([approx.harmful_keys[qi], approx.helpful_keys[qi]]))
            ex = np.array([exact[row_of[position[k]], qi] for k in cand])
            for side, sign in (("harmful", -1.0), ("helpful", 1.0)):
                order = np.argsort(sign * ex, kind="stable")[:args.top_k]
                out[f"{side}_keys"].append(cand[order])
                out[f"{side}_scores"].append(ex[order])
        res = QueryResult(*(np.array(out[n]) for n in ("harmful_keys", "harmful_scores", "helpful_keys",
                                                        "helpful_scores")), backend=f"{approx.backend}+rerank")
        if args.all_scores:                       # every example's score stays the index's (approximate) one
            res.scores, res.keys = approx.scores, approx.keys
        return res

    def query_projected(self, q, args: QueryArgs | None = None, **options) -> QueryResult:
        """As :meth:`query` for already projected queries ``[Q, dim]`` (``args``: :class:`QueryArgs`).
        ``precondition="diagonal"`` divides by the corpus' per-dimension mean square (+
        ``damping`` × its mean) — a diagonal Gauss–Newton preconditioner in the projected space, for raw
        test gradients; ``"ekfac"`` needs the queries over the parameters (:meth:`query`). ``backend``:
        ``"exact"`` (streamed products, one shard in memory), ``"faiss"`` (an inverted-file
        inner-product index in memory, ``4√N`` lists of which ``nprobe`` — default an eighth — are
        searched; approximate), ``"auto"`` (exact up to :data:`EXACT_MAX` examples)."""
        args = _query_args(args, options, "GradientIndex.query_projected")
        top_k, all_scores, precondition, damping = args.top_k, args.all_scores, args.precondition, args.damping
        backend, query_batch, nprobe = args.backend, args.query_batch, args.nprobe
        q = np.atleast_2d(np.asarray(q, np.float32))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        if not np.all(np.isfinite(q)):
            raise ValueError("query vectors contain NaN/Inf")
        if precondition == "ekfac":
            raise ValueError("precondition='ekfac' is applied over the parameters: use GradientIndex.query with the "
                             "unprojected query vectors")
        if precondition == "diagonal":
            ms = self.mean_square()
            q = (q / (ms + damping * ms.mean())).astype(np.float32)
        if backend == "auto":
            backend = "exact"
            if self.count > EXACT_MAX and not all_scores:
                try:
                    import faiss  # noqa: F401 (installed?)
                    backend = "faiss"
                except ImportError:
                    pass
        if backend == "faiss":
            return self._query_faiss(q, top_k, nprobe)._sides_for(args.higher_is_better)
        hi = lo = None
        parts = []
        for keys, v in self.iter_shards():
            s = np.concatenate([q[i:i + query_batch] @ v.T for i in range(0, len(q), query_batch)])
            if all_scores:
                parts.append((keys, s))
            hi = _merge_top(*(hi or (None, None)), s, keys, top_k, largest=True)
            lo = _merge_top(*(lo or (None, None)), s, keys, top_k, largest=False)
        out = QueryResult(hi[1], hi[0], lo[1], lo[0])
        if all_scores:
            out.keys = np.concatenate([k for k, _ in parts])
            out.scores = np.concatenate([s for _, s in parts], axis=1)
        return out._sides_for(args.higher_is_better)

    def _query_faiss(self, q, top_k, nprobe=None):
        import faiss
        vecs, keys = [], []
        for k, v in self.iter_shards():
            keys.append(k)
            vecs.append(v)
        x, keys = np.ascontiguousarray(np.concatenate(vecs)), np.concatenate(keys)
        nlist = max(1, int(4 * np.sqrt(len(x))))
        quant = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quant, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x[np.random.default_rng(0).permutation(len(x))[:max(nlist * 40, 10000)]])
        index.add(x)
        index.nprobe = int(nprobe) if nprobe else max(1, nlist // 8)
        k = min(top_k, len(x))
        hs, hi = index.search(np.ascontiguousarray(q), k)
        ls, li = index.search(np.ascontiguousarray(-q), k)
        return QueryResult(keys[hi], hs, keys[li], -ls, backend="faiss")


def build_index(objective, dataset, directory: str, group: ParameterGroup | None = None,
                args: ProjectionArgs | None = None, keys=None, shard_size: int = 50_000, progress: bool = False,
                name: str = "dataset", batch_size: int | None = None, memory_budget=None) -> GradientIndex:
    """Project every example of a batched ``(x, y)`` dataset and write an index to ``directory``
    (in process; shards of ``shard_size``; ``keys`` default to the example's position). With the
    default ``ProjectionArgs`` the budget is shared by gradient norm, measured on the dataset's first
    examples (:func:`tf_influence.projection.calibrate`). Files are written under temporary names and
    published with ``index.json`` last. ``batch_size``: examples per projection call (default: the
    dataset's own batches) — on a small model, larger calls spread the per-call cost (the digits CNN
    projects 10⁵ examples about 30 % faster in calls of 1,024 than of 256); memory grows with it.
    The stored encoding (int8 with its scales, or a float cast, and the sums of squares) is computed
    inside the projection's graph."""
    from .objective import batches
    from .projection import calibrate
    if batch_size is not None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be ≥ 1 or None, got {batch_size}")
        dataset = dataset.rebatch(int(batch_size))
    calibration = {}
    proj = GradientProjector(objective, group, calibrate(objective, dataset, group, args, memory_budget=memory_budget,
                                                         report=calibration))
    dtype = proj.args.dtype
    from .memory import index_plan
    index_plan(proj, dataset, shard_size).check(memory_budget)       # before the corpus pass
    tf.io.gfile.makedirs(directory)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
    tf.io.gfile.makedirs(tmp)
    from concurrent.futures import ThreadPoolExecutor
    writer = ThreadPoolExecutor(1)          # shards are written while the next ones are projected
    try:
        written, buf, n = [], [], 0          # buf: (keys, vectors, scales, sum_sq) parts of the next shard
        buffered = 0                         # examples in buf

        def flush():
            path = os.path.join(tmp, f"part-{len(written):05d}.npz")
            keys_, vecs, scales, sq = zip(*buf)

            def write():                       # in the writer thread, while the next batches are projected
                return write_shard(path, [k for ks in keys_ for k in ks], np.concatenate(vecs), dtype,
                                   None if scales[0] is None else np.concatenate(scales), np.sum(sq, axis=0))
            written.append(writer.submit(write))
            buf.clear()
        fn = proj.compiled_for(dataset, then=lambda v: encode_batch(v, dtype))   # encoded in the graph
        it = batches(dataset, name, objective.model)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=f"indexing ({name})", unit="batch")
        for x, y in it:
            enc = fn(x, y)
            v, sc = enc["vectors"].numpy(), enc["scales"].numpy() if "scales" in enc else None
            if not bool(enc["finite"]):
                raise ValueError(f"{name}: the projected gradients of examples {n}..{n + len(v) - 1} contain NaN/Inf")
            sq = enc["sum_sq"].numpy().astype(np.float64)
            ks = [str(i).encode() for i in range(n, n + len(v))] if keys is None else list(keys[n:n + len(v)])
            n += len(v)
            while len(v):
                room = shard_size - buffered
                if len(v) > room:                 # a batch across a shard boundary: each part's own sums
                    head = decode(v[:room], None if sc is None else sc[:room])
                    buf.append((ks[:room], v[:room], None if sc is None else sc[:room],
                                np.square(head).sum(0, dtype=np.float64)))
                    v, ks, sc = v[room:], ks[room:], None if sc is None else sc[room:]
                    sq = np.square(decode(v, sc)).sum(0, dtype=np.float64)
                    buffered = shard_size
                else:
                    buf.append((ks, v, sc, sq))
                    buffered += len(v)
                    v = v[:0]
                if buffered == shard_size:
                    flush()
                    buffered = 0
        if buf:
            flush()
        written = [f.result() for f in written]
        if n == 0:
            raise ValueError(f"{name} is empty: nothing to index")
        if keys is not None and len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} examples")
        publish(directory, [(os.path.join(tmp, e["file"]), e["count"]) for e in written],
                {**proj.describe(), "calibration": calibration}, fingerprint(objective.model, proj.group), dtype)
    finally:
        writer.shutdown(wait=True)
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
    return GradientIndex(directory)

"""Memory plans: what a computation will allocate, checked against a budget *before* it starts.

At the sizes users bring (GPT-2's 50,257-token vocabulary, BERT base, a 100 M-parameter Llama) the
difference between a request that fits and one that does not is a single dense ``[vocab, vocab]``
matrix (20 GB in float64). A :class:`MemoryPlan` lists the large allocations of one step — fitted
factors and eigenbases, dense Hessian blocks, per-example gradient buffers, projections, index
shards — each with its size, and :meth:`MemoryPlan.check` raises :class:`MemoryBudgetError` naming
the largest items and the options *before* any work is done. Never an out-of-memory error after
minutes, never a process killed by the kernel.

The budget (``memory_budget`` in :class:`~tf_influence.solvers.SolverConfig`,
:class:`~tf_influence.influence.InfluenceArgs`, :class:`~tf_influence.analyzer.FactorArgs`, …) is
read by :func:`resolve_budget`:

* ``None`` — :data:`DEFAULT_FRACTION` of the memory available now (``MemAvailable``, or the cgroup's
  limit less its usage when that is smaller), or the environment variable
  ``TF_INFLUENCE_MEMORY_BUDGET`` when it is set;
* a float in ``(0, 1]`` — that fraction of the available memory;
* a number of bytes, or a string ``"8GB"`` / ``"512MB"`` / ``"1.5GiB"``.

Plans estimate what a step adds to the process, not what it holds already (the model, the
runtime): the available memory already excludes that.

Phases run one after the other. What a finished phase frees returns to the system when numpy held it
(``host=True`` items), but TensorFlow's default CPU allocator on x86 Linux (oneDNN, unless
``TF_ENABLE_ONEDNN_OPTS=0``) keeps its high-water mark for the life of the process: there the peak is, over
the phases in order, the phase's host memory plus the largest TensorFlow memory of any phase so far
(:func:`retaining_allocator`; measured at GPT-2 small, ``benchmarks.real_size``'s timelines).

>>> plan = MemoryPlan("EK-FAC factors").add("dense A of 'token_embedding'", 50257 ** 2 * 8, "[50257, 50257] float64")
>>> plan.fits("4GB")
False
>>> plan.check("4GB")
Traceback (most recent call last):
...
tf_influence.memory.MemoryBudgetError: EK-FAC factors need 20.2 GB, over the memory budget of 4.0 GB: dense A of 'token_embedding' 20.2 GB ([50257, 50257] float64)
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

#: Fraction of the memory available at the check that a plan may use by default.
DEFAULT_FRACTION = 0.7
ENV_VAR = "TF_INFLUENCE_MEMORY_BUDGET"

_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


class MemoryBudgetError(MemoryError):
    """A request whose memory plan exceeds the budget; raised before the work starts."""

    def __init__(self, message: str, plan: "MemoryPlan | None" = None, budget: int | None = None):
        super().__init__(message)
        self.plan, self.budget = plan, budget


def human(nbytes: float) -> str:
    """``20.2 GB``: decimal units, three significant figures."""
    n = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def parse_bytes(value) -> int:
    """``"8GB"`` → 8·10⁹, ``"1.5GiB"`` → 1.5·2³⁰, ``123`` → 123."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size must be a number of bytes or a string such as '8GB' / '512MiB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def available_bytes() -> int:
    """Memory this process can still allocate: ``MemAvailable`` of ``/proc/meminfo``, or the cgroup
    (v2 or v1) limit less its usage when smaller; ``psutil`` where there is no ``/proc``."""
    avail = None
    info = _read("/proc/meminfo")
    if info:
        m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", info, re.M)
        if m:
            avail = int(m.group(1)) * 1024
    if avail is None:
        try:
            import psutil
            avail = int(psutil.virtual_memory().available)
        except Exception:   # noqa: BLE001 — no way to read it: assume plenty, the plan still names sizes
            avail = 1 << 50
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read(limit_path), _read(usage_path)
        if limit and usage and limit.isdigit() and usage.isdigit() and int(limit) < (1 << 60):
            avail = min(avail, max(0, int(limit) - int(usage)))
    return int(avail)


def default_budget() -> int:
    """The budget when none is given: ``TF_INFLUENCE_MEMORY_BUDGET`` if set, else
    :data:`DEFAULT_FRACTION` of :func:`available_bytes`."""
    env = os.environ.get(ENV_VAR)
    if env:
        return resolve_budget(env)       # a fraction such as "0.5" or a size such as "8GB" (_as_fraction)
    return int(DEFAULT_FRACTION * available_bytes())


def resolve_budget(budget=None) -> int:
    """Bytes of a ``memory_budget`` (see the module docstring)."""
    if budget is None:
        return default_budget()
    budget = _as_fraction(budget)
    if isinstance(budget, float) and 0.0 < budget <= 1.0:
        return int(budget * available_bytes())
    n = parse_bytes(budget)
    if n <= 0:
        raise ValueError(f"memory_budget must be positive, got {budget!r}")
    return n


def _as_fraction(budget):
    """A string such as ``"0.5"`` (a command-line flag) is the fraction 0.5; anything else as it is."""
    if isinstance(budget, str) and re.fullmatch(r"\s*(0?\.\d+|1(\.0*)?)\s*", budget):
        return float(budget)
    return budget


def check_budget_value(budget) -> None:
    """Raise ``ValueError`` unless ``budget`` is a valid ``memory_budget`` (configs call it on construction)."""
    if budget is None:
        return
    budget = _as_fraction(budget)
    if isinstance(budget, float) and 0.0 < budget <= 1.0:
        return
    if parse_bytes(budget) <= 0:
        raise ValueError(f"memory_budget must be positive, got {budget!r}")


@dataclass
class MemoryItem:
    """One allocation: held through the whole step (``phase=None``) or only during one phase of it
    (the factor passes, the eigendecomposition, a solve, scoring: phases run one after the other)."""

    name: str
    nbytes: int
    what: str = ""
    phase: str | None = None
    host: bool = False        # numpy (host) memory, returned when freed; else TensorFlow's allocator's


def retaining_allocator() -> bool:
    """Whether TensorFlow's CPU allocator keeps freed memory resident: oneDNN's (the default on x86 Linux
    since TensorFlow 2.9, unless ``TF_ENABLE_ONEDNN_OPTS=0``). Measured: 2 GB of tensors freed leave the RSS
    where it was under oneDNN, and give it back without it."""
    import platform
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip() not in ("0", "false", "False")


@dataclass
class MemoryPlan:
    """The large allocations of one step (see the module docstring); ``options`` is what the error
    message suggests when the plan does not fit."""

    title: str
    items: list = field(default_factory=list)
    options: list = field(default_factory=list)
    retaining: bool | None = None     # None: retaining_allocator() when the total is read

    def add(self, name: str, nbytes: float, what: str = "", phase: str | None = None,
            host: bool = False) -> "MemoryPlan":
        self.items.append(MemoryItem(name, int(max(0, nbytes)), what, phase, host))
        return self

    def extend(self, other: "MemoryPlan") -> "MemoryPlan":
        self.items.extend(other.items)
        self.options.extend(o for o in other.options if o not in self.options)
        return self

    def add_phases(self, other: "MemoryPlan", prefix: str, held_into: tuple = ()) -> "MemoryPlan":
        """``other``'s items as phases of this plan that run after the phases already in it: its phase ``p``
        becomes ``"{prefix} {p}"`` (and each item's name ``"{prefix}: {name}"``), with ``other``'s items held
        throughout counted in each of them — from when ``other`` starts, not before (a solve's factors do not exist during an earlier solve) — and in the
        phases ``held_into`` that follow it (the scoring that uses them), not after (a solve whose factors are
        freed before the next begins). Host and TensorFlow memory keep their kinds, so only ``other``'s
        TensorFlow memory carries over into the high-water mark of later phases (under a retaining allocator)."""
        held = [i for i in other.items if i.phase is None]
        phases = list(other.phases()) or [None]
        for p in phases:
            name = prefix if p is None else f"{prefix} {p}"
            for i in held + [i for i in other.items if p is not None and i.phase == p]:
                self.items.append(MemoryItem(f"{prefix}: {i.name}", i.nbytes, i.what, name, i.host))
        for name in held_into:
            for i in held:
                self.items.append(MemoryItem(f"{prefix}: {i.name}", i.nbytes, i.what, name, i.host))
        self.options.extend(o for o in other.options if o not in self.options)
        return self

    def suggest(self, *options: str) -> "MemoryPlan":
        self.options.extend(o for o in options if o not in self.options)
        return self

    @property
    def total(self) -> int:
        """The peak: what is held throughout plus the largest phase — or, under a retaining allocator (see the
        module docstring), plus the largest of (a phase's host memory + the largest TensorFlow memory of the
        phases up to it)."""
        held = sum(i.nbytes for i in self.items if i.phase is None)
        return int(held + self._peak()[0])

    def _retaining(self) -> bool:
        return retaining_allocator() if self.retaining is None else self.retaining

    def _peak(self) -> tuple:
        """``(bytes above what is held throughout, the phases whose items make it up)``."""
        phases = self.phases()
        if not phases:
            return 0, ()
        if not self._retaining():
            worst = max(phases, key=phases.get)
            return phases[worst], (worst,)
        high, high_at, best, best_at = 0, None, 0, ()
        for phase in phases:                     # insertion order: the order the phases run in
            tf_bytes = sum(i.nbytes for i in self.items if i.phase == phase and not i.host)
            host_bytes = sum(i.nbytes for i in self.items if i.phase == phase and i.host)
            if tf_bytes > high:
                high, high_at = tf_bytes, phase
            if host_bytes + high > best:
                best, best_at = host_bytes + high, (phase, high_at)
        return best, best_at

    def phases(self) -> dict:
        out = {}
        for i in self.items:
            if i.phase is not None:
                out[i.phase] = out.get(i.phase, 0) + i.nbytes
        return out

    def peak_items(self) -> list:
        """The items of the peak: those held throughout and those of the phase(s) that make it up (under a
        retaining allocator, the worst phase's host memory and the TensorFlow memory of the phase that set the
        high-water mark before it)."""
        _, at = self._peak()
        if not self._retaining():
            return [i for i in self.items if i.phase is None or i.phase in at]
        worst, high_at = at if at else (None, None)
        return [i for i in self.items if i.phase is None or (i.phase == worst and i.host)
                or (i.phase == high_at and not i.host)]

    def largest(self, k: int = 3) -> list:
        return sorted(self.peak_items(), key=lambda i: -i.nbytes)[:k]

    def fits(self, budget=None) -> bool:
        return self.total <= resolve_budget(budget)

    def message(self, budget: int) -> str:
        parts = [f"{i.name} {human(i.nbytes)}" + (f" ({i.what})" if i.what else "") for i in self.largest()]
        msg = f"{self.title} need {human(self.total)}, over the memory budget of {human(budget)}: " + "; ".join(parts)
        if self.options:
            msg += ". Options: " + "; ".join(self.options)
        return msg

    def check(self, budget=None) -> "MemoryPlan":
        """Raise :class:`MemoryBudgetError` when the plan exceeds ``budget`` (see :func:`resolve_budget`)."""
        limit = resolve_budget(budget)
        if self.total > limit:
            raise MemoryBudgetError(self.message(limit), self, limit)
        return self

    def summary(self) -> dict:
        return {"title": self.title, "total_bytes": self.total, "total": human(self.total), "phases": self.phases(),
                "items": [{"name": i.name, "bytes": i.nbytes, "what": i.what, "phase": i.phase}
                          for i in sorted(self.items, key=lambda i: -i.nbytes)]}


# -- estimates of the library's steps --------------------------------------------------------------
def first_batch_shape(dataset) -> tuple:
    """``(batch, positions)`` of a batched ``(x, y)`` dataset: from its static shapes where known, else
    from its first batch (one batch read). ``positions`` is the label's second axis (tokens), 1 if none."""
    import tensorflow as tf
    spec = tf.nest.flatten(dataset.element_spec[1])[0]
    shape = list(spec.shape)
    if shape and shape[0] is not None and (len(shape) < 2 or shape[1] is not None):
        return int(shape[0]), int(shape[1]) if len(shape) > 1 else 1
    for _, y in dataset.take(1):
        return batch_shape(y)
    return 1, 1


def batch_shape(y) -> tuple:
    """``(batch, positions)`` of one batch's labels ``y`` (a tensor, array or nest of them): the first label's first
    axis and its second (tokens), 1 if none."""
    import tensorflow as tf
    t = tf.nest.flatten(y)[0]
    return int(t.shape[0]), int(t.shape[1]) if len(t.shape) > 1 else 1


def _plan_shape(dataset, batch_shape: tuple | None) -> tuple:
    """``(B, P)`` of a plan: the caller's ``batch_shape``, else the dataset's first batch (:func:`first_batch_shape`),
    else a batch of 32 single positions."""
    if batch_shape is not None:
        return int(batch_shape[0]), int(batch_shape[1])
    return first_batch_shape(dataset) if dataset is not None else (32, 1)


def _dsize(dtype) -> int:
    import tensorflow as tf
    return tf.as_dtype(dtype).size


def _dname(size: int) -> str:
    return {4: "float32", 8: "float64"}.get(size, f"{size}-byte")


def _captured_bytes(blocks, B: int, P: int, c: int) -> int:
    """One batch's captured layer inputs and output gradients of ``blocks`` (``[B, P, rows]`` and ``[B, P, d_out]``
    in ``c``-byte floats), twice: the captured tensors and the forward / backward activations that hold them. An
    ``Embedding``'s input is its token ids, a ``[B, P]`` tensor whatever the vocabulary (counted as
    ``[B, P, vocab]`` once: 262 MB too many at the 100 M Llama's 32,000)."""
    return sum(B * P * ((1 if b.kind == "embedding" else b.rows) + b.d_out) * c * 2 for b in blocks)


def _pass_bytes(blocks, norms, B: int, P: int, c: int, logit_copies: int = 1, rest=()) -> int:
    """One batch's pass over a model: the captured inputs and output gradients of ``blocks``
    (:func:`_captured_bytes`), ``logit_copies`` ``[B, P, vocab]`` tensors (the widest output: the logits, and
    per pass their gradient / tangent / softmax), the normalisation layers' captured input and output
    gradient (``[B, P, width]`` each, twice) and the vectorised per-example gradients of ``rest``."""
    vocab = max([b.rows for b in blocks if b.kind == "tied"] + [b.d_out for b in blocks] + [0])
    return (_captured_bytes(blocks, B, P, c) + logit_copies * B * P * vocab * c
            + sum(B * P * int(nb.variables[0].shape[-1]) * c * 4 for nb in norms)
            + sum(B * math.prod(int(d) for d in v.shape) * c * 3 for v in rest))


def _factor_batch_bytes(stats, B: int, P: int) -> tuple:
    """``(first pass, correction pass)`` bytes of one batch's products in a factor fit: the captured inputs
    and output gradients (a vocabulary side: the logits and their gradient), the correction's per-example
    ``G_n`` and the vectorised per-example gradients of the variables no layer covers."""
    from .kfac.statistics import PER_EXAMPLE_BATCHED_MAX
    c = _dsize(stats.compute)
    captured, temp = _captured_bytes(stats.blocks, B, P, c), 0
    for b in stats.blocks:
        g_n = b.rows * b.d_out * c
        if b.kind == "embedding":     # its correction sums the rows of the (example, token) pairs present
            temp = max(temp, B * P * b.d_out * c * 3)
        else:   # a vocabulary-sized block, one example at a time: the running square sum, one G_n, its square and
            # the batch's result, all in the compute dtype (FactorStatistics._block_correction); with bfloat16
            # products (product_dtype) each G_n is first a bfloat16 array, then cast
            low = 2 / c if stats.per_example_dtype(b) is not None else 0.0    # bfloat16: 2 bytes an entry
            temp = max(temp, B * g_n * (2 + low) if b.rows * b.d_out <= PER_EXAMPLE_BATCHED_MAX
                       else g_n * (4 + low))
    vectorised = sum(B * math.prod(int(d) for d in v.shape) * c * 3 for v in stats.rest)
    return captured + vectorised, captured + temp


def factor_microbatch(stats, batch_shape: tuple, limit: int | None = None) -> int:
    """The examples per step of a factor fit on batches of ``batch_shape = (B, P)``: ``B`` itself where one
    batch's products (:func:`_factor_batch_bytes`) fit in ``limit`` bytes (default
    :data:`~tf_influence.kfac.statistics.FACTOR_BATCH_BYTES`), else each batch is split into the fewest
    microbatches that do (at least one example each) — of equal sizes where a divisor of ``B`` is within
    a factor of two of that size (a last, shorter microbatch retraces the compiled step). The sums are the
    same either way (they are sums over examples); the split bounds the TensorFlow memory of the passes,
    which the default CPU allocator keeps for the rest of the process (the module docstring)."""
    from .kfac.statistics import FACTOR_BATCH_BYTES
    B, P = (int(batch_shape[0]), int(batch_shape[1]))
    limit = FACTOR_BATCH_BYTES if limit is None else int(limit)

    def fits(m):
        return max(_factor_batch_bytes(stats, m, P)) <= limit
    m = next((-(-B // split) for split in range(1, B + 1) if fits(-(-B // split))), 1)
    # equal microbatches where a divisor of B is not much smaller: a last, shorter one retraces the step
    divisor = max(d for d in range(1, m + 1) if B % d == 0)
    return divisor if 2 * divisor >= m else m


def factor_plan(stats, dataset=None, batch_shape: tuple | None = None, microbatch: int | None = None) -> MemoryPlan:
    """Memory of fitting (E)K-FAC factors with a :class:`~tf_influence.kfac.FactorStatistics`:
    per block the covariances ``A`` and ``S`` (dense ``rows²`` / ``d_out²`` in the compute dtype — float32
    for a float32 model — with the eigendecomposition's copies, or a float64 diagonal), the eigenvalues
    ``[rows, d_out]`` and the per-batch products (captured activations and output gradients, the
    correction's ``G_n``) of one microbatch (:func:`factor_microbatch`, or ``microbatch`` examples)."""
    from .kfac.statistics import DENSE_FACTOR_MAX
    B, P = _plan_shape(dataset, batch_shape)
    m = min(B, int(microbatch)) if microbatch else factor_microbatch(stats, (B, P))
    c = _dsize(stats.compute)
    plan = MemoryPlan(f"(E)K-FAC factors of {stats.objective.name} over '{stats.group.name}'")
    ekfac = stats.kind == "ekfac"
    from .kfac.products import gram_tiles, upper_tiles
    largest_dense, sums, largest_name, whole, q_tensors = 0, 0, "", 0, 0
    for b in stats.blocks:
        for side, n, diag in (("A", b.rows, b.diag_in), ("S", b.d_out, b.diag_out)):
            if diag:
                sums += n * 8
                continue
            # the covariance's running sum (and each batch's, added to it) through the first pass — its upper
            # tiles (FactorStatistics.add) — then, completed, the whole matrix on the host until its eigenvectors
            # replace it; they stay for the rest of the fit, and as tensors in the dtype they multiply in
            upper = sum(r * k for r, k in upper_tiles(gram_tiles(n)).values())
            plan.add(f"dense {side} of '{b.name}'", upper * c * 2,
                     f"[{n}, {n}] {_dname(c)}, upper tiles ({upper / n ** 2:.0%}): running and batch sums",
                     phase="covariance pass")
            plan.add(f"eigenvectors of {side} of '{b.name}'", n * n * c, f"[{n}, {n}] {_dname(c)}", host=True)
            whole += n * n * c
            q_tensors += n * n * _dsize(stats.basis_dtype(b, side))
            if n > largest_dense:
                largest_dense, largest_name = n, f"{side} of '{b.name}'"
        # EK-FAC: the corrected eigenvalues' running sum in the compute dtype (kept as the result: FactorStatistics.
        # factors divides it in place) and each batch's; K-FAC: λ_A ⊗ λ_S, an outer product of float64 eigenvalues
        e_size = c if ekfac else 8
        plan.add(f"eigenvalues of '{b.name}'", b.rows * b.d_out * e_size,
                 f"[{b.rows}, {b.d_out}] {_dname(e_size)}", host=True)
        if ekfac:
            plan.add(f"a batch's eigenvalue sums of '{b.name}'", b.rows * b.d_out * c,
                     f"[{b.rows}, {b.d_out}] {_dname(c)}", phase="correction pass")
    for v in stats.diag_vars:
        size = math.prod(int(d) for d in v.shape)
        plan.add(f"Fisher diagonal of '{getattr(v, 'path', v.name)}'", size * 8 * 2, f"[{size}] float64")
    first, correction = _factor_batch_bytes(stats, m, P)
    what = f"batch {B} × {P} positions" + (f", in microbatches of {m}" if m < B else "")
    plan.add("per-batch products (first pass)", first, what, phase="covariance pass")
    if sums:
        plan.add("diagonal sums", sums, phase="covariance pass")
    if largest_dense:   # one eigendecomposition at a time: the average, numpy's copy and LAPACK's workspace
        plan.add("covariance sums held for the eigendecomposition", whole, phase="eigendecomposition", host=True)
        plan.add(f"eigendecomposition of {largest_name}", largest_dense ** 2 * c * 3,
                 f"[{largest_dense}, {largest_dense}] {_dname(c)} × 3 (average, copy, workspace)",
                 phase="eigendecomposition", host=True)
    if ekfac:
        plan.add("per-batch products (correction pass)", correction, what, phase="correction pass")
        if q_tensors:
            plan.add("eigenvectors as tensors (bfloat16 where the side multiplies in it)", q_tensors,
                     phase="correction pass")
    sides = sorted({n for b in stats.blocks for n, diag in ((b.rows, b.diag_in), (b.d_out, b.diag_out)) if not diag})
    if sides:
        plan.suggest(f"dense_factor_max below {sides[-1]} (a factor side above it is kept diagonal; "
                     f"the default {DENSE_FACTOR_MAX} already keeps vocabularies diagonal)")
    plan.suggest("a smaller batch", "solver='cg_squared' (no factors)", "a larger memory_budget")
    return plan


def dense_plan(p: int, k: int = 1, what: str = "Hessian") -> MemoryPlan:
    """An explicit ``[p, p]`` float64 system (``dense`` / ``dense_squared``): the matrix, its square
    or damped copy, ``solve``'s LU copy, and the eigenvalues."""
    return (MemoryPlan(f"the dense {what} solve").add(f"explicit {what}", p * p * 8 * 4, f"[{p}, {p}] float64 × 4")
            .add("right-hand sides", p * k * 8 * 4, f"[{p}, {k}]")
            .suggest("solver='cg_squared' or 'ekfac'", "a smaller dense_max / max_params", "a larger memory_budget"))


def vectors_plan(p: int, k: int, count: int, title: str, dtype_size: int = 8, phase: str | None = None) -> MemoryPlan:
    """``count`` working vectors of ``[p, k]`` (CG's iterates, an (E)K-FAC inverse's input and output)."""
    return MemoryPlan(title).add("working vectors", p * k * dtype_size * count, f"{count} × [{p}, {k}]",
                                 phase=phase).suggest("fewer test points per solve (test_target='sum')",
                                                      "a larger memory_budget")


def kfac_inverse_plan(stats_or_blocks, p: int, k: int) -> MemoryPlan:
    """Applying a damped (E)K-FAC inverse to ``k`` columns over ``p`` parameters: the denominators of every
    block and the columns, in the factors' precision (the compute dtype of ``stats``; float64 without it)."""
    blocks = getattr(stats_or_blocks, "blocks", stats_or_blocks)
    plan = MemoryPlan("the (E)K-FAC inverse")
    c = _dsize(getattr(stats_or_blocks, "compute", None)) if hasattr(stats_or_blocks, "compute") else 8
    for b in blocks:   # the factors themselves are in their fit's plan
        plan.add(f"denominators of '{b.name}'", b.rows * b.d_out * c, f"[{b.rows}, {b.d_out}] {_dname(c)}",
                 phase="solve", host=True)
    plan.add("columns", p * k * c * 3, f"[{p}, {k}] {_dname(c)} × 3 (the caller's, the blocks' parts, the "
             "assembled result)", phase="solve", host=True)
    return plan


#: ``[chunk, p]`` copies a vectorised per-example backward pass holds at once: the per-variable gradients, their
#: flattened block and the caller's reduction of it, with TensorFlow's temporaries — calibrated on GPT-2 small
#: (124 M parameters, chunks of 2: 6.45 GB peak from 1.36 GB before, ``benchmarks/real_size.py``); three copies
#: had planned 4.2 GB.
PER_EXAMPLE_COPIES = 5


#: :func:`release_memory` does nothing after less than this was freed (64 MiB): a full ``gc.collect()`` walks every
#: Python object, and in a process holding traced graphs that took 0.1–0.3 s a call — more than a small model's
#: whole factor fit, paid three times per fit — while what glibc could give back from a few megabytes is noise.
RELEASE_MIN_BYTES = 64 * 2 ** 20


def release_memory(freed_bytes: int | None = None) -> None:
    """Give freed heap memory back to the system: ``gc.collect()``, then glibc's ``malloc_trim``. Between the
    factor passes the process has just freed gigabytes (a GPT-2 small batch's covariances), and freed NumPy
    arrays under glibc's mmap threshold stay resident in its heap, where TensorFlow's allocator (which maps
    its own regions) never reuses them. A no-op where there is no glibc, and when ``freed_bytes`` (about what the
    caller just let go) is under :data:`RELEASE_MIN_BYTES`.

    >>> release_memory(freed_bytes=1024)      # a small model's factors: nothing to give back, no collection
    >>> release_memory()                      # unknown: collect and trim
    """
    if freed_bytes is not None and freed_bytes < RELEASE_MIN_BYTES:
        return
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def nbytes(tree) -> int:
    """The bytes of the arrays in a nested dict / list / tuple / dataclass of NumPy arrays (and tensors).

    >>> nbytes({"a": np.zeros(4), "b": [np.zeros((2, 2), np.float32)]})
    48
    """
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(v) for v in tree)
    if hasattr(tree, "__dataclass_fields__"):
        return sum(nbytes(getattr(tree, f)) for f in tree.__dataclass_fields__)
    size = getattr(tree, "nbytes", None)
    if isinstance(size, (int, np.integer)):
        return int(size)
    try:
        return int(np.prod(tree.shape)) * tree.dtype.size    # a tf.Tensor
    except (AttributeError, TypeError):
        return 0


def per_example_plan(p: int, chunk: int, dtype_size: int = 4) -> MemoryPlan:
    """Per-example gradient blocks ``[chunk, p]`` (:data:`PER_EXAMPLE_COPIES` of them in the vectorised backward
    pass)."""
    return (MemoryPlan("per-example gradients").add("per-example gradient block",
                                                    chunk * p * dtype_size * PER_EXAMPLE_COPIES,
                                                    f"[{chunk}, {p}] × {PER_EXAMPLE_COPIES}")
            .suggest("a smaller batch or chunk_size", "few test points: the forward-mode product (method='jvp')",
                     "a larger memory_budget"))


def index_plan(projector, dataset=None, shard_size: int = 50_000) -> MemoryPlan:
    """Building a gradient index: the projection matrices (float32), the shard being filled (the stored
    dtype plus its float32 copy while encoding: ``shard_size`` rows, or the dataset's examples where it has
    fewer and its size is known) and one batch's products — the captured layer inputs and output gradients
    with the activations that hold them (as a factor fit's first pass), the logits, the projected sides and
    the per-example gradients of the variables no layer covers. It does not grow with the vocabulary beyond
    the projection's ``[vocab, k_in]`` rows and one batch's logits."""
    B, P = _plan_shape(dataset, None)
    plan = MemoryPlan("the gradient index build")
    for name, (p_in, p_out) in projector._block_p.items():   # noqa: SLF001 (the projector's own matrices)
        size = sum(int(p.size) for p in (p_in, p_out) if p is not None)
        if size:
            plan.add(f"projection of '{name}'", size * 4 * 2, "float32, numpy and graph copies")
    stored = {"int8": 1, "float16": 2, "float32": 4}[projector.args.dtype]
    rows = shard_size
    n = dataset_examples(dataset, B) if dataset is not None else None
    if n is not None and n < shard_size:    # 256 sequences fill 256 rows, not 50,000 (1.8 GB at the Llama's 7,680)
        rows = n
    plan.add("index shard buffer", rows * projector.dim * (stored + 4), f"{rows} × {projector.dim}")
    c = _dsize(projector.dtype)
    # the logits once (their gradient is a captured output gradient), and the projected sides
    per_batch = _pass_bytes(projector.blocks, projector.norms, B, P, c, 1, projector.rest)
    per_batch += sum(B * P * (s.get("k_in", 0) + s.get("k_out", 0)) * c * 2 for s in projector.layout)
    plan.add("per-batch products", per_batch, f"batch {B} × {P} positions")
    return plan.suggest("a smaller batch (build_index(batch_size=...))", "a smaller shard_size",
                        "a smaller ProjectionArgs.max_dim", "a larger memory_budget")


def ghost_plan(norms, dataset=None, title: str = "ghost-norm self-influence",
               batch_shape: tuple | None = None) -> MemoryPlan:
    """One batch of ghost-norm self-influence (:class:`tf_influence.ghost_norms.GhostNorms`; also the gradient
    index's calibration pass): the captured layer inputs and output gradients with the activations that hold
    them (as :func:`index_plan`), the logits, the normalisation layers' captured tensors and the vectorised
    per-example gradients of the variables no layer covers — plus the largest block's own temporaries: its two
    ``[B, P, P]`` Gram matrices, or its explicit per-example gradients ``[B, rows, d_out]`` and their squares
    where those are smaller (the pass picks the same). Nothing grows with the corpus: each batch's norms are
    ``[B]`` numbers. ``batch_shape``: ``(B, P)`` where the caller has a batch (else from ``dataset``)."""
    B, P = _plan_shape(dataset, batch_shape)
    c = _dsize(norms.group.dtype)
    plan = MemoryPlan(title)
    plan.add("per-batch products", _pass_bytes(norms.blocks, norms.norms, B, P, c, 1, norms.rest),
             f"batch {B} × {P} positions")
    temp, which = 0, ""
    for b in norms.blocks:
        pos = 2 * P if b.kind == "tied" else P          # a tied table: its lookups and its output projection
        t = 2 * B * pos * pos * c if pos * pos <= b.rows * b.d_out else 2 * B * b.rows * b.d_out * c
        if t > temp:
            temp, which = t, b.name
    if temp:
        plan.add(f"ghost-norm temporaries of '{which}'", temp, "Gram matrices or per-example gradients")
    return plan.suggest("a smaller batch", "fewer layers (si_layers)", "method='per_example' with a small chunk_size",
                        "a larger memory_budget")


def jvp_plan(objective, group, dataset=None, columns: int = 1, batch_shape: tuple | None = None) -> MemoryPlan:
    """Scoring by forward-mode products (:func:`tf_influence.gradients.per_example_dot`, ``method="jvp"``; the
    Beam scoring job's influence scores): with several columns, each column's own copy (``[p]``); per column,
    the tangent split into the group's variables (``[p]``), and one batch's forward pass carrying primal and
    tangent values — every block's input and output, both kinds (as the captured-layer estimate of
    :func:`ghost_plan`), the normalisation layers', and the logits three times (primal, tangent and their
    softmax). The vector itself is the caller's, already allocated. ``batch_shape``: ``(B, P)`` where the
    caller has a batch (else from ``dataset``)."""
    from .kfac.blocks import kronecker_blocks, norm_blocks
    B, P = _plan_shape(dataset, batch_shape)
    c = _dsize(group.dtype)
    blocks, diagonal = kronecker_blocks(objective.model, group)
    norms, _ = norm_blocks(objective.model, diagonal)
    plan = MemoryPlan("scoring by forward-mode products")
    if columns > 1:
        plan.add("columns", columns * group.size * c, f"{columns} × {group.size:,} {_dname(c)}")
    plan.add("tangent per variable", group.size * c, f"{group.size:,} {_dname(c)}, one column at a time")
    plan.add("forward pass with tangents", _pass_bytes(blocks, norms, B, P, c, 3), f"batch {B} × {P} positions")
    return plan.suggest("a smaller batch", "a larger memory_budget")


#: Slot variables per trained variable of Keras' optimizers (``presence_plan``; an optimizer not listed: 2).
OPTIMIZER_SLOTS = {"SGD": 0, "Adam": 2, "AdamW": 2, "Adamax": 2, "Nadam": 2, "Lamb": 2, "Lion": 1, "Adagrad": 1,
                   "RMSprop": 1, "Adadelta": 2, "Ftrl": 2}


def optimizer_slots(optimizer) -> int:
    """Slot variables per trained variable that ``optimizer`` will create (momentum / second moments)."""
    if optimizer is None:
        return 0
    name = type(optimizer).__name__
    slots = OPTIMIZER_SLOTS.get(name, 2)
    if name == "SGD" and float(getattr(optimizer, "momentum", 0.0) or 0.0) > 0:
        slots = 1
    if name == "RMSprop" and float(getattr(optimizer, "momentum", 0.0) or 0.0) > 0:
        slots = 2
    return slots


def presence_plan(model, num_microbatches: int, dataset=None, optimizer=None,
                  batch_shape: tuple | None = None) -> MemoryPlan:
    """One PRESENCE reweighted step (:class:`tf_influence.presence.PresenceModel`): the gradient of every
    microbatch over every trained variable (``[M, p]``, twice: the per-microbatch results and their stacked
    copy), the weighted gradient ``[p]``, the optimizer's slot variables (created at the first step; their
    number from the optimizer's class, :func:`optimizer_slots`), and the forward / backward of the whole
    batch (every microbatch runs in the same step): the captured-layer estimate of :func:`ghost_plan` with
    the logits three times (logits, their softmax and their gradient). The microbatch gradients grow with
    ``M × p``: at GPT-2 small (124 M parameters) four microbatches hold 4 GB."""
    from .kfac.blocks import kronecker_blocks, norm_blocks
    from .params import ParameterGroup
    B, P = _plan_shape(dataset, batch_shape)
    variables = list(model.trainable_variables)
    if not variables:
        return MemoryPlan("a PRESENCE step")
    group = ParameterGroup("trained variables", tuple(variables))
    c = _dsize(group.dtype)
    M = int(num_microbatches)
    plan = MemoryPlan("a PRESENCE step")
    plan.add("microbatch gradients", 2 * M * group.size * c, f"{M} × {group.size:,} {_dname(c)}, and their stacked copy")
    plan.add("weighted gradient", group.size * c, f"{group.size:,} {_dname(c)}")
    slots = optimizer_slots(optimizer)
    if slots and not getattr(optimizer, "built", False):
        plan.add("optimizer slots", slots * group.size * c, f"{type(optimizer).__name__}: {slots} per parameter")
    blocks, diagonal = kronecker_blocks(model, group)
    norms, _ = norm_blocks(model, diagonal)
    plan.add("forward / backward of the batch", _pass_bytes(blocks, norms, B, P, c, 3),
             f"batch {B} × {P} positions, {M} microbatches")
    return plan.suggest("fewer microbatches (num_microbatches)", "a smaller batch",
                        "a larger memory_budget (PresenceModel(memory_budget=...))")


def dataset_examples(dataset, batch: int | None = None) -> int | None:
    """The examples a batched dataset yields where TensorFlow knows its number of batches (a finite cardinality),
    the last batch counted full, else ``None``. ``batch``: its batch size where the caller has it already (else
    :func:`first_batch_shape`)."""
    batches_ = int(dataset.cardinality())
    if batches_ < 0:
        return None
    return batches_ * (first_batch_shape(dataset)[0] if batch is None else int(batch))


__all__ = ["DEFAULT_FRACTION", "MemoryBudgetError", "MemoryItem", "MemoryPlan", "available_bytes", "default_budget",
           "dataset_examples", "dense_plan", "factor_microbatch", "factor_plan", "first_batch_shape", "human", "index_plan",
           "ghost_plan", "jvp_plan", "kfac_inverse_plan", "nbytes", "optimizer_slots", "presence_plan", "parse_bytes", "PER_EXAMPLE_COPIES", "per_example_plan", "release_memory",
           "RELEASE_MIN_BYTES", "resolve_budget", "vectors_plan"]

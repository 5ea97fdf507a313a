"""Inverse Hessian-vector product solvers.

Every solver takes a symmetric linear operator ``H`` (anything with ``matvec([p, k]) -> [p, k]``
and ``shape``, e.g. :class:`~tf_influence.hessian.HessianOperator`, or a dense matrix) and one or
several right-hand sides ``B`` (``[p]`` or ``[p, k]``), and returns a :class:`SolveResult`.

* ``cg``          — conjugate gradients on ``(H + λI) x = b`` (``H`` positive definite).
* ``cg_squared``  — the paper's eq. 16: CG on ``(H² + λI) x = H b``. ``H²`` is positive
  (semi)definite even when ``H`` is indefinite (training stopped short of a minimum), so CG
  applies; for ``λ → 0`` and invertible ``H`` the solution is ``H⁻¹ b``.
* ``lissa``       — the stochastic-free LiSSA recursion ``x_{j+1} = b + (I − (H + λI)/s) x_j``,
  result ``x / s`` (Agarwal et al. 2017, as used by Koh & Liang); needs ``s > λ_max(H) + λ``.
* ``dense``       — builds ``H`` explicitly and calls ``numpy.linalg.solve``; refuses above
  ``max_params``. ``squared=True`` solves the eq. 16 system densely.
* ``identity``    — replaces ``H⁻¹`` by ``I`` (the paper's identity-Hessian baseline).
* ``auto``        — the package default: ``dense_squared`` for small systems, ``cg_squared`` for
  medium ones, ``ekfac`` for large model blocks (:func:`auto_choice`); ``SolveResult.method`` and
  ``extra["auto"]`` say what ran and why.
* ``ekfac`` / ``kfac`` — Kronecker-factored curvature (:mod:`tf_influence.kfac`): factors fitted once
  on the operator's data, then every solve is a few small matrix products; options ``fisher``
  (``"true"`` / ``"empirical"``), ``relative_damping``, ``factors`` (fitted or saved ones),
  ``max_examples`` (fit the factors on the first N examples only).

Residuals are relative: ``‖A x − r‖ / ‖r‖`` of the system actually solved (``A = H + λI``,
``r = b`` for cg / lissa / dense; ``A = H² + λI``, ``r = H b`` for cg_squared). A solve whose
residual exceeds ``tol`` warns with :class:`SolverNotConvergedWarning`, or raises
:class:`SolverNotConvergedError` with ``on_nonconvergence="raise"``.

:func:`solve` also runs the curvature diagnostics of :mod:`tf_influence.diagnostics` after every
solve that uses a Hessian: ``SolveResult.extra["curvature"]`` holds the extreme eigenvalues (exact
from the explicit matrix of a dense solve, from the fitted factors of an EK-FAC solve, 10 Lanczos
steps on at most 1,000 examples after an iterative one; ``SolverConfig.curvature_iterations``) and
the damping relative to them, and a :class:`~tf_influence.diagnostics.CurvatureWarning` says when the
Hessian is indefinite at a scale that matters or the damping dominates it.
"""

from __future__ import annotations

import warnings
from dataclasses import MISSING, dataclass, field, fields

import numpy as np
import tensorflow as tf

from .configs import JsonConfig, dataclass_from_dict  # re-exported: it lived here
from .errors import require_finite
from .kfac.products import DEFAULT_PRODUCT_DTYPE, PRODUCT_DTYPE_HELP, PRODUCT_DTYPES


class SolverNotConvergedError(RuntimeError):
    """An iterative solve stopped above its tolerance and the caller asked to raise."""


class SolverNotConvergedWarning(UserWarning):
    """An iterative solve stopped above its tolerance."""


@dataclass
class SolveResult:
    """Solution ``x`` (same shape as the right-hand side) and diagnostics."""

    x: tf.Tensor
    method: str
    iterations: int
    relative_residual: np.ndarray  # one value per right-hand side
    converged: bool
    damping: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"method": self.method, "iterations": int(self.iterations),
                "max_relative_residual": float(np.max(self.relative_residual)) if self.relative_residual.size else 0.0,
                "converged": bool(self.converged), "damping": float(self.damping), **self.extra}


class DenseOperator:
    """Wrap an explicit symmetric matrix as an operator (tests, tiny models)."""

    def __init__(self, matrix, name: str = "dense matrix"):
        self.matrix = tf.convert_to_tensor(matrix)
        self.shape = tuple(self.matrix.shape)
        self.dtype = self.matrix.dtype
        self.name = name

    def matvec(self, v):
        v = tf.cast(v, self.dtype)
        return tf.linalg.matvec(self.matrix, v) if v.shape.rank == 1 else self.matrix @ v

    def to_dense(self, max_params: int = 4096):
        return self.matrix.numpy()


def _prepare(op, b, dtype):
    b = tf.convert_to_tensor(b)
    was_vector = b.shape.rank == 1
    B = b[:, None] if was_vector else b
    if B.shape.rank != 2 or B.shape[0] != op.shape[1]:
        raise ValueError(f"right-hand side has shape {tuple(b.shape)}, operator {getattr(op, 'name', '')} "
                         f"expects {op.shape[1]} rows")
    require_finite(B, f"right-hand side of the solve with {getattr(op, 'name', 'operator')}")
    op_dtype = getattr(op, "dtype", B.dtype)
    compute = tf.as_dtype(dtype) if dtype is not None else tf.as_dtype(op_dtype)

    def apply(V):
        return tf.cast(op.matvec(tf.cast(V, op_dtype)), compute)

    return tf.cast(B, compute), was_vector, apply, op_dtype


def _finish(X, was_vector, out_dtype, method, iters, res, tol, damping, on_nonconvergence, name, extra=None):
    res = np.asarray(res, dtype=np.float64).reshape(-1)
    require_finite(res, f"{method} solve with {name}: residuals (is the operator finite?)")
    require_finite(X, f"{method} solve with {name}: result (is the operator finite?)")
    converged = bool(np.all(res <= tol))
    if not converged:
        msg = (f"{method} with {name} did not converge: relative residual {res.max():.3e} > tol {tol:.1e} "
               f"after {iters} iterations (damping {damping:g}); increase max_iter or damping")
        if on_nonconvergence == "raise":
            raise SolverNotConvergedError(msg)
        if on_nonconvergence == "warn":
            warnings.warn(msg, SolverNotConvergedWarning, stacklevel=3)
    X = tf.cast(X, out_dtype)
    return SolveResult(X[:, 0] if was_vector else X, method, iters, res, converged, damping, extra or {})


def _col_norms(M):
    return tf.sqrt(tf.reduce_sum(M * M, axis=0))


def _batched_cg(apply_A, R0, tol, max_iter, progress=None, max_restarts=3):
    """CG on an SPD operator for each column of R0 (independent step sizes per column).

    The recursively updated residual drifts from the true one in low precision; when the
    recursion reports convergence but the true residual ``‖A x − b‖`` does not, CG restarts
    from the current ``x`` (residual replacement), at most ``max_restarts`` times.

    Returns (X, iterations, true relative residual per column)."""
    X = tf.zeros_like(R0)
    bnorm = _col_norms(R0)
    safe = tf.where(bnorm > 0, bnorm, tf.ones_like(bnorm))
    R = tf.identity(R0)
    it = 0
    for _restart in range(max_restarts + 1):
        P = tf.identity(R)
        rs = tf.reduce_sum(R * R, axis=0)
        rel = _col_norms(R) / safe
        while it < max_iter and bool(tf.reduce_any(rel > tol)):
            active = tf.cast(rel > tol, R0.dtype)
            AP = apply_A(P)
            pAp = tf.reduce_sum(P * AP, axis=0)
            if bool(tf.reduce_any((pAp <= 0) & (active > 0))):
                raise np.linalg.LinAlgError(
                    "CG met a non-positive curvature pᵀAp ≤ 0: the system is not positive definite; "
                    "use solver='cg_squared' (eq. 16) or increase damping")
            alpha = tf.where(active > 0, rs / tf.where(pAp > 0, pAp, tf.ones_like(pAp)), tf.zeros_like(rs))
            X = X + alpha * P
            R = R - alpha * AP
            rs_new = tf.reduce_sum(R * R, axis=0)
            beta = tf.where(rs > 0, rs_new / tf.where(rs > 0, rs, tf.ones_like(rs)), tf.zeros_like(rs))
            P = R + beta * P
            rs = rs_new
            it += 1
            rel = _col_norms(R) / safe
            if progress is not None:
                progress(it, float(tf.reduce_max(rel)))
        R = R0 - apply_A(X)
        true_rel = (_col_norms(R) / safe).numpy()
        if np.all(true_rel <= tol) or it >= max_iter:
            break
    return X, it, true_rel


def _check_vectors(op, B, count: int, method: str, memory_budget) -> None:
    """Refuse before iterating when ``count`` working ``[p, k]`` vectors exceed the memory budget."""
    from .memory import vectors_plan
    vectors_plan(int(B.shape[0]), int(B.shape[1]), count, f"{method} with {getattr(op, 'name', 'operator')}",
                 B.dtype.size).check(memory_budget)


def cg(op, b, damping: float = 0.0, tol: float = 1e-6, max_iter: int = 200, dtype=None,
       on_nonconvergence: str = "warn", progress=None, memory_budget=None) -> SolveResult:
    """Conjugate gradients on ``(H + λI) x = b`` for positive-definite ``H + λI``."""
    B, was_vector, apply, out_dtype = _prepare(op, b, dtype)
    _check_vectors(op, B, 8, "cg", memory_budget)
    X, it, res = _batched_cg(lambda V: apply(V) + damping * V, B, tol, max_iter, progress)
    return _finish(X, was_vector, out_dtype, "cg", it, res, tol, damping, on_nonconvergence,
                   getattr(op, "name", "operator"))


def cg_squared(op, b, damping: float = 0.0, tol: float = 1e-6, max_iter: int = 200, dtype=None,
               on_nonconvergence: str = "warn", progress=None, memory_budget=None) -> SolveResult:
    """The paper's eq. 16: CG on ``(H² + λI) x = H b``; works for indefinite symmetric ``H``."""
    B, was_vector, apply, out_dtype = _prepare(op, b, dtype)
    _check_vectors(op, B, 10, "cg_squared", memory_budget)
    HB = apply(B)
    X, it, res = _batched_cg(lambda V: apply(apply(V)) + damping * V, HB, tol, max_iter, progress)
    return _finish(X, was_vector, out_dtype, "cg_squared", it, res, tol, damping, on_nonconvergence,
                   getattr(op, "name", "operator"))


def lissa(op, b, damping: float = 0.0, scale: float | None = None, tol: float = 1e-6, max_iter: int = 1000,
          dtype=None, on_nonconvergence: str = "warn", progress=None, check_every: int = 10,
          memory_budget=None) -> SolveResult:
    """LiSSA: ``x_{j+1} = b + (I − (H + λI)/s) x_j``, ``x = x_J / s``.

    Converges when ``0 < λ_min(H)+λ`` and ``λ_max(H)+λ < 2s``. ``scale=None`` estimates
    ``λ_max`` by 20 power iterations and uses ``s = 1.1 (λ_max + λ)``.
    """
    B, was_vector, apply, out_dtype = _prepare(op, b, dtype)
    _check_vectors(op, B, 8, "lissa", memory_budget)
    A = lambda V: apply(V) + damping * V  # noqa: E731
    if scale is None:
        v = tf.random.stateless_normal([B.shape[0], 1], seed=[0, 1], dtype=B.dtype)
        lam = tf.constant(1.0, B.dtype)
        for _ in range(20):
            w = A(v)
            lam = tf.norm(w)
            v = w / tf.where(lam > 0, lam, tf.ones_like(lam))
        scale = 1.1 * float(lam)
    bnorm = _col_norms(B)
    safe = tf.where(bnorm > 0, bnorm, tf.ones_like(bnorm))
    H = tf.identity(B)
    it, rel = 0, np.full(B.shape[1], np.inf)
    while it < max_iter:
        H = B + H - A(H) / scale
        it += 1
        if it % check_every == 0 or it == max_iter:
            rel = (_col_norms(A(H / scale) - B) / safe).numpy()
            if progress is not None:
                progress(it, float(rel.max()))
            if np.all(rel <= tol):
                break
    return _finish(H / scale, was_vector, out_dtype, "lissa", it, rel, tol, damping, on_nonconvergence,
                   getattr(op, "name", "operator"), {"scale": float(scale)})


def dense(op, b, damping: float = 0.0, squared: bool = False, max_params: int = 4096, dtype=tf.float64,
          on_nonconvergence: str = "warn", tol: float = 1e-6, memory_budget=None) -> SolveResult:
    """Exact solve with the explicit matrix (``np.linalg.solve``); refuses above ``max_params``, and
    before building the matrix when it does not fit ``memory_budget`` (:mod:`tf_influence.memory`)."""
    p = op.shape[0]
    if p > max_params:
        raise ValueError(f"dense solver refuses a {p}×{p} system (max_params={max_params}); "
                         "use solver='cg', 'cg_squared' or 'lissa'")
    from .memory import dense_plan
    dense_plan(int(p), 1 if tf.convert_to_tensor(b).shape.rank == 1 else int(b.shape[1]),
               getattr(op, "name", "operator")).check(memory_budget)
    B, was_vector, _, out_dtype = _prepare(op, b, tf.float64)
    Hm = np.asarray(op.to_dense(max_params=max_params), dtype=np.float64)
    Hm = 0.5 * (Hm + Hm.T)
    eig = np.linalg.eigvalsh(Hm)
    Bn = B.numpy()
    if squared:
        A, R = Hm @ Hm + damping * np.eye(p), Hm @ Bn
    else:
        A, R = Hm + damping * np.eye(p), Bn
    try:
        X = np.linalg.solve(A, R)
    except np.linalg.LinAlgError as err:
        raise np.linalg.LinAlgError(f"dense solve with {getattr(op, 'name', 'operator')} failed: {err}; "
                                    "add damping") from None
    rnorm = np.linalg.norm(R, axis=0)
    res = np.linalg.norm(A @ X - R, axis=0) / np.where(rnorm > 0, rnorm, 1.0)
    out = _finish(tf.constant(X), was_vector, out_dtype, "dense_squared" if squared else "dense", 1, res,
                  max(tol, 1e-8), damping, on_nonconvergence, getattr(op, "name", "operator"))
    out.extra["spectrum"] = (float(eig[0]), float(eig[-1]), "dense")  # read by solve()'s diagnostics
    return out


#: The attribute of an operator under which :func:`kronecker` keeps the factors it fitted on it.
_FACTOR_CACHE = "kfac_factors"


def kronecker(op, b, damping: float = 0.0, kind: str = "ekfac", fisher: str = "true", relative_damping: float = 0.0,
              factors=None, seed: int = 0, progress=None, on_nonconvergence: str = "warn", tol: float = 0.0,
              max_examples: int | None = None, dense_factor_max: int | None = None,
              memory_budget=None, covariance_max_examples: int | None = None,
              product_dtype: str = DEFAULT_PRODUCT_DTYPE) -> SolveResult:
    """(E)K-FAC: ``(F̂ + D + λ)⁻¹ b`` with Kronecker-factored curvature fitted on the operator's data
    (:mod:`tf_influence.kfac`); ``D`` = the exact L2-regulariser Hessian and the operator's extra
    diagonal, ``λ = damping + relative_damping × mean eigenvalue`` per block.

    ``op`` must be a square :class:`~tf_influence.hessian.HessianOperator` block (the factors need its
    objective, data and parameter group). Factors are fitted once per operator (cached on it) unless
    ``factors`` (a :class:`~tf_influence.kfac.KFACFactors` or a directory saved by it) is given;
    ``max_examples`` caps the examples they are fitted on, ``covariance_max_examples`` those of the covariances
    only, ``product_dtype`` the dtype of the fit's large products (see :func:`~tf_influence.kfac.fit_factors`).
    No iteration, so no residual: ``relative_residual`` is NaN and ``converged`` True."""
    from . import kfac
    if getattr(op, "rows", None) is None or op.rows.variables != op.cols.variables:
        raise ValueError(f"{kind} needs a square Hessian block of a model (a HessianOperator), got "
                         f"{getattr(op, 'name', type(op).__name__)}")
    model = op.objective.model
    if isinstance(factors, str):
        factors = kfac.KFACFactors.load(factors)
    if factors is None:
        cache = op.__dict__.setdefault(_FACTOR_CACHE, {})
        dense_factor_max = kfac.dense_factor_limit(dense_factor_max)
        key = (kind, fisher, seed, max_examples, dense_factor_max, covariance_max_examples, product_dtype)
        if key not in cache:
            cache[key] = kfac.fit_factors(op.objective, op.dataset, op.rows, kind=kind, fisher=fisher, seed=seed,
                                          progress=progress is not None, name=f"dataset of {op.name}",
                                          max_examples=max_examples, dense_factor_max=dense_factor_max,
                                          memory_budget=memory_budget,
                                          covariance_max_examples=covariance_max_examples,
                                          product_dtype=product_dtype)
        factors = cache[key]
    b = tf.convert_to_tensor(b)
    from .memory import vectors_plan
    vectors_plan(int(op.shape[0]), 1 if b.shape.rank == 1 else int(b.shape[1]), 3,
                 f"the {kind} inverse of {op.name}").check(memory_budget)
    inverse = kfac.KFACInverse(factors, model, op.rows, damping=damping, relative_damping=relative_damping,
                               extra_diagonal=op.extra_diagonal)
    require_finite(b, f"right-hand side of the {kind} solve with {op.name}")
    x = tf.cast(inverse(b), op.dtype)
    k = 1 if b.shape.rank == 1 else b.shape[1]
    return SolveResult(x, kind, 0, np.full(k, np.nan), True, damping,
                       {"relative_damping": relative_damping, "fisher": factors.fisher, **factors.summary(),
                        "unmodelled_regularizers": inverse.unmodelled,
                        "factor_sides": {k: [("diagonal" if not np.size(v["QA"]) else "dense"),
                                             ("diagonal" if not np.size(v["QS"]) else "dense")]
                                         for k, v in factors.blocks.items()},
                        "spectrum": (*inverse.spectrum(), kind)})


def forget_factors(op) -> None:
    """Drop the (E)K-FAC factors :func:`kronecker` fitted on ``op`` and keeps for its next solve (a later
    solve with ``op`` fits them again), and give their memory back to the system. The factors are NumPy
    arrays, many under glibc's mmap threshold: freed, they stay resident in its heap, where TensorFlow's
    allocator (which maps its own regions) never reuses them — so without the trim case 2's pretraining
    fit started gigabytes above case 1's at GPT-2 small."""
    cached = op.__dict__.pop(_FACTOR_CACHE, None)
    if cached is not None:
        from .memory import nbytes, release_memory
        release_memory(nbytes(cached))


def identity(op, b) -> SolveResult:
    """``H⁻¹ ≈ I``: the paper's identity-Hessian baseline (Section 4.1, Figure 3)."""
    b = tf.convert_to_tensor(b)
    k = 1 if b.shape.rank == 1 else b.shape[1]
    return SolveResult(b, "identity", 0, np.zeros(k), True, 0.0)


#: ``solver="auto"``: an explicit (squared, eq. 16) solve up to this many parameters …
AUTO_DENSE_MAX = 2048
#: … and EK-FAC above it for a model's Hessian block (``cg_squared`` where no model block is known).
#: Measured on keras-hub GPT-2 LMs of 5k–17k parameters (``benchmarks/hub.py --quick``): 200
#: ``cg_squared`` iterations took 400 s (1,100 training epochs) and did not converge, EK-FAC took
#: seconds and tracked leave-one-out better — no middle band where plain-vector CG pays.
AUTO_KRONECKER_MIN = AUTO_DENSE_MAX + 1


def auto_choice(op, dense_max: int = AUTO_DENSE_MAX, kronecker_min: int | None = None, memory_budget=None,
                dense_factor_max: int | None = None, columns: int = 1) -> tuple:
    """``(method, reason)`` that ``solver="auto"`` picks for ``op``, within ``memory_budget``.

    * ``p ≤ dense_max`` (finetuning heads, small models): ``dense_squared`` — the eq. 16 system
      ``(H² + λI) x = H b`` solved exactly from the explicit block (``⌈p/256⌉`` vectorised passes);
    * ``p ≥ kronecker_min`` on a model's Hessian block: ``ekfac`` — factors fitted in two passes,
      then every solve is a few small products (CG on a 97k-parameter transformer took 179 training
      epochs, EK-FAC 12);
    * otherwise (an operator that is not a model's square Hessian block, or ``kronecker_min`` set
      higher): ``cg_squared`` (eq. 16).

    Never plain CG: a Hessian of a model stopped short of a minimum is indefinite.
    ``kronecker_min`` defaults to ``dense_max + 1``, except on an operator that names a reason not to
    approximate it (its ``avoid_kronecker`` attribute — multi-stage influence sets it on the case-1
    finetuning head, whose inverse feeds a near-cancellation): there the default is never EK-FAC, and
    an explicit ``kronecker_min`` still decides.

    Memory (:mod:`tf_influence.memory`): a choice whose plan does not fit ``memory_budget`` (the
    explicit matrix of ``dense_squared``, the EK-FAC factors with vocabulary-sized sides kept
    diagonal above ``dense_factor_max``) is passed over for the next one, and the reason says so;
    when nothing fits, :class:`~tf_influence.memory.MemoryBudgetError` is raised before any work."""
    from .memory import MemoryBudgetError, dense_plan, factor_plan, human, resolve_budget, vectors_plan
    budget = resolve_budget(memory_budget)
    avoid = getattr(op, "avoid_kronecker", None)
    p = int(op.shape[0])
    notes = []
    if kronecker_min is None and avoid:
        allow_kronecker = False
    else:
        kronecker_min = dense_max + 1 if kronecker_min is None else kronecker_min
        allow_kronecker = True
    kfac_ok = getattr(op, "rows", None) is not None and getattr(op, "objective", None) is not None and \
        op.rows.variables == op.cols.variables
    if p <= dense_max:
        plan = dense_plan(p, columns, getattr(op, "name", "operator"))
        if plan.total <= budget:
            return "dense_squared", f"p = {p} ≤ {dense_max}: exact eq. 16 solve"
        notes.append(f"the explicit {p}×{p} system needs {human(plan.total)} > budget {human(budget)}")
    if allow_kronecker and p >= kronecker_min and kfac_ok:
        from .kfac import FactorStatistics, dense_factor_limit
        stats = FactorStatistics(op.objective, op.rows, dense_factor_max=dense_factor_limit(dense_factor_max))
        plan = factor_plan(stats, op.dataset)
        if plan.total <= budget:
            diag = [b.name for b in stats.blocks if (b.diag_in and b.kind != "embedding") or b.diag_out]
            return "ekfac", (f"p = {p} ≥ {kronecker_min}: Kronecker-factored curvature (factors {human(plan.total)})"
                             + (f"; vocabulary-sized sides kept diagonal: {diag}" if diag else ""))
        notes.append(f"EK-FAC factors need {human(plan.total)} > budget {human(budget)} "
                     f"(largest: {plan.largest(1)[0].name} {human(plan.largest(1)[0].nbytes)})")
    plan = vectors_plan(p, columns, 10, f"cg_squared with {getattr(op, 'name', 'operator')}", 8)
    if plan.total > budget:
        raise MemoryBudgetError(plan.message(budget) + (" — and " + "; ".join(notes) if notes else ""), plan, budget)
    if p <= dense_max or (allow_kronecker and kfac_ok and p >= kronecker_min):
        reason = f"p = {p}"                                    # passed over for memory: the notes say why
    elif not allow_kronecker:
        reason = f"{dense_max} < p = {p}; not EK-FAC: {avoid}"
    elif not kfac_ok:
        reason = f"{dense_max} < p = {p} (no model block for EK-FAC)"
    else:
        reason = f"{dense_max} < p = {p} < {kronecker_min}"
    return "cg_squared", reason + ("; " + "; ".join(notes) if notes else "")


def auto(op, b, damping: float = 0.0, tol: float = 1e-5, max_iter: int = 200, dtype=None,
         on_nonconvergence: str = "warn", progress=None, dense_max: int = AUTO_DENSE_MAX,
         kronecker_min: int | None = None, fisher: str = "true", relative_damping: float = 0.0, factors=None,
         max_examples: int | None = None, seed: int = 0, dense_factor_max: int | None = None,
         memory_budget=None, covariance_max_examples: int | None = None,
         product_dtype: str = DEFAULT_PRODUCT_DTYPE) -> SolveResult:
    """Pick the solver by the size of the system and the memory budget (:func:`auto_choice`) and run
    it; the result's ``method`` is the solver that ran and ``extra["auto"]`` says why. ``fisher``,
    ``relative_damping``, ``factors``, ``max_examples``, ``covariance_max_examples``, ``seed``,
    ``dense_factor_max`` and ``product_dtype`` go to EK-FAC when it is chosen."""
    columns = 1 if tf.convert_to_tensor(b).shape.rank == 1 else int(b.shape[1])
    method, reason = auto_choice(op, dense_max, kronecker_min, memory_budget, dense_factor_max, columns)
    common = dict(damping=damping, tol=tol, on_nonconvergence=on_nonconvergence, memory_budget=memory_budget)
    if method == "dense_squared":
        res = dense(op, b, squared=True, max_params=max(dense_max, int(op.shape[0])), **common)
    elif method == "ekfac":
        res = kronecker(op, b, kind="ekfac", progress=progress, fisher=fisher, relative_damping=relative_damping,
                        factors=factors, max_examples=max_examples, seed=seed, dense_factor_max=dense_factor_max,
                        covariance_max_examples=covariance_max_examples, product_dtype=product_dtype, **common)
    else:
        res = cg_squared(op, b, max_iter=max_iter, dtype=dtype, progress=progress, **common)
    res.extra["auto"] = {"chose": method, "why": reason}
    return res


def solve_plan(op, config: "SolverConfig | None" = None, columns: int = 1):
    """``(method, MemoryPlan)`` of solving with ``op`` under ``config`` (``auto`` resolved by
    :func:`auto_choice`, which raises :class:`~tf_influence.memory.MemoryBudgetError` when nothing
    fits): what the solve will allocate, for a caller that checks a whole computation up front."""
    from .memory import MemoryPlan, dense_plan, factor_plan, kfac_inverse_plan, vectors_plan
    config = config or SolverConfig()
    p = int(op.shape[0])
    method = config.method
    if method == "auto":
        method, _ = auto_choice(op, config.auto.dense_max, config.auto.kronecker_min, config.memory_budget,
                                config.kronecker.dense_factor_max, columns)
    name = getattr(op, "name", "operator")
    if method in ("dense", "dense_squared"):
        return method, dense_plan(p, columns, name)
    if method in ("ekfac", "kfac") and config.kronecker.factors is None:
        from .kfac import FactorStatistics, dense_factor_limit
        stats = FactorStatistics(op.objective, op.rows, kind=method,
                                 dense_factor_max=dense_factor_limit(config.kronecker.dense_factor_max),
                                 product_dtype=config.kronecker.product_dtype)
        return method, factor_plan(stats, op.dataset).extend(kfac_inverse_plan(stats, p, columns))
    if method in ("ekfac", "kfac"):
        return method, vectors_plan(p, columns, 3, f"the {method} inverse of {name}")
    if method == "identity":
        return method, MemoryPlan(f"identity with {name}")
    return method, vectors_plan(p, columns, 10, f"{method} with {name}")


SOLVERS = {"cg": cg, "cg_squared": cg_squared, "lissa": lissa, "dense": dense, "identity": identity,
           "dense_squared": lambda op, b, **kw: dense(op, b, squared=True, **kw),
           "ekfac": lambda op, b, **kw: kronecker(op, b, kind="ekfac", **kw),
           "kfac": lambda op, b, **kw: kronecker(op, b, kind="kfac", **kw), "auto": auto}


#: Damping λ of the pretraining Hessian solve ``(∂²G)⁻¹`` — and of any :class:`SolverConfig` that does
#: not set one. Chosen from the digits reproduction's damping grid against leave-one-out retraining:
#: with finetuning damping 1e-3, pretraining damping 1e-2 / 1e-3 / 1e-4 gave r = 0.82 / 0.94 / 0.97;
#: 1e-3 is the middle of the good range (1e-4 needs more CG iterations on indefinite Hessians).
DEFAULT_PRETRAIN_DAMPING = 1e-3

#: Damping of the finetuning solve, ``(∂²F/∂Θ²)⁻¹`` (case 1) or the eq. 15 block (case 2). In the
#: same grid 1e-3 beat 1e-6 at every pretraining damping in case 1 (0.82 / 0.94 / 0.97 vs
#: 0.60 / 0.81 / 0.68), and in case 2 (r = 0.59 vs 0.42): the finetuning Hessians of runs stopped
#: short of convergence have near-zero and negative eigenvalues that a tiny damping amplifies.
DEFAULT_FINETUNE_DAMPING = 1e-3

# -- the configuration: common fields, and one small typed class of options per solver family ---------------
class _Options(JsonConfig):
    """The repr of a configuration shows what differs from its defaults (``SolverConfig(method='ekfac',
    kronecker=KroneckerOptions(fisher='empirical'))``), not every field of every family."""

    def __repr__(self):
        default = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(self)
                   if f.default is not MISSING or f.default_factory is not MISSING}
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if f.name not in default or f.name == "method" or getattr(self, f.name) != default[f.name]]
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(repr=False)
class IterativeOptions(_Options):
    """Options of the iterative solvers (``cg``, ``cg_squared``, ``lissa``; ``auto`` when it picks
    ``cg_squared``).

    >>> SolverConfig("cg", iterative=IterativeOptions(max_iter=50)).iterative.max_iter
    50
    """

    max_iter: int = field(default=200, metadata={"help": "iterations of cg / cg_squared / lissa"})
    dtype: object = field(default=None, metadata={"help": "compute dtype of iterative solves (None: the operator's)"})
    scale: float | None = field(default=None, metadata={"help": "lissa only: s > λ_max + λ (None: power iteration)"})

    def __post_init__(self):
        if int(self.max_iter) < 0:
            raise ValueError(f"max_iter must be ≥ 0, got {self.max_iter}")

    def to_dict(self) -> dict:
        return {"max_iter": self.max_iter, "dtype": None if self.dtype is None else tf.as_dtype(self.dtype).name,
                "scale": self.scale}


@dataclass(repr=False)
class DenseOptions(_Options):
    """Options of the explicit solves (``dense``, ``dense_squared``)."""

    max_params: int = field(default=4096, metadata={"help": "dense: largest system built explicitly"})


@dataclass(repr=False)
class KroneckerOptions(_Options):
    """Options of the Kronecker-factored solvers (``ekfac``, ``kfac``; ``auto`` when it picks ``ekfac``).

    >>> SolverConfig("ekfac", kronecker=KroneckerOptions(fisher="empirical")).kronecker.fisher
    'empirical'
    """

    fisher: str = field(default="true", metadata={"help": "'true' (sampled labels) or 'empirical'"})
    relative_damping: float = field(default=0.0, metadata={
        "help": "extra damping × the mean eigenvalue of each block"})
    factors: object = field(default=None, metadata={
        "help": "fitted KFACFactors or the directory they were saved to (None: fit them)"})
    max_examples: int | None = field(default=None, metadata={
        "help": "fit the factors on the first N examples (None: all the operator's)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampled labels"})
    dense_factor_max: int | None = field(default=None, metadata={
        "help": "a Kronecker factor side larger than this (a vocabulary) is kept diagonal instead of a dense "
                "covariance and eigendecomposition (None: tf_influence.kfac.DENSE_FACTOR_MAX, 4,096)"})
    covariance_max_examples: int | None = field(default=None, metadata={
        "help": "EK-FAC: fit the covariances (the eigenbases) on the first N examples, the eigenvalue correction "
                "still on all (None: all)"})
    product_dtype: str = field(default=DEFAULT_PRODUCT_DTYPE, metadata={"help": PRODUCT_DTYPE_HELP,
                                                                      "choices": PRODUCT_DTYPES})

    def __post_init__(self):
        from .kfac.products import check_product_dtype
        check_product_dtype(self.product_dtype, "KroneckerOptions.product_dtype")
        if self.fisher not in ("true", "empirical"):
            raise ValueError(f"fisher must be 'true' or 'empirical', got '{self.fisher}'")
        for what in ("max_examples", "covariance_max_examples"):
            if getattr(self, what) is not None and getattr(self, what) < 1:
                raise ValueError(f"{what} must be a positive number of examples, got {getattr(self, what)}")
        if self.dense_factor_max is not None and int(self.dense_factor_max) < 1:
            raise ValueError(f"dense_factor_max must be ≥ 1 or None, got {self.dense_factor_max}")

    def to_dict(self) -> dict:
        from .kfac import KFACFactors
        if isinstance(self.factors, KFACFactors):
            raise ValueError("SolverConfig.to_json: factors is a KFACFactors object; save it "
                             "(factors.save(directory)) and pass the directory")
        return super().to_dict()


@dataclass(repr=False)
class AutoOptions(_Options):
    """Where ``auto`` changes solver (:func:`auto_choice`)."""

    dense_max: int = field(default=2048, metadata={"help": "dense eq. 16 solve up to this many parameters"})
    kronecker_min: int | None = field(default=None, metadata={
        "help": "EK-FAC from this many parameters (None: dense_max + 1)"})


#: Each solver family's options: the :class:`SolverConfig` field that holds them and their class.
FAMILIES = {"iterative": IterativeOptions, "dense": DenseOptions, "kronecker": KroneckerOptions, "auto": AutoOptions}
#: The families each solver reads (``identity`` reads none; ``auto`` reads every family it may choose).
SOLVER_FAMILIES = {
    "cg": ("iterative",), "cg_squared": ("iterative",), "lissa": ("iterative",),
    "dense": ("dense",), "dense_squared": ("dense",), "identity": (),
    "ekfac": ("kronecker",), "kfac": ("kronecker",), "auto": ("iterative", "kronecker", "auto"),
}
_COMMON = ("damping", "tol", "on_nonconvergence", "memory_budget")
#: The keyword arguments each solver function of :data:`SOLVERS` takes from a :class:`SolverConfig` (its
#: common fields and its families' fields; ``scale`` is LiSSA's alone).
SOLVER_FIELDS = {m: () if m == "identity" else
                 _COMMON + tuple(f.name for fam in fams for f in fields(FAMILIES[fam])
                                 if f.name != "scale" or m == "lissa")
                 for m, fams in SOLVER_FAMILIES.items()}
#: Deprecated (0.3): a family option given as a keyword of :class:`SolverConfig` itself — its family.
FLAT_OPTIONS = {f.name: fam for fam, cls in FAMILIES.items() for f in fields(cls)}


def _by_family(flat: dict) -> dict:
    """``{family: {option: value}}`` of options named without their family."""
    out = {}
    for k, v in flat.items():
        out.setdefault(FLAT_OPTIONS[k], {})[k] = v
    return out


def _with_flat(given: dict, flat: dict) -> dict:
    """``given`` (``{family: options or None}``) with the options of ``flat`` set in their families (over a
    family object given too: ``dataclasses.replace(cfg, max_iter=5)`` passes both)."""
    from dataclasses import replace
    given = dict(given)
    for fam, kw in _by_family(flat).items():
        given[fam] = FAMILIES[fam](**kw) if given[fam] is None else replace(given[fam], **kw)
    return given


@dataclass(init=False, repr=False)
class SolverConfig(_Options):
    """How to invert one Hessian: the solver, its damping λ, the fields every solver reads, and one
    small typed options object per solver family — :class:`IterativeOptions`, :class:`DenseOptions`,
    :class:`KroneckerOptions`, :class:`AutoOptions`. A family the chosen solver does not read must stay
    at its defaults (``SolverConfig("cg", kronecker=KroneckerOptions(fisher="empirical"))`` raises) —
    except the iterative ``max_iter`` / ``dtype``, which the other solvers ignore, so that a configuration
    can switch its method (LiSSA's ``scale`` is policed) —, and
    :meth:`to_json` / :meth:`from_json` carry a configuration whole through a TFX component or a CLI.

    >>> cfg = SolverConfig("ekfac", damping=1e-4, kronecker=KroneckerOptions(fisher="empirical"))
    >>> SolverConfig.from_json(cfg.to_json()) == cfg
    True
    >>> SolverConfig("cg", kronecker=KroneckerOptions(fisher="empirical"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: SolverConfig(method='cg'): the kronecker options (fisher) do not apply to 'cg' (read by: ...)

    The family options as keywords of ``SolverConfig`` itself (``SolverConfig("cg", max_iter=50)``), and
    reading them from it (``cfg.max_iter``), are deprecated aliases of the family form (removed in 0.4).
    """

    method: str = field(default="auto", metadata={"help": f"solver: one of {sorted(SOLVER_FAMILIES)}"})
    damping: float = field(default=DEFAULT_PRETRAIN_DAMPING, metadata={"help": "damping λ added to the system"})
    tol: float = field(default=1e-5, metadata={"help": "relative residual an iterative solve must reach"})
    on_nonconvergence: str = field(default="warn", metadata={"help": "'warn', 'raise' or 'ignore'"})
    #: Curvature diagnostics (:mod:`tf_influence.diagnostics`) after the solve — extreme eigenvalues,
    #: damping relative to them, :class:`CurvatureWarning`. ``None``: from what the solve already has
    #: (the explicit matrix of ``dense*``, the fitted factors of ``ekfac`` / ``kfac``; no extra pass)
    #: and 10 Lanczos steps after an iterative one; ``n > 0``: ``n`` Lanczos steps on the Hessian
    #: itself whatever the solver (on an EK-FAC solve this also sees negative curvature the factored
    #: Fisher cannot show; each step is one Hessian-vector product); ``0`` = off.
    curvature_iterations: int | None = field(default=None, metadata={
        "help": "curvature diagnostics: None = from the solve, n = n Lanczos steps, 0 = off"})
    memory_budget: object = field(default=None, metadata={
        "help": "memory the solve may allocate: bytes, '8GB', or a fraction of the available memory (None: "
                "70 % of it, or $TF_INFLUENCE_MEMORY_BUDGET); a solve whose plan exceeds it is refused before "
                "it starts, and auto chooses within it"})
    iterative: IterativeOptions = field(default_factory=IterativeOptions, metadata={
        "help": "cg / cg_squared / lissa (and auto): IterativeOptions"})
    dense: DenseOptions = field(default_factory=DenseOptions, metadata={"help": "dense / dense_squared: DenseOptions"})
    kronecker: KroneckerOptions = field(default_factory=KroneckerOptions, metadata={
        "help": "ekfac / kfac (and auto): KroneckerOptions"})
    auto: AutoOptions = field(default_factory=AutoOptions, metadata={"help": "auto: AutoOptions"})

    def __init__(self, method: str = "auto", damping: float = DEFAULT_PRETRAIN_DAMPING, tol: float = 1e-5,
                 on_nonconvergence: str = "warn", curvature_iterations: int | None = None, memory_budget=None,
                 iterative: IterativeOptions | None = None, dense: DenseOptions | None = None,
                 kronecker: KroneckerOptions | None = None, auto: AutoOptions | None = None,
                 options: dict | None = None, **flat):
        self.method, self.damping, self.tol = method, damping, tol
        self.on_nonconvergence, self.curvature_iterations, self.memory_budget = (on_nonconvergence,
                                                                                 curvature_iterations, memory_budget)
        given = {"iterative": iterative, "dense": dense, "kronecker": kronecker, "auto": auto}
        for fam, value in given.items():
            if isinstance(value, dict):                   # a family's JSON object
                value = dataclass_from_dict(FAMILIES[fam], value)
            if value is not None and not isinstance(value, FAMILIES[fam]):
                raise TypeError(f"SolverConfig({fam}=...) must be a {FAMILIES[fam].__name__}, got "
                                f"{type(value).__name__}")
            given[fam] = value
        if options:                                       # deprecated (0.2): a dict of the options
            unknown = sorted(set(options) - set(FLAT_OPTIONS))
            if unknown:
                raise ValueError(f"SolverConfig(method='{method}'): unknown option(s) {unknown}; the options are "
                                 f"the fields of {sorted(c.__name__ for c in FAMILIES.values())}")
            from .deprecation import warn
            warn("SolverConfig(options={...})", "the family options, e.g. SolverConfig('ekfac', "
                 "kronecker=KroneckerOptions(...))")
            given = _with_flat(given, options)
        unknown = sorted(set(flat) - set(FLAT_OPTIONS))
        if unknown:
            raise TypeError(f"SolverConfig.__init__() got an unexpected keyword argument '{unknown[0]}'")
        if flat:
            from .deprecation import warn
            for fam, kw in _by_family(flat).items():
                warn(f"SolverConfig({', '.join(f'{k}=' for k in kw)})",
                     f"SolverConfig({fam}={FAMILIES[fam].__name__}({', '.join(f'{k}=...' for k in kw)}))")
            given = _with_flat(given, flat)
        for fam, value in given.items():
            setattr(self, fam, value if value is not None else FAMILIES[fam]())
        self.__post_init__()

    def __post_init__(self):
        if self.method not in SOLVER_FAMILIES:
            raise ValueError(f"unknown solver '{self.method}'; choose one of {sorted(SOLVER_FAMILIES)}")
        if self.on_nonconvergence not in ("warn", "raise", "ignore"):
            raise ValueError("on_nonconvergence must be 'warn', 'raise' or 'ignore'")
        if self.damping < 0:
            raise ValueError(f"damping must be ≥ 0, got {self.damping}")
        if self.curvature_iterations is not None and self.curvature_iterations < 0:
            raise ValueError(f"curvature_iterations must be None (automatic), 0 (off) or > 0, "
                             f"got {self.curvature_iterations}")
        from .memory import check_budget_value
        check_budget_value(self.memory_budget)
        reads = SOLVER_FAMILIES[self.method]
        for fam, cls in FAMILIES.items():
            value = getattr(self, fam)
            if fam == "iterative":      # max_iter / dtype are shared: a configuration may switch method
                continue
            if fam not in reads and value != cls():
                changed = [f.name for f in fields(cls) if getattr(value, f.name) != getattr(cls(), f.name)]
                users = ", ".join(sorted(m for m, fs in SOLVER_FAMILIES.items() if fam in fs))
                raise ValueError(f"SolverConfig(method='{self.method}'): the {fam} options ({', '.join(changed)}) "
                                 f"do not apply to '{self.method}' (read by: {users})")
        if self.memory_budget is not None and "memory_budget" not in SOLVER_FIELDS[self.method]:
            raise ValueError(f"SolverConfig(method='{self.method}'): 'memory_budget' does not apply to "
                             f"'{self.method}' (it allocates nothing)")
        if self.iterative.scale is not None and self.method != "lissa":
            raise ValueError(f"SolverConfig(method='{self.method}'): IterativeOptions.scale is LiSSA's alone")

    def __getattr__(self, name):
        """Deprecated (0.3): a family option read from the configuration itself (``cfg.max_iter``)."""
        fam = FLAT_OPTIONS.get(name)
        if fam is None or name.startswith("__"):
            raise AttributeError(f"'SolverConfig' object has no attribute '{name}'")
        options = self.__dict__.get(fam)
        if options is None:
            raise AttributeError(name)
        from .deprecation import warn
        warn(f"SolverConfig.{name}", f"SolverConfig.{fam}.{name}")
        return getattr(options, name)

    def replace(self, **changes) -> "SolverConfig":
        """A copy with common fields and family options changed by name (``cfg.replace(max_iter=5,
        damping=1e-4)``): each family option lands in its family (one name, one place)."""
        from dataclasses import replace
        top = {k: v for k, v in changes.items() if k not in FLAT_OPTIONS}
        flat = {k: v for k, v in changes.items() if k in FLAT_OPTIONS}
        top.update({fam: replace(getattr(self, fam), **kw) for fam, kw in _by_family(flat).items()})
        return replace(self, **top)

    def with_factors(self, factors) -> "SolverConfig":
        """This configuration's damping (absolute and relative) and diagnostics applied to fitted
        (E)K-FAC ``factors`` (a :class:`~tf_influence.kfac.KFACFactors` or its directory): the
        solver becomes the factors' kind."""
        kind = factors.kind if hasattr(factors, "kind") else _saved_kind(factors)
        return SolverConfig(kind, damping=self.damping, curvature_iterations=self.curvature_iterations,
                            kronecker=KroneckerOptions(relative_damping=self.kronecker.relative_damping,
                                                       factors=factors))

    def kwargs(self) -> dict:
        """The keyword arguments of the solver function :data:`SOLVERS` ``[method]``."""
        out = {k: getattr(self, k) for k in _COMMON}
        for fam in SOLVER_FAMILIES[self.method]:
            out.update({f.name: getattr(getattr(self, fam), f.name) for f in fields(FAMILIES[fam])})
        return {k: v for k, v in out.items() if k in SOLVER_FIELDS[self.method]}

    def to_dict(self) -> dict:
        """JSON-able fields (``dtype`` by name; ``factors`` only as a directory)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in FAMILIES}
        out.update({fam: getattr(self, fam).to_dict() for fam in FAMILIES})
        return out

    @classmethod
    def from_dict(cls, d: dict):
        """From :meth:`to_dict`'s form; a family option at the top level (the JSON of 0.2) is moved into its
        family with a ``DeprecationWarning``, an unknown key raises."""
        if not isinstance(d, dict):
            raise ValueError(f"a SolverConfig is a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} | set(FLAT_OPTIONS)
        unknown = sorted(set(d) - known - {"options"})
        if unknown:
            raise ValueError(f"SolverConfig: unknown field(s) {unknown}; the fields are "
                             f"{sorted(f.name for f in fields(cls))}")
        return cls(**d)


def _saved_kind(directory: str) -> str:
    from .kfac import KFACFactors
    return KFACFactors.load(directory).kind


def solve(op, b, config: SolverConfig | None = None, progress=None) -> SolveResult:
    """Solve with the solver a :class:`SolverConfig` names."""
    config = config or SolverConfig()
    kwargs = config.kwargs()
    if config.method in ("cg", "cg_squared", "lissa", "auto", "ekfac", "kfac"):
        kwargs["progress"] = progress
    result = SOLVERS[config.method](op, b, **kwargs)
    iters, known = config.curvature_iterations, result.extra.pop("spectrum", None)
    if iters != 0 and config.method != "identity" and op.shape[0] == op.shape[1]:
        from .diagnostics import DEFAULT_CURVATURE_ITERATIONS, curvature_diagnostics
        method = result.method if config.method == "auto" else config.method
        if iters is None and known is not None:
            result.extra["curvature"] = curvature_diagnostics(op, method, config.damping,
                                                              extremes=known[:2], source=known[2])
        else:
            result.extra["curvature"] = curvature_diagnostics(op, method, config.damping,
                                                              iters or DEFAULT_CURVATURE_ITERATIONS)
    return result

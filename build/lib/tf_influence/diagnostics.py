"""Curvature diagnostics: is the Hessian a solve inverts the one the theory needs, and who decides
the answer — the Hessian or the damping?

Influence functions assume a (local) minimum: a positive-definite Hessian ``H``. A model stopped
short of one has negative curvature; the damping ``λ`` then decides much of the result, and where
``λ`` exceeds the whole spectrum ``(H + λI)⁻¹ ≈ I/λ`` — the scores become the identity baseline,
whatever the solver's residual says. Every solve reports the extreme eigenvalues of the operator
— from the explicit matrix of a dense solve, the fitted factors of an (E)K-FAC solve, or else a few
Hessian-vector products (:func:`lanczos_extremes`) — the damping relative to them, and warns
(:class:`CurvatureWarning`) when

* the Hessian is **indefinite at a scale that matters**: a Ritz value below
  ``−INDEFINITE_RELATIVE × λ_max`` (Ritz values lie inside the spectrum, so a negative one proves
  negative curvature; the smallest Ritz value is an *upper bound* on ``λ_min`` after a few steps);
* the **damping dominates**: ``λ ≥ λ_max`` for the systems ``H + λI`` (``cg``, ``lissa``, ``dense``,
  ``ekfac``/``kfac``), ``λ ≥ λ_max²`` for the squared system ``H² + λI`` of ``cg_squared``.

>>> import numpy as np
>>> from tf_influence.solvers import DenseOperator
>>> lo, hi, steps = lanczos_extremes(DenseOperator(np.diag([-1.0, 0.5, 2.0, 4.0])), num_iterations=4)
>>> round(lo, 6), round(hi, 6), steps
(-1.0, 4.0, 4)
"""

from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf

#: Negative curvature below ``−INDEFINITE_RELATIVE × λ_max`` is reported as "indefinite at a scale
#: that matters" (smaller negative eigenvalues are round-off or a flat direction).
INDEFINITE_RELATIVE = 1e-3

#: Lanczos steps per solved Hessian (each one Hessian-vector product on the operator's data).
DEFAULT_CURVATURE_ITERATIONS = 10

#: The diagnostics run on at most this many examples of a larger Hessian (a fixed random subset,
#: as the paper's Hessian subsampling), so they stay cheap on a corpus.
DEFAULT_CURVATURE_SAMPLES = 1000

SQUARED_METHODS = ("cg_squared", "dense_squared")


class CurvatureWarning(UserWarning):
    """The Hessian of a solve is indefinite at a scale that matters, or the damping dominates it."""


def lanczos_extremes(op, num_iterations: int = DEFAULT_CURVATURE_ITERATIONS, seed: int = 0):
    """``(smallest, largest, steps)`` Ritz values of the symmetric operator ``op`` after at most
    ``num_iterations`` Lanczos steps from a seeded random start (full re-orthogonalisation; stops
    early on an invariant subspace). The largest converges fast; the smallest is an upper bound on
    ``λ_min`` (exact once ``steps`` reaches the dimension)."""
    n = int(op.shape[0])
    if int(op.shape[1]) != n:
        raise ValueError(f"Lanczos needs a square operator, got shape {tuple(op.shape)}")
    k = max(1, min(int(num_iterations), n))
    dtype = getattr(op, "dtype", tf.float64)
    v = np.random.default_rng(seed).standard_normal(n)
    basis = [v / np.linalg.norm(v)]
    alphas, betas = [], []
    for j in range(k):
        w = np.asarray(op.matvec(tf.constant(basis[j], dtype=dtype)), np.float64).reshape(-1)
        if not np.all(np.isfinite(w)):
            raise FloatingPointError(f"Hessian-vector product of {getattr(op, 'name', 'operator')} is NaN/Inf")
        alphas.append(float(w @ basis[j]))
        for u in basis:  # full re-orthogonalisation (k is small)
            w = w - (w @ u) * u
        beta = float(np.linalg.norm(w))
        if j == k - 1 or beta <= 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta)
        basis.append(w / beta)
    T = np.diag(alphas) + np.diag(betas[:len(alphas) - 1], 1) + np.diag(betas[:len(alphas) - 1], -1)
    ritz = np.linalg.eigvalsh(T)
    return float(ritz[0]), float(ritz[-1]), len(alphas)


def _subsampled(op, samples: int | None):
    """The operator on at most ``samples`` examples (HessianOperator only; others as they are)."""
    from .hessian import HessianOperator
    if samples is None or not isinstance(op, HessianOperator) or op.num_examples <= samples:
        return op
    return HessianOperator(op.objective, op.dataset, op.rows, op.cols, mode=op.mode, hessian_samples=samples,
                           seed=op.seed, extra_diagonal=op.extra_diagonal, name=op.name)


def curvature_diagnostics(op, method: str, damping: float, num_iterations: int = DEFAULT_CURVATURE_ITERATIONS,
                          samples: int | None = DEFAULT_CURVATURE_SAMPLES, seed: int = 0,
                          warn: bool = True, extremes: tuple | None = None, source: str = "lanczos") -> dict:
    """Extreme eigenvalues of ``op`` and the damping relative to them; warns with
    :class:`CurvatureWarning` (see module docstring). Returns a JSON-able dict::

        {"lambda_min": …, "lambda_max": …, "source": …, "lanczos_steps": …, "damping_over_scale": …,
         "indefinite": bool, "damping_dominates": bool, "warnings": [...]}

    ``damping_over_scale`` is ``λ / λ_max`` (``λ / λ_max²`` for the squared systems).

    ``extremes=(λ_min, λ_max)`` skips Lanczos: a solve that already knows the spectrum of what it
    inverted passes it with its ``source`` — ``"dense"`` (exact eigenvalues of the explicit matrix)
    or ``"ekfac"`` / ``"kfac"`` (the eigenvalues of the fitted factored curvature, which is positive
    semi-definite by construction: there the check is whether the damping dominates it)."""
    if extremes is None:
        lo, hi, steps = lanczos_extremes(_subsampled(op, samples), num_iterations, seed)
        source = "lanczos"
    else:
        lo, hi, steps = float(extremes[0]), float(extremes[1]), 0
    scale = hi * hi if method in SQUARED_METHODS else hi
    name = getattr(op, "name", "operator")
    out = {"lambda_min": lo, "lambda_max": hi, "source": source, "lanczos_steps": steps,
           "damping_over_scale": float(damping / scale) if scale > 0 else float("inf"),
           "indefinite": bool(hi > 0 and lo < -INDEFINITE_RELATIVE * hi) or hi <= 0,
           "damping_dominates": bool(scale <= 0 or damping >= scale), "warnings": []}
    if out["indefinite"]:
        out["warnings"].append(
            f"{name} is indefinite: eigenvalue {lo:.3g} against λ_max {hi:.3g} — the model is not at a minimum, "
            "so the scores depend on the damping; train closer to convergence or calibrate the damping "
            "(tf_influence.evaluation.calibrate_damping)")
    if out["damping_dominates"]:
        what = "λ_max²" if method in SQUARED_METHODS else "λ_max"
        out["warnings"].append(
            f"the damping {damping:g} of the {method} solve with {name} is ≥ {what} = {scale:.3g}: (H + λ)⁻¹ ≈ I/λ, "
            "the scores are close to the identity-Hessian baseline; lower the damping")
    if warn:
        for msg in out["warnings"]:
            warnings.warn(msg, CurvatureWarning, stacklevel=3)
    return out

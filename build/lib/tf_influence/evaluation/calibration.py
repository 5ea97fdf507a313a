"""Choose the damping of a new model by measurement, not by habit.

The damping ``λ`` of an inverse-Hessian solve is the setting that decides most results on a model
that is not exactly at a minimum (negative or tiny curvature; see :mod:`tf_influence.diagnostics`):
too small and the solve follows noise directions, too large and the scores become the
identity-Hessian baseline. :func:`calibrate_damping` spends a small retraining budget to pick it:

1. draw ``num_subsets`` random subsets (a fraction ``subset_fraction`` of the training set; for multi-stage
   influence the pretraining set) and retrain on each with ``num_seeds`` seeds — cached on disk
   and resumable, optionally as a Beam job (:func:`~tf_influence.evaluation.lds.measure_subsets`);
2. the **noise floor** of that ground truth (:func:`~tf_influence.evaluation.lds.seed_noise`):
   how well one seed's retrains predict another's — no score can be judged more finely than that;
3. for each damping of the ``grid``, compute the scores and their LDS on the seed-averaged
   measurements; the chosen damping has the highest LDS.

Cost: ``num_subsets × num_seeds`` retrains (the defaults: 10 × 2 = 20) plus one score
computation per damping — usually far less than a full LDS evaluation (100 subsets), and the
retrains are shared by every damping. Use **validation** test points (and a different subset
``seed``) for calibration, not the points whose scores you will report, so the reported quality
is not tuned on its own test.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> truth = rng.normal(size=40)                     # each example's true effect on the output
>>> def retrain(mask, seed):                        # a linear "model": output = sum of kept effects
...     return np.array([truth[mask].sum() + 0.01 * seed])
>>> def scores(damping):                            # damping blurs the scores toward a constant
...     return truth / (1 + damping) + damping * rng.normal(size=40)
>>> result = calibrate_damping(scores, retrain, 40, grid=[0.0, 1.0, 100.0], progress=False)
>>> result.best_damping
0.0
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .lds import _fraction, draw_subsets, linear_datamodeling_score, measure_subsets, seed_noise, target_of


@dataclass
class CalibrationResult:
    """The chosen damping, the LDS of every damping of the grid and the ground truth's noise floor."""

    best_damping: float
    rows: list                     # [{"damping", "lds", "ci95", "num_test_points"}]
    noise_floor: dict              # seed_noise() of the retrains
    num_retrains: int
    seconds: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"best_damping": self.best_damping, "grid": self.rows, "noise_floor": self.noise_floor,
                "num_retrains": self.num_retrains, "seconds": self.seconds}


def calibrate_damping(score_fn, retrain, num_train: int, grid=(1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                      num_subsets: int = 10, subset_fraction: float | None = None, num_seeds: int = 2,
                      seed: int = 1, cache=None, key: str = "", progress: bool = True, beam_options=None, *,
                      alpha: float | None = None) -> CalibrationResult:
    """Pick the damping with the best linear datamodeling score on a small retraining budget.

    Args:
      score_fn: ``damping → scores`` (``[num_train]`` for a summed test target or
        ``[num_train, num_test]``), e.g. ``lambda lam: multi_stage_influence(…,
        pretrain_solver=SolverConfig("cg_squared", damping=lam)).scores``.
      retrain: ``(mask, seed) → measurements of the test points`` (as for
        :func:`~tf_influence.evaluation.lds.evaluate_lds`).
      num_train: number of scored (training / pretraining) examples.
      grid: dampings to try.
      num_subsets, subset_fraction, num_seeds, seed: the retraining budget (``alpha``: the deprecated
        name of ``subset_fraction``) (``num_seeds ≥ 2`` measures the
        noise floor) and the subsets' seed (use another one than the final evaluation's).
      cache, key, progress, beam_options: as for :func:`~tf_influence.evaluation.lds.measure_subsets`.
    """
    if num_seeds < 2:
        raise ValueError("calibrate_damping needs num_seeds ≥ 2 to measure the noise floor of the retrains")
    grid = [float(g) for g in grid]
    if not grid or any(g < 0 for g in grid):
        raise ValueError(f"grid must hold one or more dampings ≥ 0, got {grid}")
    fraction = _fraction(subset_fraction, alpha, "calibrate_damping")
    t0 = time.perf_counter()
    masks = draw_subsets(num_train, num_subsets, fraction, seed)
    measured = measure_subsets(retrain, masks, num_seeds, cache, f"calibration-{key}", progress, beam_options,
                               per_seed=True)
    t1 = time.perf_counter()
    mean = measured.mean(axis=0)
    rows = []
    for lam in grid:
        scores = np.asarray(score_fn(lam), float)
        r = linear_datamodeling_score(scores, masks, target_of(scores, mean), fraction, num_seeds)
        rows.append({"damping": lam, "lds": r.mean, "ci95": [r.ci_low, r.ci_high],
                     "num_test_points": int(np.isfinite(r.per_test).sum())})
    finite = [r for r in rows if np.isfinite(r["lds"])]
    if not finite:
        raise ValueError("no damping of the grid gave a defined LDS (constant scores or measurements)")
    best = max(finite, key=lambda r: r["lds"])["damping"]
    return CalibrationResult(best, rows, seed_noise(measured), int(num_subsets * num_seeds),
                             {"retraining": t1 - t0, "scoring": time.perf_counter() - t1})

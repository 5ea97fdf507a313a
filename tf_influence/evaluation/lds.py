"""The linear datamodeling score (LDS; Park et al. 2023, TRAK) — how the field judges attribution
scores by what users do with them: removing many training examples at once.

1. Draw ``num_subsets`` random subsets ``S_j`` of the training set (for multi-stage influence: of
   the **pretraining** set), each a fraction ``subset_fraction`` of it (:func:`draw_subsets`).
2. Retrain on each subset (multi-stage: pretrain on ``S_j``, then finetune exactly as the
   original pipeline does) with ``num_seeds`` seeds and average the measurement of every test
   point (e.g. its loss) — :func:`measure_subsets`, cached on disk and resumable.
3. The attribution's prediction for ``S_j`` is the sum of the scores of its examples,
   ``Σ_{z ∈ S_j} τ(z, x)``; the LDS of test point ``x`` is the Spearman correlation over the
   subsets between prediction and measurement, and the reported LDS is the mean over test points
   with a 95 % confidence interval (Student t over test points) — :func:`linear_datamodeling_score`.

Sign convention: ``τ(z, x)`` must grow with what *including* ``z`` does to the measurement of
``x`` — the library's ``InfluenceResult.scores`` (the derivative of the test loss with respect to
the example's weight) are such scores; so is ``−`` a pretraining loss or any score in which a
larger value means "this example raises the test loss". A score that means the opposite gives
an LDS of the opposite sign.

>>> import numpy as np
>>> masks = draw_subsets(num_train=6, num_subsets=4, subset_fraction=0.5, seed=0)
>>> masks.shape, masks.sum(axis=1).tolist()
((4, 6), [3, 3, 3, 3])
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LDSResult:
    """Mean LDS over test points with its 95 % confidence interval, and what it was computed from."""

    mean: float
    ci_low: float
    ci_high: float
    per_test: np.ndarray            # Spearman per test point (NaN where undefined)
    num_subsets: int
    subset_fraction: float | None = None
    num_seeds: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def alpha(self) -> float | None:
        """Deprecated name of :attr:`subset_fraction` (``alpha`` is the case-2 proximal weight elsewhere)."""
        from ..deprecation import warn
        warn("LDSResult.alpha", "subset_fraction")
        return self.subset_fraction

    def summary(self) -> dict:
        finite = self.per_test[np.isfinite(self.per_test)]
        return {"lds": float(self.mean), "ci95": [float(self.ci_low), float(self.ci_high)],
                "num_test_points": int(len(finite)), "num_undefined": int(len(self.per_test) - len(finite)),
                "num_subsets": int(self.num_subsets), "subset_fraction": self.subset_fraction,
                "num_seeds": self.num_seeds,
                **self.extra}


def _fraction(subset_fraction, alpha, where: str) -> float:
    """``subset_fraction``, or the deprecated ``alpha`` keyword (0.2 name; one name per concept:
    ``alpha`` is the case-2 proximal weight of :class:`tf_influence.InfluenceArgs`)."""
    if alpha is not None:
        if subset_fraction is not None:
            raise TypeError(f"{where}: give subset_fraction, not both subset_fraction and its deprecated alias alpha")
        from ..deprecation import warn
        warn(f"{where}(alpha=...)", "subset_fraction=...", stacklevel=4)
        return float(alpha)
    return DEFAULT_SUBSET_FRACTION if subset_fraction is None else float(subset_fraction)


#: The fraction of the training set each LDS subset keeps (Park et al. 2023's α).
DEFAULT_SUBSET_FRACTION = 0.5


def draw_subsets(num_train: int, num_subsets: int = 100, subset_fraction: float | None = None, seed: int = 0, *,
                 alpha: float | None = None) -> np.ndarray:
    """``[num_subsets, num_train]`` boolean masks, each keeping exactly ``round(subset_fraction ·
    num_train)`` examples drawn uniformly without replacement (reproducible from ``seed``;
    ``subset_fraction`` defaults to :data:`DEFAULT_SUBSET_FRACTION`; ``alpha`` is its deprecated alias)."""
    alpha = _fraction(subset_fraction, alpha, "draw_subsets")
    if not 0 < alpha < 1:
        raise ValueError(f"subset_fraction (the fraction of the training set in each subset) must be in (0, 1), "
                         f"got {alpha}")
    if num_subsets < 3:
        raise ValueError(f"num_subsets must be at least 3 for a rank correlation, got {num_subsets}")
    keep = int(round(alpha * num_train))
    if not 0 < keep < num_train:
        raise ValueError(f"subset_fraction={alpha} keeps {keep} of {num_train} training examples; "
                         "need 0 < kept < all")
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, num_train), bool)
    for j in range(num_subsets):
        masks[j, rng.choice(num_train, keep, replace=False)] = True
    return masks


def mean_ci95(values) -> tuple:
    """``(mean, low, high)`` of the finite values: Student-t 95 % interval of the mean."""
    from scipy import stats
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half


def linear_datamodeling_score(scores, masks, measured, subset_fraction: float | None = None,
                              num_seeds: int | None = None, *, alpha: float | None = None) -> LDSResult:
    """LDS of ``scores`` (``[num_train]`` for one test target or ``[num_train, num_test]``) given the
    subset ``masks`` (``[num_subsets, num_train]``) and the ``measured`` outputs of the models
    retrained on them (``[num_subsets]`` or ``[num_subsets, num_test]``)."""
    from scipy import stats
    if alpha is not None:
        subset_fraction = _fraction(subset_fraction, alpha, "linear_datamodeling_score")
    scores = np.asarray(scores, float)
    masks = np.asarray(masks, bool)
    measured = np.asarray(measured, float)
    s2 = scores[:, None] if scores.ndim == 1 else scores
    m2 = measured[:, None] if measured.ndim == 1 else measured
    if masks.ndim != 2 or masks.shape[1] != s2.shape[0]:
        raise ValueError(f"masks have shape {masks.shape} but there are {s2.shape[0]} scored training examples")
    if m2.shape != (masks.shape[0], s2.shape[1]):
        raise ValueError(f"measured outputs have shape {measured.shape}; expected {(masks.shape[0], s2.shape[1])} "
                         "(one row per subset, one column per test point)")
    for name, arr in (("scores", s2), ("measured outputs", m2)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contain NaN/Inf")
    predicted = masks.astype(float) @ s2                                # [num_subsets, num_test]
    per_test = np.full(s2.shape[1], np.nan)
    for t in range(s2.shape[1]):
        if np.std(predicted[:, t]) > 0 and np.std(m2[:, t]) > 0:
            per_test[t] = stats.spearmanr(predicted[:, t], m2[:, t])[0]
    mean, lo, hi = mean_ci95(per_test)
    return LDSResult(mean, lo, hi, per_test, masks.shape[0], subset_fraction, num_seeds)


def _hash_masks(masks) -> str:
    return hashlib.sha1(np.packbits(np.asarray(masks, bool)).tobytes() + str(np.shape(masks)).encode()).hexdigest()[:12]


def _part_name(j: int, s: int) -> str:
    return f"{j}-{s}.json"


def _beam_retrain(retrain, masks, todo, parts_dir: str, beam_options):
    """Run the ``todo`` (subset, seed) retrains as one Beam job, one element each. Every worker
    writes its result to ``parts_dir`` as soon as it has it (write-then-rename), so an interrupted
    job keeps what finished; the caller merges the parts into the cache."""
    import json
    import os

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    os.makedirs(parts_dir, exist_ok=True)
    elements = [(int(j), int(s), np.flatnonzero(masks[j]).tolist(), len(masks[j])) for j, s in todo]

    def run_one(element):
        j, s, kept, n = element
        mask = np.zeros(n, bool)
        mask[kept] = True
        out = np.atleast_1d(np.asarray(retrain(mask, s), float))
        path = os.path.join(parts_dir, _part_name(j, s))
        with open(path + ".tmp", "w") as fh:
            json.dump(out.tolist(), fh)
        os.replace(path + ".tmp", path)
        return j

    options = PipelineOptions(list(beam_options)) if isinstance(beam_options, (list, tuple)) else beam_options
    with beam.Pipeline(options=options) as p:
        _ = (p | "subsets × seeds" >> beam.Create(elements, reshuffle=False)
             | "retrain" >> beam.Map(run_one))


def measure_subsets(retrain, masks, num_seeds: int = 1, cache=None, key: str = "", progress: bool = True,
                    beam_options=None, per_seed: bool = False):
    """``[num_subsets, num_test]``: ``retrain(mask, seed) → measurements of the test points`` for every
    subset, averaged over ``seeds 0..num_seeds-1`` (``per_seed=True``: not averaged,
    ``[num_seeds, num_subsets, num_test]``, e.g. for :func:`seed_noise`).

    ``cache`` (a :class:`~tf_influence.evaluation.loo.LOOCache`) keeps every (subset, seed) result
    under ``key`` + a hash of the masks as soon as it is computed, so an interrupted run resumes
    where it stopped and a rerun retrains nothing. ``key`` must identify the retraining protocol,
    starting weights and data (e.g. ``TwoStageRetrainer.key``).

    ``beam_options`` (a ``PipelineOptions`` or its argument list) runs the retrains as one Apache
    Beam job instead, each (subset, seed) one element — they are independent, so they parallelise
    over workers (``["--direct_running_mode=multi_processing", "--direct_num_workers=2"]`` on one
    machine, or any runner). ``retrain`` must then be picklable (a module-level function or an
    object that builds its model and data on first call), and ``cache`` is required: the workers
    write each result next to it (``<cache path>.parts/``) as it finishes, and the parts are merged
    into the cache after the job (also after an interruption)."""
    masks = np.asarray(masks, bool)
    full_key = f"lds-{key}-{_hash_masks(masks)}"
    todo = [(j, s) for j in range(len(masks)) for s in range(num_seeds)
            if cache is None or cache.get(full_key, f"{j}:{s}") is None]
    results = {}
    if beam_options is not None and todo:
        import json
        import os
        if cache is None:
            raise ValueError("measure_subsets with beam_options needs a cache (the workers write their results "
                             "next to it)")
        parts = f"{cache.path}.parts/{full_key}"
        try:
            _beam_retrain(retrain, masks, todo, parts, beam_options)
        finally:  # merge whatever finished, also when the job failed or was interrupted
            for j, s in todo:
                path = os.path.join(parts, _part_name(j, s))
                if os.path.exists(path):
                    with open(path) as fh:
                        out = np.asarray(json.load(fh), float)
                    if not np.all(np.isfinite(out)):
                        raise ValueError(f"retraining on subset {j} (seed {s}) gave NaN/Inf measurements")
                    results[(j, s)] = out
                    cache.put(full_key, f"{j}:{s}", out)
            if results:
                cache.save()
        todo = []
    it = todo
    if progress and todo:
        from tqdm.auto import tqdm
        it = tqdm(todo, desc=f"LDS retraining ({len(masks)} subsets × {num_seeds} seeds)", leave=False)
    try:
        for j, s in it:
            out = np.atleast_1d(np.asarray(retrain(masks[j], s), float))
            if not np.all(np.isfinite(out)):
                raise ValueError(f"retraining on subset {j} (seed {s}) gave NaN/Inf measurements")
            results[(j, s)] = out
            if cache is not None:
                cache.put(full_key, f"{j}:{s}", out)
    finally:  # also on an interruption: what was retrained is kept for the resumed run
        if cache is not None and results:
            cache.save()
    out = np.stack([np.stack([results[(j, s)] if (j, s) in results
                              else np.asarray(cache.get(full_key, f"{j}:{s}"), float) for j in range(len(masks))])
                    for s in range(num_seeds)])
    return out if per_seed else out.mean(axis=0)


def seed_noise(retrain_measurements) -> dict:
    """The noise floor of a retraining protocol, from ``[num_seeds, num_subsets, num_test]``
    measurements of the *same* subsets with different seeds (at least 2):

    * ``seed_to_seed_lds``: mean over test points of the Spearman correlation across subsets between
      seed 0's and seed 1's measurements — what the best possible attribution could reach against a
      single-seed ground truth (an LDS ceiling);
    * ``seed_std_over_subset_std``: the seed-to-seed standard deviation of a measurement relative
      to its spread across subsets (≥ 1: retraining noise is as large as the effect of the data).
    """
    from scipy import stats
    m = np.asarray(retrain_measurements, float)
    if m.ndim == 2:
        m = m[:, :, None]
    if m.shape[0] < 2:
        raise ValueError("seed_noise needs measurements of at least 2 seeds")
    rho = [stats.spearmanr(m[0, :, t], m[1, :, t])[0] for t in range(m.shape[2])
           if np.std(m[0, :, t]) > 0 and np.std(m[1, :, t]) > 0]
    mean, lo, hi = mean_ci95(rho)
    seed_std = m.std(axis=0, ddof=1).mean(axis=0)            # per (subset, test) → mean over subsets
    subset_std = m.mean(axis=0).std(axis=0, ddof=1)
    ratio = seed_std / np.where(subset_std > 0, subset_std, np.nan)
    return {"seed_to_seed_lds": mean, "seed_to_seed_ci95": [lo, hi],
            "seed_std_over_subset_std": float(np.nanmean(ratio)), "num_seeds": int(m.shape[0])}


def target_of(scores, measured):
    """The measurements ``scores`` predict: one score vector (``[num_train]``) is for the summed
    test target, so several test points' measurements are summed; a score matrix keeps them."""
    scores, measured = np.asarray(scores), np.asarray(measured)
    return measured.sum(axis=1) if scores.ndim == 1 and measured.ndim == 2 and measured.shape[1] > 1 else measured


def evaluate_lds(retrain, scores, num_subsets: int = 100, subset_fraction: float | None = None, num_seeds: int = 1,
                 seed: int = 0, cache=None, key: str = "", progress: bool = True, beam_options=None, *,
                 alpha: float | None = None) -> LDSResult:
    """Draw the subsets, retrain (cached), and score: the whole LDS in one call.

    ``retrain(mask, seed)`` trains on the examples where ``mask`` is true and returns the
    measurement of every test point; ``scores`` has one row per training example."""
    fraction = _fraction(subset_fraction, alpha, "evaluate_lds")
    scores = np.asarray(scores, float)
    masks = draw_subsets(scores.shape[0], num_subsets, fraction, seed)
    measured = measure_subsets(retrain, masks, num_seeds, cache, key, progress, beam_options)
    return linear_datamodeling_score(scores, masks, target_of(scores, measured), fraction, num_seeds)

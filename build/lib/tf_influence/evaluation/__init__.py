"""Evaluating attribution scores against retraining: leave-one-out and the linear datamodeling score.

* :mod:`.loo` — deterministic two-stage retraining (:class:`TwoStageRetrainer`), its on-disk
  cache and the correlation report (Pearson / Spearman + scatter plot);
* :mod:`.lds` — the linear datamodeling score (random subsets, cached retrains, Spearman per
  test point, mean with a 95 % CI; retrains in process or as a Beam job) and the noise floor of a
  retraining protocol (:func:`seed_noise`);
* :mod:`.calibration` — :func:`calibrate_damping`: the damping chosen by LDS on a small
  retraining budget, with the noise floor of the retrains (the recommended way on a new model);
* :mod:`.retraining` — :class:`WeightedTrainer`: deterministic training with per-example
  weights (0 = removed), the engine of every retrain.
"""

from .calibration import CalibrationResult, calibrate_damping
from .loo import (LOOCache, RetrainProtocol, TwoStageRetrainer, correlation, correlation_report,
                  top_by_magnitude)
from .lds import (LDSResult, draw_subsets, evaluate_lds, linear_datamodeling_score, mean_ci95, measure_subsets,
                  seed_noise)
from .retraining import WeightedTrainer, restore, snapshot

__all__ = ["CalibrationResult", "calibrate_damping", "LDSResult", "draw_subsets", "evaluate_lds", "linear_datamodeling_score", "mean_ci95", "measure_subsets",
           "seed_noise", "LOOCache", "RetrainProtocol", "TwoStageRetrainer", "correlation", "correlation_report",
           "top_by_magnitude", "WeightedTrainer", "restore", "snapshot"]

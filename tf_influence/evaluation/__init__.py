"""Evaluating attribution scores against retraining: leave-one-out and the linear datamodeling score.

* :mod:`.loo` — deterministic two-stage retraining (:class:`TwoStageRetrainer`), its on-disk
  cache and the correlation report (Pearson / Spearman + scatter plot);
* :mod:`.lds` — the linear datamodeling score (random subsets, cached retrains, Spearman per
  test point, mean with a 95 % CI);
* :mod:`.retraining` — :class:`WeightedTrainer`: deterministic training with per-example
  weights (0 = removed), the engine of every retrain.
"""

from .loo import (LOOCache, RetrainProtocol, TwoStageRetrainer, correlation, correlation_report,
                  top_by_magnitude)
from .lds import LDSResult, draw_subsets, evaluate_lds, linear_datamodeling_score, mean_ci95, measure_subsets
from .retraining import WeightedTrainer, restore, snapshot

__all__ = ["LDSResult", "draw_subsets", "evaluate_lds", "linear_datamodeling_score", "mean_ci95", "measure_subsets",
           "LOOCache", "RetrainProtocol", "TwoStageRetrainer", "correlation", "correlation_report",
           "top_by_magnitude", "WeightedTrainer", "restore", "snapshot"]

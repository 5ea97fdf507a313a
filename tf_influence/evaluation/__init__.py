"""Evaluating attribution scores against retraining: the leave-one-out harness.

* :mod:`.loo` — deterministic two-stage retraining (:class:`TwoStageRetrainer`), its on-disk
  cache and the correlation report (Pearson / Spearman + scatter plot);
* :mod:`.retraining` — :class:`WeightedTrainer`: deterministic training with per-example
  weights (0 = removed), the engine of every retrain.
"""

from .loo import (LOOCache, RetrainProtocol, TwoStageRetrainer, correlation, correlation_report,
                  top_by_magnitude)
from .retraining import WeightedTrainer, restore, snapshot

__all__ = ["LOOCache", "RetrainProtocol", "TwoStageRetrainer", "correlation", "correlation_report",
           "top_by_magnitude", "WeightedTrainer", "restore", "snapshot"]

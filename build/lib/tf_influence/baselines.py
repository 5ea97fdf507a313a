"""Baselines from the multi-stage paper and its rebuttal.

* :func:`identity_hessian_influence` — eq. 11 with every inverse Hessian replaced by the
  identity (Section 4.1, Figure 3: Pearson r = 0.17 on MNIST in the paper). It runs the exact
  same code path as the full method with the ``identity`` solver, so the two differ only in
  the inverses.
* :func:`pretraining_loss_scores` — the pretraining loss ``g(z)`` of each example used as the
  score (rebuttal, reviewer 3's "latent baseline": r ≈ 0.10 on MNIST). Larger loss is read as
  more harmful, matching the sign convention of :mod:`influence`.
"""

from __future__ import annotations

import numpy as np

from .gradients import per_example_losses
from .influence import InfluenceResult, MultiStageInfluence
from .objective import Objective
from .solvers import SolverConfig


def identity_hessian_influence(pretrain_objective, pretrain_data, finetune_objective, finetune_data, test_data,
                               embedding, test_target: str = "sum", **kwargs) -> InfluenceResult:
    """Multi-stage influence with ``(∂²G)⁻¹`` and ``(∂²F)⁻¹`` replaced by ``I``."""
    kwargs = dict(kwargs)
    kwargs["pretrain_solver"] = SolverConfig(method="identity", damping=0.0)
    kwargs["finetune_solver"] = SolverConfig(method="identity", damping=0.0)
    result = MultiStageInfluence(pretrain_objective, pretrain_data, finetune_objective, finetune_data, embedding,
                                 **kwargs)(test_data, test_target)
    result.method = f"identity_hessian_{result.method}"
    return result


def pretraining_loss_scores(pretrain_objective: Objective, pretrain_data) -> np.ndarray:
    """``g(z)`` for each pretraining example, in dataset order."""
    return per_example_losses(pretrain_objective, pretrain_data, name="pretraining data")

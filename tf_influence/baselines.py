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

from dataclasses import replace

import numpy as np

from .gradients import per_example_losses
from .influence import (DEPRECATED_ARG_KEYWORDS, InfluenceArgs, InfluenceResult, MultiStageInfluence,
                        args_with_keywords)
from .objective import Objective
from .solvers import SolverConfig


def identity_hessian_influence(pretrain_objective, pretrain_data, finetune_objective, finetune_data, test_data,
                               embedding, pretrain_head=None, finetune_head=None, measurement=None,
                               progress: bool = False, args: InfluenceArgs | None = None, **deprecated
                               ) -> InfluenceResult:
    """Multi-stage influence with ``(∂²G)⁻¹`` and ``(∂²F)⁻¹`` replaced by ``I`` (``args``' solvers are
    replaced; its other fields apply)."""
    args = args_with_keywords("identity_hessian_influence", args, deprecated,
                              DEPRECATED_ARG_KEYWORDS + ("test_target",))
    identity = SolverConfig(method="identity", damping=0.0)
    args = replace(args, pretrain_solver=identity, finetune_solver=identity)
    result = MultiStageInfluence(pretrain_objective, pretrain_data, finetune_objective, finetune_data, embedding,
                                 pretrain_head=pretrain_head, finetune_head=finetune_head, measurement=measurement,
                                 progress=progress, args=args)(test_data)
    result.method = f"identity_hessian_{result.method}"
    return result


def pretraining_loss_scores(pretrain_objective: Objective, pretrain_data) -> np.ndarray:
    """``g(z)`` for each pretraining example, in dataset order."""
    return per_example_losses(pretrain_objective, pretrain_data, name="pretraining data")

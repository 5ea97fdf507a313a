"""tf-influence: multi-stage influence functions and self-influence tools for TensorFlow / Keras 3.

The library does not import TFX; TFX shells live in ``tfx_components/``.
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's C++ info/warning chatter unless asked

from .baselines import identity_hessian_influence, pretraining_loss_scores
from .gradients import mean_gradient, per_example_dot, per_example_gradients, per_example_losses, \
    stack_per_example_gradients
from .hvp import HessianOperator, hvp, mixed_hvp
from .influence import (InfluenceResult, MultiStageInfluence, multi_stage_influence, predicted_loss_change_on_removal,
                        score_examples, single_stage_influence, test_gradients)
from .objective import EmptyDatasetError, NonFiniteError, Objective, count_examples, subsample
from .params import (ParameterGroup, ParameterGroupError, complement_group, concat_groups, find_layer,
                     group_from_layers)
from .solvers import (DenseOperator, SolveResult, SolverConfig, SolverNotConvergedError, SolverNotConvergedWarning,
                      cg, cg_squared, dense, identity, lissa, solve)

__version__ = "0.1.0"

"""tf-influence: multi-stage influence functions and self-influence tools for TensorFlow / Keras 3.

>>> import tf_influence as tfi
>>> tfi.SolverConfig("cg_squared", damping=tfi.DEFAULT_PRETRAIN_DAMPING).damping
0.001

Start with :class:`Task` and :class:`Analyzer` (:mod:`tf_influence.analyzer`); the functions under
them (:func:`multi_stage_influence`, :func:`single_stage_influence`, :func:`self_influence`) take
the same typed arguments (:class:`InfluenceArgs`, :class:`SolverConfig`).

The library does not import TFX; TFX shells live in ``tfx_components/``, experiments and demos in
the top-level ``experiments/`` package. ``tf_influence.evaluation`` holds the leave-one-out
harness users call. Names are loaded on first use (PEP 562), so ``import tf_influence`` is cheap
and an entry point can call :func:`tf_influence.console.quiet` before TensorFlow is imported.
"""

import importlib as _importlib
import os as _os

# TensorFlow's C++ INFO/WARNING lines stay hidden unless the user chose a level (this only takes
# effect when tf_influence is imported before TensorFlow).
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.2.0"

_EXPORTS = {
    "analyzer": ["Analyzer", "AnalyzerError", "FactorArgs", "Task"],
    "baselines": ["identity_hessian_influence", "pretraining_loss_scores"],
    "diagnostics": ["CurvatureWarning", "curvature_diagnostics", "lanczos_extremes"],
    "gradients": ["mean_gradient", "per_example_dot", "per_example_gradients", "per_example_losses",
                  "stack_per_example_gradients"],
    "hessian": ["HessianOperator", "hvp", "mixed_hvp"],
    "influence": ["DEFAULT_FINETUNE_DAMPING", "DEFAULT_PRETRAIN_DAMPING", "InfluenceArgs", "InfluenceResult", "MultiStageInfluence",
                  "default_solvers", "multi_stage_influence", "predicted_loss_change_on_removal", "score_examples",
                  "single_stage_influence", "test_gradients"],
    "errors": ["DatasetError", "EmptyDatasetError", "NonFiniteError", "require_finite"],
    "objective": ["Objective", "count_examples", "per_example_loss_fn", "reduce_per_example", "subsample"],
    "params": ["GroupSpec", "ParameterGroup", "ParameterGroupError", "complement_group", "concat_groups",
               "find_layer", "group_from_layers"],
    "solvers": ["AutoOptions", "DenseOperator", "DenseOptions", "IterativeOptions", "KroneckerOptions", "SolveResult",
                "SolverConfig", "SolverNotConvergedError",
                "SolverNotConvergedWarning", "cg", "cg_squared", "dense", "identity", "lissa", "solve"],
    "kfac": ["FactorStatistics", "KFACFactors", "fit_factors"],
    "memory": ["MemoryBudgetError", "MemoryPlan"],
    "provenance": ["StaleResultError"],
    "index": ["QueryArgs", "GradientIndex", "build_index"],
    "projection": ["ProjectionArgs"],
    "tracin": ["self_influence"],
    "presence": ["FilterResult", "PresenceArgs", "PresenceCallback", "PresenceModel", "presence_sequential"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = {"analyzer", "baselines", "capture", "compiled", "console", "diagnostics", "errors", "evaluation", "ghost_norms", "gradients", "hessian", "influence", "index", "kfac", "lm", "memory", "objective", "projection", "provenance",
               "params", "presence", "report", "scores_io", "selection", "serve", "solvers", "tracin", "deprecation"}

#: The names a user needs — ``from tf_influence import *``, the API reference's front page. Every
#: other name of ``_EXPORTS`` still resolves here (the 0.2 surface), and lives in its submodule.
__all__ = ["Analyzer", "FactorArgs", "InfluenceArgs", "InfluenceResult", "MemoryBudgetError", "Objective",
           "PresenceCallback", "PresenceModel", "ProjectionArgs", "QueryArgs", "SolverConfig", "StaleResultError",
           "Task", "IterativeOptions", "KroneckerOptions", "DenseOptions", "AutoOptions", "multi_stage_influence",
           "self_influence", "single_stage_influence"]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(_importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tf_influence' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_WHERE) | _SUBMODULES)

"""InfluenceScorer: multi-stage influence of every pretraining example on a finetuned model's test loss.

Inputs: ``pretrain_examples`` and ``finetune_examples`` (Examples; the latter with a training
and a test split), ``pretrain_model`` and ``finetune_model`` (Model artifacts whose
``Format-Serving`` directory holds ``model.keras``, as written by the trainer modules of
``pipelines/``). Parameters: ``feature_spec`` (JSON, see ``beam_scoring.parse_feature_spec``),
``embedding`` (JSON list of layer names of W, present in both models), ``case`` (``fixed`` /
``updated``) and ``alpha``, ``damping_pretrain`` / ``damping_finetune`` (default: the library's
``tf_influence.DEFAULT_PRETRAIN_DAMPING`` / ``DEFAULT_FINETUNE_DAMPING``), ``solver``, ``max_iter``,
``hessian_samples``, ``finetune_train_split`` / ``test_split``, ``test_keys`` (JSON list: score
against these test examples only; default the sum over the whole test split, eq. 8),
``loss`` (Keras loss config JSON; default the models' compiled losses). Optional input
``pretrain_factors`` (KFACFactors from ``FactorFitter`` over the pretraining Examples and model):
the pretraining Hessian ∂²G/∂(W,U)² is then inverted with those (E)K-FAC factors (the solver's
kind is the factors'), and the driver reads no pretraining corpus.

The driver computes the test-side vector once (both IHVP chains, ``MultiStageInfluence.test_vectors``);
the per-example products run in Beam with the vector as a side input, over the (W, U) group
rebuilt in every worker from its serialised ``GroupSpec`` (also recorded on the output). Output: ``scores``
(InfluenceScores, ``score_kind = multi_stage_<case>``) for every pretraining split, with the
solver diagnostics and a score summary in its custom properties.
"""

import json
from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import channel_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from tfx_components.artifacts import InfluenceScores, KFACFactors
from tfx_components.influence_scorer import executor


class InfluenceScorerSpec(types.ComponentSpec):
    PARAMETERS = {
        "feature_spec": ExecutionParameter(type=str),
        "embedding": ExecutionParameter(type=str),
        "case": ExecutionParameter(type=str),
        "alpha": ExecutionParameter(type=float),
        "damping_pretrain": ExecutionParameter(type=float, optional=True),
        "damping_finetune": ExecutionParameter(type=float, optional=True),
        "solver": ExecutionParameter(type=str),
        "max_iter": ExecutionParameter(type=int),
        "hessian_samples": ExecutionParameter(type=int, optional=True),
        "finetune_train_split": ExecutionParameter(type=str),
        "test_split": ExecutionParameter(type=str),
        "test_keys": ExecutionParameter(type=str, optional=True),
        "loss": ExecutionParameter(type=str, optional=True),
        "batch_size": ExecutionParameter(type=int, optional=True),
    }
    INPUTS = {"pretrain_examples": ChannelParameter(type=standard_artifacts.Examples),
              "finetune_examples": ChannelParameter(type=standard_artifacts.Examples),
              "pretrain_model": ChannelParameter(type=standard_artifacts.Model),
              "finetune_model": ChannelParameter(type=standard_artifacts.Model),
              "pretrain_factors": ChannelParameter(type=KFACFactors, optional=True)}
    OUTPUTS = {"scores": ChannelParameter(type=InfluenceScores)}


class InfluenceScorer(base_beam_component.BaseBeamComponent):
    SPEC_CLASS = InfluenceScorerSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, pretrain_examples: types.BaseChannel, finetune_examples: types.BaseChannel,
                 pretrain_model: types.BaseChannel, finetune_model: types.BaseChannel, feature_spec: dict,
                 embedding, case: str = "fixed", alpha: float = 0.01, damping_pretrain: Optional[float] = None,
                 damping_finetune: Optional[float] = None, solver: str = "cg_squared", max_iter: int = 200,
                 hessian_samples: Optional[int] = 1000, finetune_train_split: str = "train",
                 test_split: str = "test", test_keys=None, loss: Optional[dict] = None, batch_size: int = 256,
                 pretrain_factors: Optional[types.BaseChannel] = None):
        if case not in ("fixed", "updated"):
            raise ValueError(f"case must be 'fixed' or 'updated', got '{case}'")
        for name, value in (("damping_pretrain", damping_pretrain), ("damping_finetune", damping_finetune)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be ≥ 0, got {value}")
        spec = InfluenceScorerSpec(
            pretrain_examples=pretrain_examples, finetune_examples=finetune_examples, pretrain_model=pretrain_model,
            finetune_model=finetune_model, feature_spec=json.dumps(feature_spec), embedding=json.dumps(list(embedding)),
            case=case, alpha=float(alpha),
            damping_pretrain=None if damping_pretrain is None else float(damping_pretrain),
            damping_finetune=None if damping_finetune is None else float(damping_finetune), solver=solver, max_iter=int(max_iter),
            hessian_samples=hessian_samples, finetune_train_split=finetune_train_split, test_split=test_split,
            test_keys=json.dumps([k if isinstance(k, str) else k.decode() for k in test_keys]) if test_keys else None,
            loss=json.dumps(loss) if loss else None, batch_size=batch_size, pretrain_factors=pretrain_factors,
            scores=channel_utils.as_channel([InfluenceScores()]))
        super().__init__(spec=spec)

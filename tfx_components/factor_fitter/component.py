"""FactorFitter: (E)K-FAC curvature factors of a model over an Examples artifact, as a Beam combiner.

Inputs: ``examples`` (Examples: the corpus the curvature is taken over, e.g. the pretraining data),
``model`` (Model whose ``Format-Serving`` directory holds ``model.keras``). Parameters:
``feature_spec`` (JSON, see ``tfx_components.beam_scoring.parse_feature_spec``), ``layers`` (JSON
list of layer names whose variables are covered; default every trainable variable — what
``InfluenceScorer`` needs for the pretraining Hessian ∂²G/∂(W,U)²), ``kind`` (``ekfac`` / ``kfac``),
``fisher`` (``true``: labels sampled from the model; ``empirical``: the observed labels), ``splits``
(JSON list, default all), ``loss`` (Keras loss config JSON, default the compiled loss),
``batch_size``, ``seed``.

Output: ``factors`` (KFACFactors artifact). The driver only loads the model to check the layers;
both passes (covariances, then the EK-FAC eigenvalue correction) run in the Beam workers
(``tfx_components.beam_factors``) and only their sums are combined. Feed the artifact to
``InfluenceScorer(pretrain_factors=...)`` to replace the CG solve of the pretraining Hessian.
"""

import json
from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import channel_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from tfx_components.artifacts import KFACFactors
from tfx_components.factor_fitter import executor


class FactorFitterSpec(types.ComponentSpec):
    PARAMETERS = {
        "feature_spec": ExecutionParameter(type=str),
        "layers": ExecutionParameter(type=str, optional=True),
        "kind": ExecutionParameter(type=str),
        "fisher": ExecutionParameter(type=str),
        "splits": ExecutionParameter(type=str, optional=True),
        "loss": ExecutionParameter(type=str, optional=True),
        "batch_size": ExecutionParameter(type=int, optional=True),
        "seed": ExecutionParameter(type=int, optional=True),
    }
    INPUTS = {"examples": ChannelParameter(type=standard_artifacts.Examples),
              "model": ChannelParameter(type=standard_artifacts.Model)}
    OUTPUTS = {"factors": ChannelParameter(type=KFACFactors)}


class FactorFitter(base_beam_component.BaseBeamComponent):
    """(E)K-FAC factors of ``model`` over ``examples``, fitted by a Beam combiner, as a KFACFactors
    artifact for ``InfluenceScorer(pretrain_factors=...)``. The parameters are described in the
    module docstring.

    Example::

        from tfx_components.factor_fitter.component import FactorFitter

        factors = FactorFitter(examples=pre_gen.outputs["examples"], model=pre_trainer.outputs["model"],
                               feature_spec=spec, kind="ekfac")
        scorer = InfluenceScorer(..., pretrain_factors=factors.outputs["factors"])
    """
    SPEC_CLASS = FactorFitterSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, model: types.BaseChannel, feature_spec: dict, layers=None,
                 kind: str = "ekfac", fisher: str = "true", splits=None, loss: Optional[dict] = None,
                 batch_size: int = 256, seed: int = 0):
        if kind not in ("ekfac", "kfac"):
            raise ValueError(f"kind must be 'ekfac' or 'kfac', got '{kind}'")
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher must be 'true' or 'empirical', got '{fisher}'")
        if isinstance(layers, str):
            raise ValueError("layers must be a list of layer names")
        spec = FactorFitterSpec(
            examples=examples, model=model, feature_spec=json.dumps(feature_spec),
            layers=json.dumps(list(layers)) if layers else None, kind=kind, fisher=fisher,
            splits=json.dumps(list(splits)) if splits else None, loss=json.dumps(loss) if loss else None,
            batch_size=batch_size, seed=seed, factors=channel_utils.as_channel([KFACFactors()]))
        super().__init__(spec=spec)

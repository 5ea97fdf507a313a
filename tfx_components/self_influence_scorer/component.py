"""SelfInfluenceScorer: TracIn self-influence of every example (PRESENCE-Sequential's score).

Inputs: ``examples`` (Examples), ``model`` (Model whose ``Format-Serving`` directory holds
``model.keras``). Parameters: ``feature_spec`` (JSON: how to decode x / y / key, see
``tfx_components.beam_scoring.parse_feature_spec``), ``si_layers`` (JSON list: the layer set K; omitted: every layer with parameters),
``splits`` (JSON list, default all), ``loss`` (Keras loss config JSON, default the model's
compiled loss), ``batch_size``, ``checkpoints`` / ``learning_rates`` (TracIn over several
checkpoints: ``.weights.h5`` files of the same model, summed with their learning rates; default
the model itself with η = 1). Output: ``scores`` (InfluenceScores, ``score_kind =
"self_influence"``) with a per-split summary in its custom properties.
"""

import json
from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import channel_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from tfx_components.artifacts import InfluenceScores
from tfx_components.self_influence_scorer import executor


class SelfInfluenceScorerSpec(types.ComponentSpec):
    PARAMETERS = {
        "feature_spec": ExecutionParameter(type=str),
        "si_layers": ExecutionParameter(type=str, optional=True),
        "splits": ExecutionParameter(type=str, optional=True),
        "loss": ExecutionParameter(type=str, optional=True),
        "batch_size": ExecutionParameter(type=int, optional=True),
        "checkpoints": ExecutionParameter(type=str, optional=True),
        "learning_rates": ExecutionParameter(type=str, optional=True),
    }
    INPUTS = {"examples": ChannelParameter(type=standard_artifacts.Examples),
              "model": ChannelParameter(type=standard_artifacts.Model)}
    OUTPUTS = {"scores": ChannelParameter(type=InfluenceScores)}


class SelfInfluenceScorer(base_beam_component.BaseBeamComponent):
    """TracIn self-influence of every example of ``examples`` under ``model`` (Beam), as an
    InfluenceScores artifact — what ``ScoreFilter(mode="keep_lowest")`` (PRESENCE-Sequential) or
    ``mode="drop_top_fraction"`` reads. The parameters are described in the module docstring.

    Example (in a pipeline after a Trainer)::

        from tfx_components.self_influence_scorer.component import SelfInfluenceScorer
        from tfx_components.score_filter.component import ScoreFilter

        si = SelfInfluenceScorer(examples=example_gen.outputs["examples"], model=trainer.outputs["model"],
                                 feature_spec={"x": {"shape": [4], "dtype": "float32"},
                                               "y": {"shape": [], "dtype": "int64"}})  # K: every layer
        keep = ScoreFilter(examples=example_gen.outputs["examples"], scores=si.outputs["scores"],
                           mode="drop_top_fraction", value=0.1)
    """
    SPEC_CLASS = SelfInfluenceScorerSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, model: types.BaseChannel, feature_spec: dict, si_layers=None,
                 splits=None, loss: Optional[dict] = None, batch_size: int = 256, checkpoints=None,
                 learning_rates=None):
        if si_layers is not None and (not si_layers or isinstance(si_layers, str)):
            raise ValueError("SelfInfluenceScorer: si_layers is the layer set K, a non-empty list of layer names or "
                             "paths (or None: every layer with parameters)")
        if checkpoints and learning_rates and len(checkpoints) != len(learning_rates):
            raise ValueError(f"{len(checkpoints)} checkpoints but {len(learning_rates)} learning rates")
        spec = SelfInfluenceScorerSpec(
            examples=examples, model=model, feature_spec=json.dumps(feature_spec), si_layers=json.dumps(list(si_layers) if si_layers is not None else None),
            splits=json.dumps(list(splits)) if splits else None, loss=json.dumps(loss) if loss else None,
            batch_size=batch_size, checkpoints=json.dumps(list(checkpoints)) if checkpoints else None,
            learning_rates=json.dumps([float(v) for v in learning_rates]) if learning_rates else None,
            scores=channel_utils.as_channel([InfluenceScores()]))
        super().__init__(spec=spec)

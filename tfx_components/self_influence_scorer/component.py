"""SelfInfluenceScorer: TracIn self-influence of every example (PRESENCE-Sequential's score).

Inputs: ``examples`` (Examples), ``model`` (Model whose ``Format-Serving`` directory holds
``model.keras`` — one line in the Trainer's ``run_fn``, ``tfx_components.saving.save_for_influence``),
and optionally ``schema`` (Schema) and ``transform_graph`` (TransformGraph): the model's inputs and
its label are read from them — every named input of the model is the feature of that name (the
Transform graph's transformed features when given; raw examples then pass through the graph) — the
way TFX's Trainer reads its data. Without either, the features of the first example are used.

Parameters (all optional): ``label_key`` (the label feature; default: the one feature that is
neither a model input nor the key), ``key_feature`` (a bytes or int64 feature identifying each
example; default: none — examples are identified by file and position, which ScoreFilter
matches), ``si_layers`` (the layer set K: layer names or Keras paths; default every layer with
parameters — the paper's embedding-only K is ``["embedding"]``), ``splits`` (default all),
``loss`` (Keras loss config; default the model's compiled loss), ``batch_size``,
``checkpoints`` / ``learning_rates`` (TracIn over several checkpoints: ``.weights.h5`` files of the
same model, summed with their learning rates; default the model itself with η = 1), and
``feature_spec`` (a hand-written spec, see ``tfx_components.example_io``; overrides the derived one).
Output: ``scores`` (InfluenceScores, ``score_kind = "self_influence"``) with a per-split summary in
its custom properties.
"""

import json
from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import channel_utils
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from tfx_components import component_specs as specs
from tfx_components.artifacts import InfluenceScores
from tfx_components.self_influence_scorer import executor


class SelfInfluenceScorerSpec(types.ComponentSpec):
    PARAMETERS = {
        **specs.example_parameters(),
        **specs.scoring_parameters(),
        "si_layers": ExecutionParameter(type=str, optional=True),
        specs.SPLITS_KEY: ExecutionParameter(type=str, optional=True),
        "checkpoints": ExecutionParameter(type=str, optional=True),
        "learning_rates": ExecutionParameter(type=str, optional=True),
    }
    INPUTS = specs.examples_and_model()
    OUTPUTS = {specs.SCORES_KEY: ChannelParameter(type=InfluenceScores)}


class SelfInfluenceScorer(base_beam_component.BaseBeamComponent):
    """TracIn self-influence of every example of ``examples`` under ``model`` (Beam), as an
    InfluenceScores artifact — what ``ScoreFilter(mode="keep_lowest")`` (PRESENCE-Sequential) or
    ``mode="drop_top_fraction"`` reads. The parameters are described in the module docstring.

    Example (TFX's penguin tutorial: ``Transform`` → ``Trainer`` upstream; nothing else to declare —
    inputs and label from the Transform graph, K every layer, examples identified by position)::

        from tfx_components.self_influence_scorer.component import SelfInfluenceScorer
        from tfx_components.score_filter.component import ScoreFilter

        si = SelfInfluenceScorer(examples=transform.outputs["transformed_examples"],
                                 model=trainer.outputs["model"],
                                 transform_graph=transform.outputs["transform_graph"])
        keep = ScoreFilter(examples=transform.outputs["transformed_examples"], scores=si.outputs["scores"],
                           mode="drop_top_fraction", value=0.1)

    ``pipelines/penguin_pipeline.py`` runs exactly this under ``LocalDagRunner``.
    """
    SPEC_CLASS = SelfInfluenceScorerSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, model: types.BaseChannel, feature_spec: Optional[dict] = None,
                 si_layers=None, splits=None, loss: Optional[dict] = None, batch_size: int = 256, checkpoints=None,
                 learning_rates=None, schema: Optional[types.BaseChannel] = None,
                 transform_graph: Optional[types.BaseChannel] = None, label_key: Optional[str] = None,
                 key_feature: Optional[str] = None):
        if si_layers is not None and (not si_layers or isinstance(si_layers, str)):
            raise ValueError("SelfInfluenceScorer: si_layers is the layer set K, a non-empty list of layer names or "
                             "paths (or None: every layer with parameters)")
        if checkpoints and learning_rates and len(checkpoints) != len(learning_rates):
            raise ValueError(f"{len(checkpoints)} checkpoints but {len(learning_rates)} learning rates")
        spec = SelfInfluenceScorerSpec(
            examples=examples, model=model, schema=schema, transform_graph=transform_graph,
            feature_spec=json.dumps(feature_spec) if feature_spec else None, label_key=label_key,
            key_feature=key_feature,
            si_layers=json.dumps(list(si_layers)) if si_layers is not None else None,
            splits=json.dumps(list(splits)) if splits else None, loss=json.dumps(loss) if loss else None,
            batch_size=batch_size, checkpoints=json.dumps(list(checkpoints)) if checkpoints else None,
            learning_rates=json.dumps([float(v) for v in learning_rates]) if learning_rates else None,
            scores=channel_utils.as_channel([InfluenceScores()]))
        super().__init__(spec=spec)

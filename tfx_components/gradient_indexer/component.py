"""GradientIndexer: the projected per-example gradients of every example, written once as a
GradientIndex artifact that many queries read (``InfluenceScorer(index=...)``, the query CLI
``python -m tfx_components.beam_index query``, or ``tf_influence.index.GradientIndex`` in a notebook).

Inputs: ``examples`` (Examples), ``model`` (Model with ``model.keras``, see
``tfx_components.saving.save_for_influence``), optionally ``schema`` / ``transform_graph`` (the model's
inputs and label derived from them, as for the scorers). Parameters: ``projection_args``
(``tf_influence.projection.ProjectionArgs``, passed whole: ``k``, ``k_other``, ``layer_k``, ``seed``,
``dtype``), ``layers`` (the layers whose parameters are indexed; default every parameter — what the
multi-stage (W, U) vector of ``InfluenceScorer`` needs), ``splits``, ``batch_size``, ``loss``,
``label_key``, ``key_feature``, ``feature_spec``. Output: ``index`` (GradientIndex).
"""

import json
from typing import Optional, Union

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import channel_utils
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from tfx_components import component_specs as specs
from tfx_components.artifacts import GradientIndex
from tfx_components.gradient_indexer import executor


class GradientIndexerSpec(types.ComponentSpec):
    PARAMETERS = {
        **specs.example_parameters(),
        **specs.scoring_parameters(),
        "projection_args": ExecutionParameter(type=str),
        specs.LAYERS_KEY: ExecutionParameter(type=str, optional=True),
        specs.SPLITS_KEY: ExecutionParameter(type=str, optional=True),
    }
    INPUTS = specs.examples_and_model()
    OUTPUTS = {specs.INDEX_KEY: ChannelParameter(type=GradientIndex)}


class GradientIndexer(base_beam_component.BaseBeamComponent):
    """Index the projected per-example gradients of ``examples`` under ``model`` (Beam); the
    parameters are described in the module docstring.

    Example (after the pretraining Trainer; the InfluenceScorer then queries the index instead of
    re-scoring the corpus)::

        from tf_influence.projection import ProjectionArgs
        from tfx_components.gradient_indexer.component import GradientIndexer

        indexer = GradientIndexer(examples=pre_gen.outputs["examples"], model=pre_trainer.outputs["model"],
                                  projection_args=ProjectionArgs(k=16))
        scorer = InfluenceScorer(..., index=indexer.outputs["index"],
                                 query_args=QueryArgs(top_k=100, rerank=500))   # tf_influence.index.QueryArgs
    """
    SPEC_CLASS = GradientIndexerSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, model: types.BaseChannel, projection_args=None, layers=None,
                 splits=None, batch_size: int = 256, loss: Optional[dict] = None, feature_spec: Optional[dict] = None,
                 label_key: Optional[str] = None, key_feature: Optional[str] = None,
                 schema: Optional[types.BaseChannel] = None, transform_graph: Optional[types.BaseChannel] = None):
        args = projection_args_from(projection_args)
        if isinstance(layers, str):
            raise ValueError("GradientIndexer: layers is a list of layer names or paths")
        spec = GradientIndexerSpec(
            examples=examples, model=model, schema=schema, transform_graph=transform_graph,
            projection_args=args.to_json(), layers=json.dumps(list(layers)) if layers else None,
            splits=json.dumps(list(splits)) if splits else None, batch_size=batch_size,
            loss=json.dumps(loss) if loss else None, feature_spec=json.dumps(feature_spec) if feature_spec else None,
            label_key=label_key, key_feature=key_feature, index=channel_utils.as_channel([GradientIndex()]))
        super().__init__(spec=spec)


def projection_args_from(value: Union[None, dict, "object"]):
    """A :class:`tf_influence.projection.ProjectionArgs` from itself, its dict or ``None`` (defaults)."""
    from tf_influence.projection import ProjectionArgs
    if value is None:
        return ProjectionArgs()
    if isinstance(value, dict):
        return ProjectionArgs.from_dict(value)
    if isinstance(value, ProjectionArgs):
        return value
    raise TypeError(f"projection_args must be a ProjectionArgs or its dict, got {type(value).__name__}")

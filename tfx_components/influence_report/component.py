"""InfluenceReport: the scores of a scorer (InfluenceScorer, SelfInfluenceScorer) over the examples it
scored, as one self-contained HTML page (``tf_influence.report``): the score distribution with what a
ScoreFilter would drop, and the highest- and lowest-scored examples drawn as images, text or tables.

Inputs: ``examples`` (the scored Examples), ``scores`` (InfluenceScores). Output: ``report``
(``tf_influence.InfluenceReport``: ``index.html`` per split folder ``Split-<name>``, plus ``summary.json``),
whose ``report_path`` custom property names the page. In a notebook,
``InteractiveContext.show(report.outputs["report"])`` displays it (the visualization is registered when
this module is imported).

Example (the penguin tutorial, after a SelfInfluenceScorer)::

    from tfx_components.influence_report.component import InfluenceReport

    report = InfluenceReport(examples=transform.outputs["transformed_examples"], scores=si.outputs["scores"],
                             drop_mode="drop_top_fraction", drop_value=0.1)
"""

from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import channel_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from tfx_components.artifacts import InfluenceReport as InfluenceReportArtifact
from tfx_components.artifacts import InfluenceScores
from tfx_components.influence_report import executor
from tfx_components.influence_report.executor import (ARGS_KEY, EXAMPLES_KEY, REPORT_KEY, SCORES_KEY,
                                                     SPLITS_KEY)


class InfluenceReportSpec(types.ComponentSpec):
    PARAMETERS = {
        ARGS_KEY: ExecutionParameter(type=str),            # tf_influence.report.records.ReportArgs as JSON
        SPLITS_KEY: ExecutionParameter(type=str, optional=True),   # JSON list; default: every scored split
    }
    INPUTS = {
        EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
        SCORES_KEY: ChannelParameter(type=InfluenceScores),
    }
    OUTPUTS = {REPORT_KEY: ChannelParameter(type=InfluenceReportArtifact)}


class InfluenceReport(base_component.BaseComponent):
    """The report page of ``scores`` over ``examples`` (see the module docstring). The options are
    :class:`tf_influence.report.records.ReportArgs` (``report_args=``), or its fields as keywords
    (``renderer="image", image_shape=[8, 8], drop_mode=..., drop_value=...``)."""

    SPEC_CLASS = InfluenceReportSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, scores: types.BaseChannel, report_args=None,
                 splits: Optional[list] = None, **fields):
        import json

        from tf_influence.report.records import ReportArgs
        if report_args is not None and fields:
            raise TypeError("InfluenceReport: give report_args or its fields as keywords, not both")
        args = report_args if report_args is not None else ReportArgs(**fields)
        spec = InfluenceReportSpec(examples=examples, scores=scores, report_args=args.to_json(),
                                   splits=json.dumps(list(splits)) if splits else None,
                                   report=channel_utils.as_channel([InfluenceReportArtifact()]))
        super().__init__(spec=spec)


def _register_visualization():
    """``InteractiveContext.show()`` of an InfluenceReport artifact displays its page (as TFX registers its
    own artifacts' visualizations)."""
    try:
        from tfx.orchestration.experimental.interactive import visualizations
    except ImportError:          # TFX without the notebook extras: nothing to register
        return

    class InfluenceReportVisualization(visualizations.ArtifactVisualization):
        ARTIFACT_TYPE = InfluenceReportArtifact

        def display(self, artifact):
            from IPython.core.display import HTML, display
            display(HTML(executor.notebook_html(artifact)))

    if visualizations.get_registry().get_visualization(InfluenceReportArtifact.TYPE_NAME) is None:
        visualizations.get_registry().register(InfluenceReportVisualization)


_register_visualization()

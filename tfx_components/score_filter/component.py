"""ScoreFilter: drop pretraining examples by influence or self-influence score.

Inputs: ``examples`` (Examples), ``scores`` (InfluenceScores of those examples, from a scorer).
Examples are matched to their scores by the identity the scorer used, recorded on the scores
artifact: the scorer's ``key_feature``, or — without one — each example's file and position in
the artifact (so ``examples`` must be the very artifact that was scored).
Output: ``filtered_examples`` (Examples) with the same splits; every split that has scores is
filtered, the other splits are copied unchanged. Counts (in = kept + dropped, per split and in
total) are recorded as custom properties of the output artifact. An example without a score, a
score without an example, or a missing split fails the component with a message naming the
artifact and the split.
"""

from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import channel_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from tfx_components import component_specs as specs
from tfx_components.artifacts import InfluenceScores
from tfx_components.score_filter import executor


class ScoreFilterSpec(types.ComponentSpec):
    PARAMETERS = {
        specs.MODE_KEY: ExecutionParameter(type=str),
        specs.VALUE_KEY: ExecutionParameter(type=float),
        specs.KEY_FEATURE_KEY: ExecutionParameter(type=str, optional=True),
        specs.MAX_EXACT_BOUNDARY_KEY: ExecutionParameter(type=int, optional=True),
        specs.QUANTILE_EPSILON_KEY: ExecutionParameter(type=float, optional=True),
    }
    INPUTS = {
        specs.EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
        specs.SCORES_KEY: ChannelParameter(type=InfluenceScores),
    }
    OUTPUTS = {
        specs.FILTERED_EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
    }


class ScoreFilter(base_beam_component.BaseBeamComponent):
    """Filter Examples by per-example scores with the library's one selection rule
    (``tf_influence.selection.select_kept``, ties broken by key): ``drop_top_fraction``,
    ``drop_above``, ``keep_lowest`` — PRESENCE-Sequential —, ``keep_highest``.

    ``examples`` must be the artifact the scorer read (examples without a key feature are matched
    by file and position). Every split with scores is filtered, the others are copied; the output
    records ``filter_counts`` (in = kept + dropped per split) and ``num_in`` / ``num_kept`` /
    ``num_dropped``. Nothing is written into the output folder until the whole job succeeded.

    Example (after a SelfInfluenceScorer on Transform's output, TFX's penguin tutorial)::

        from tfx_components.score_filter.component import ScoreFilter

        drop = ScoreFilter(examples=transform.outputs["transformed_examples"], scores=si.outputs["scores"],
                           mode="drop_top_fraction", value=0.1)
        retrained = tfx.components.Trainer(module_file=module, examples=drop.outputs["filtered_examples"],
                                           transform_graph=transform.outputs["transform_graph"], ...)

    PRESENCE-Sequential keeps the ``n`` lowest self-influence scores: ``mode="keep_lowest", value=n``.
    """

    SPEC_CLASS = ScoreFilterSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, scores: types.BaseChannel, mode: str, value: float,
                 key_feature: Optional[str] = None, max_exact_boundary: Optional[int] = None,
                 quantile_epsilon: Optional[float] = None):
        """``key_feature``: optional, a check — the scores artifact already says how its examples are
        identified; a different name here fails. ``max_exact_boundary`` / ``quantile_epsilon``: above that many pairs on the smaller side of
        the cut, the boundary comes from approximate quantiles with error ``ε`` (kept count within
        ``1.5·ε·n`` of the exact rule's; defaults 10⁶ and 10⁻⁴ — see the executor)."""
        from tf_influence.selection import check_mode
        check_mode(mode, value)
        spec = ScoreFilterSpec(examples=examples, scores=scores, mode=mode, value=float(value),
                               key_feature=key_feature, max_exact_boundary=max_exact_boundary,
                               quantile_epsilon=quantile_epsilon,
                               filtered_examples=channel_utils.as_channel([standard_artifacts.Examples()]))
        super().__init__(spec=spec)

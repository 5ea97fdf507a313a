"""Custom TFX artifact types of tf-influence."""

from tfx import v1 as tfx
from tfx.types import artifact


class InfluenceScores(tfx.dsl.Artifact):
    """Per-example scores of an Examples artifact, one directory per split (``Split-<name>``),
    each holding GZIP TFRecord shards of ``tf.train.Example(key, score[, row])``
    (see ``tf_influence.scores_io``).

    Properties: ``split_names`` (JSON list, as for Examples), ``score_kind``
    (``multi_stage_fixed``, ``multi_stage_updated``, ``self_influence``, …). Custom properties
    hold a small summary (count, mean, min/max, histogram, top-k keys).
    """

    TYPE_NAME = "tf_influence.InfluenceScores"
    PROPERTIES = {
        "split_names": artifact.Property(type=artifact.PropertyType.STRING),
        "score_kind": artifact.Property(type=artifact.PropertyType.STRING),
    }

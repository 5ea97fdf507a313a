"""Custom TFX artifact types of tf-influence."""

import json

from tfx import v1 as tfx


class InfluenceScores(tfx.dsl.Artifact):
    """Per-example scores of an Examples artifact, one directory per split (``Split-<name>``),
    each holding GZIP TFRecord shards of ``tf.train.Example(key, score[, row])``
    (see ``tf_influence.scores_io``).

    Metadata lives in *custom* properties — ``split_names`` (JSON list, as for Examples),
    ``score_kind`` (``multi_stage_fixed``, ``multi_stage_updated``, ``self_influence``, ``random``),
    ``summary`` (count, mean, min/max, histogram, top-k keys per split) — because Kubeflow V2 /
    Vertex compiles custom artifact types with the generic schema, which has no typed properties.
    """

    TYPE_NAME = "tf_influence.InfluenceScores"


#: How scored examples are identified: by a key feature, or by file and position.
FILE_POSITION = "file_position"


def set_scores_metadata(artifact, split_names, score_kind: str, key_feature=None) -> None:
    """Record the splits, the kind of score and the examples' identity (``key_feature``, or — ``None`` —
    file and position, ``tfx_components.example_io.record_key``) that ScoreFilter matches."""
    artifact.set_string_custom_property("split_names", json.dumps(list(split_names)))
    artifact.set_string_custom_property("score_kind", score_kind)
    artifact.set_string_custom_property("example_identity",
                                        f"feature:{key_feature}" if key_feature else FILE_POSITION)


def scores_key_feature(artifact):
    """The key feature the scores of ``artifact`` are keyed by, or ``None`` for file-and-position keys.
    Artifacts written before the property existed were keyed by the feature ``key``."""
    raw = artifact.get_string_custom_property("example_identity")
    if not raw:
        return "key"
    return None if raw == FILE_POSITION else raw.split(":", 1)[1]


def scores_split_names(artifact) -> list:
    raw = artifact.get_string_custom_property("split_names")
    if not raw:
        raise ValueError(f"InfluenceScores artifact {artifact.uri} has no 'split_names' custom property")
    return json.loads(raw)


def scores_kind(artifact) -> str:
    return artifact.get_string_custom_property("score_kind")


class InfluenceReport(tfx.dsl.Artifact):
    """The evidence report of a scorer's output (``tf_influence.report``): ``Split-<name>/index.html`` (one
    self-contained page per split) and ``summary.json``. Custom properties: ``split_names``,
    ``report_path`` (the first page) and ``pages`` (JSON list)."""

    TYPE_NAME = "tf_influence.InfluenceReport"


class KFACFactors(tfx.dsl.Artifact):
    """(E)K-FAC curvature factors of a model (``tf_influence.kfac.KFACFactors``): ``factors.npz`` and
    ``factors.json`` in the artifact's directory, loadable with ``KFACFactors.load(artifact.uri)``.

    Custom properties: ``kind`` (``ekfac`` / ``kfac``), ``fisher`` (``true`` / ``empirical``),
    ``num_examples``, ``group_spec`` (the parameters covered) and ``summary`` (blocks and diagonal
    variables, JSON).
    """

    TYPE_NAME = "tf_influence.KFACFactors"


class GradientIndex(tfx.dsl.Artifact):
    """A gradient index of an Examples artifact (``tf_influence.index``): one folder per split
    (``Split-<name>``) with ``index.json`` and ``vectors-*.npz`` shards, loadable with
    ``tf_influence.index.GradientIndex(<uri>/Split-<name>)``. Custom properties: ``split_names``,
    ``projection`` (ProjectionArgs JSON), ``model_fingerprint``, ``dim``, ``num_examples``."""

    TYPE_NAME = "tf_influence.GradientIndex"

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


def set_scores_metadata(artifact, split_names, score_kind: str) -> None:
    artifact.set_string_custom_property("split_names", json.dumps(list(split_names)))
    artifact.set_string_custom_property("score_kind", score_kind)


def scores_split_names(artifact) -> list:
    raw = artifact.get_string_custom_property("split_names")
    if not raw:
        raise ValueError(f"InfluenceScores artifact {artifact.uri} has no 'split_names' custom property")
    return json.loads(raw)


def scores_kind(artifact) -> str:
    return artifact.get_string_custom_property("score_kind")


class KFACFactors(tfx.dsl.Artifact):
    """(E)K-FAC curvature factors of a model (``tf_influence.kfac.KFACFactors``): ``factors.npz`` and
    ``factors.json`` in the artifact's directory, loadable with ``KFACFactors.load(artifact.uri)``.

    Custom properties: ``kind`` (``ekfac`` / ``kfac``), ``fisher`` (``true`` / ``empirical``),
    ``num_examples``, ``group_spec`` (the parameters covered) and ``summary`` (blocks and diagonal
    variables, JSON).
    """

    TYPE_NAME = "tf_influence.KFACFactors"

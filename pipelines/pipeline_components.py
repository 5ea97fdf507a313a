"""Pipeline glue components (Python-function components): random scores for the random-drop
control, and the accuracy comparison that closes ``influence_pipeline``."""

import json
import os

import keras
import numpy as np
import tensorflow as tf
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import artifact_utils, standard_artifacts

from tf_influence import scores_io
from tfx_components import beam_scoring, common
from tfx_components.artifacts import InfluenceScores, set_scores_metadata


def _predict(model_artifact, x):
    """Outputs of the Keras model of a Model artifact (``Format-Serving/model.keras``)."""
    return beam_scoring.load_keras_model(common.model_path(model_artifact)).predict(x, verbose=0)


def _save_report(report, out: dict):
    with tf.io.gfile.GFile(os.path.join(report.uri, "comparison.json"), "w") as fh:
        fh.write(json.dumps(out, indent=1))
    report.set_string_custom_property("comparison", json.dumps(out, sort_keys=True))


@component
def RandomScores(examples: InputArtifact[standard_artifacts.Examples], scores: OutputArtifact[InfluenceScores],
                 seed: Parameter[int] = 0, key_feature: Parameter[str] = ""):
    """Uniform random scores for every example (the "drop a random 10 %" control), keyed like the
    scorers key them: by ``key_feature``, or (empty) by file and position."""
    from tfx_components import example_io
    splits = artifact_utils.decode_split_names(examples.split_names)
    rng = np.random.default_rng(seed)
    for split in splits:
        keys = []
        for f in common.split_files(examples, split):
            keys += example_io.batch_keys(common.read_records([f], f), key_feature or None, f, file=f)
        scores_io.write_scores(os.path.join(scores.uri, f"Split-{split}"), keys, rng.random(len(keys)))
    set_scores_metadata(scores, splits, "random", key_feature=key_feature or None)


@component
def CompareModels(test_examples: InputArtifact[standard_artifacts.Examples],
                  original: InputArtifact[standard_artifacts.Model],
                  dropped_top: InputArtifact[standard_artifacts.Model],
                  dropped_random: InputArtifact[standard_artifacts.Model],
                  report: OutputArtifact[standard_artifacts.ModelEvaluation],
                  feature_spec: Parameter[str], test_split: Parameter[str] = "test"):
    """Finetuning test accuracy and mean loss of the three finetuned models."""
    spec = beam_scoring.parse_feature_spec(feature_spec)
    _, x, y = beam_scoring.decode_batch(common.read_split(test_examples, test_split), spec,
                                        f"Examples artifact {test_examples.uri}")
    out = {}
    for name, m in (("original", original), ("drop_top", dropped_top), ("drop_random", dropped_random)):
        logits = _predict(m, x)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        out[name] = {"accuracy": float(np.mean(np.argmax(logits, 1) == y)), "loss": float(np.mean(loss))}
    out["n_test"] = int(len(y))
    _save_report(report, out)


@component
def CompareLMs(examples: InputArtifact[standard_artifacts.Examples],
               uniform: InputArtifact[standard_artifacts.Model],
               presence_sequential: InputArtifact[standard_artifacts.Model],
               presence: InputArtifact[standard_artifacts.Model],
               filtered: InputArtifact[standard_artifacts.Examples],
               report: OutputArtifact[standard_artifacts.ModelEvaluation],
               feature_spec: Parameter[str], test_split: Parameter[str] = "test"):
    """Held-out clean loss of the three language models, and how much injected noise the filter kept."""
    spec = beam_scoring.parse_feature_spec(feature_spec)
    _, x, y = beam_scoring.decode_batch(common.read_split(examples, test_split), spec,
                                        f"Examples artifact {examples.uri}")
    out = {}
    for name, m in (("uniform", uniform), ("presence_sequential", presence_sequential), ("presence", presence)):
        loss = keras.losses.sparse_categorical_crossentropy(y, _predict(m, x), from_logits=True)
        out[name] = {"heldout_loss": float(np.mean(loss))}
    keys_all, _, _ = beam_scoring.decode_batch(common.read_split(examples, "train"), spec, "pool")
    keys_kept, _, _ = beam_scoring.decode_batch(common.read_split(filtered, "train"), spec, "kept")
    noise = lambda ks: sum(k.startswith(b"noise-") for k in ks)  # noqa: E731
    out["filter"] = {"pool": len(keys_all), "kept": len(keys_kept), "noise_in_pool": noise(keys_all),
                     "noise_kept": noise(keys_kept)}
    _save_report(report, out)

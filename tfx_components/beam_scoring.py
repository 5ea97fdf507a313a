"""Beam transforms that score serialized ``tf.train.Example``s with the tf_influence library, and
the standalone Beam job.

The per-example work is one library call per batch (no formula here):

* ``self_influence`` — :func:`tf_influence.tracin.self_influence` over a layer set K;
* ``influence`` — :func:`tf_influence.gradients.per_example_dot` with the test-side vector
  ``s`` (computed once by the driver, passed as a side input), i.e. ``I(z) = ∇g(z) · s``.

Each worker loads the Keras model once (``DoFn.setup``); examples are batched
(``beam.BatchElements``). Output: ``(key, score)`` pairs, written as GZIP TFRecords in the
``tf_influence.scores_io`` layout.

Standalone job (plain Beam, no TFX)::

    python -m tfx_components.beam_scoring --examples 'data/Split-train/*' --model model.keras \\
        --feature-spec '{"x": {"name": "image", "shape": [8, 8, 1]}, "y": {"name": "label"}}' \\
        --layers embedding --output out/scores --runner DirectRunner \\
        --direct_running_mode=multi_processing --direct_num_workers=2

On Dataflow: ``--runner DataflowRunner --project P --region R --temp_location gs://B/tmp
--requirements_file requirements.txt`` with ``--examples``/``--model``/``--output`` on GCS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import apache_beam as beam
import numpy as np


def parse_feature_spec(spec) -> dict:
    """``{"x": {"name", "shape", "dtype"="float32"}, "y": {"name", "dtype"="int64", "shape"=[]},
    "key": "key"}`` → validated dict."""
    spec = json.loads(spec) if isinstance(spec, str) else dict(spec)
    for part in ("x", "y"):
        if part not in spec or "name" not in spec[part]:
            raise ValueError(f"feature spec needs '{part}': {{'name': ...}}; got {spec}")
    spec["x"].setdefault("dtype", "float32")
    spec["x"].setdefault("shape", [])
    spec["y"].setdefault("dtype", "int64")
    spec["y"].setdefault("shape", [])
    spec.setdefault("key", "key")
    return spec


def decode_batch(records, spec, desc="examples"):
    """Serialized tf.Examples → ``(keys, x, y)`` numpy arrays; raises naming a missing feature."""
    import tensorflow as tf
    keys, xs, ys = [], [], []
    for rec in records:
        feats = tf.train.Example.FromString(rec).features.feature
        for name in (spec["key"], spec["x"]["name"], spec["y"]["name"]):
            if name not in feats:
                raise ValueError(f"{desc}: an example has no feature '{name}' (it has {sorted(feats)})")
        keys.append(feats[spec["key"]].bytes_list.value[0])
        xs.append(_values(feats[spec["x"]["name"]]))
        ys.append(_values(feats[spec["y"]["name"]]))
    x = np.asarray(xs, dtype=spec["x"]["dtype"]).reshape([len(xs)] + list(spec["x"]["shape"]))
    y = np.asarray(ys, dtype=spec["y"]["dtype"]).reshape([len(ys)] + list(spec["y"]["shape"]))
    return keys, x, y


def _values(feature):
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value)


def load_keras_model(path: str):
    """A Keras model from a ``.keras`` file, or from a directory holding ``model.keras``
    (e.g. a TFX Model artifact's ``Format-Serving`` directory)."""
    import keras
    import tensorflow as tf
    candidates = [path] if path.endswith(".keras") else [os.path.join(path, "model.keras"),
                                                         os.path.join(path, "Format-Serving", "model.keras")]
    for c in candidates:
        if tf.io.gfile.exists(c):
            return keras.models.load_model(c, compile=True)
    raise FileNotFoundError(f"no Keras model file at {path} (looked for {candidates}); the training run_fn must "
                            "save `model.save(<serving_dir>/model.keras)` next to the SavedModel")


def resolve_loss(model, loss_config):
    import keras
    if loss_config:
        cfg = json.loads(loss_config) if isinstance(loss_config, str) else loss_config
        return keras.losses.deserialize(cfg) if isinstance(cfg, dict) else keras.losses.get(cfg)
    loss = getattr(model, "loss", None)
    if loss is None:
        raise ValueError(f"model '{model.name}' was saved without a compiled loss; pass the loss explicitly")
    return loss


class ScoreBatch(beam.DoFn):
    """Batch of serialized examples → ``(key, score)`` with one library call per batch."""

    def __init__(self, model_path, feature_spec, kind, layers=None, loss_config=None, group_layers=None,
                 desc="examples", checkpoints=None, learning_rates=None):
        self.model_path, self.spec, self.kind = model_path, parse_feature_spec(feature_spec), kind
        self.layers, self.loss_config, self.group_layers, self.desc = layers, loss_config, group_layers, desc
        self.checkpoints, self.learning_rates = checkpoints, learning_rates

    def setup(self):
        import tf_influence as tfi
        self.model = load_keras_model(self.model_path)
        self.objective = tfi.Objective(self.model, resolve_loss(self.model, self.loss_config))
        if self.kind == "self_influence":
            from tf_influence import tracin
            self.group = tracin.layer_set(self.model, self.layers)
        elif self.kind == "influence":
            self.group = tfi.concat_groups("(W,U)", *[tfi.group_from_layers(self.model, g) for g in self.group_layers])
        else:
            raise ValueError(f"unknown score kind '{self.kind}'")

    def process(self, records, vector=None):
        import tensorflow as tf
        from tf_influence import gradients, tracin
        keys, x, y = decode_batch(records, self.spec, self.desc)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(keys))
        if self.kind == "self_influence":
            scores = tracin.self_influence(self.objective, ds, self.group, checkpoints=self.checkpoints,
                                           learning_rates=self.learning_rates)
        else:
            scores = gradients.per_example_dot(self.objective, ds, self.group, np.asarray(vector))
        for k, s in zip(keys, scores):
            yield k, float(s)


class WriteScores(beam.PTransform):
    """``(key, score)`` → GZIP TFRecord shards ``<directory>/scores-*.tfrecord.gz``."""

    def __init__(self, directory):
        super().__init__()
        self.directory = directory

    def expand(self, pcoll):
        from tf_influence import scores_io
        return (pcoll | "Encode" >> beam.MapTuple(scores_io.encode_score)
                | "Write" >> beam.io.WriteToTFRecord(os.path.join(self.directory, "scores"),
                                                     file_name_suffix=".tfrecord.gz",
                                                     compression_type=beam.io.filesystem.CompressionTypes.GZIP))


def score_examples(pipeline, examples_pattern, model_path, feature_spec, kind, output_dir, layers=None,
                   loss_config=None, group_layers=None, vector=None, batch_size=256, label="Score",
                   checkpoints=None, learning_rates=None):
    """Add the read → batch → score → write steps to ``pipeline``; returns the scores PCollection."""
    records = pipeline | f"{label}Read" >> beam.io.ReadFromTFRecord(
        examples_pattern, coder=beam.coders.BytesCoder(), compression_type=beam.io.filesystem.CompressionTypes.AUTO)
    batches = records | f"{label}Batch" >> beam.BatchElements(min_batch_size=min(32, batch_size),
                                                             max_batch_size=batch_size)
    fn = ScoreBatch(model_path, feature_spec, kind, layers, loss_config, group_layers, desc=examples_pattern,
                    checkpoints=checkpoints, learning_rates=learning_rates)
    if vector is not None:
        side = pipeline | f"{label}Vector" >> beam.Create([np.asarray(vector)])
        scores = batches | f"{label}Score" >> beam.ParDo(fn, beam.pvalue.AsSingleton(side))
    else:
        scores = batches | f"{label}Score" >> beam.ParDo(fn)
    scores | f"{label}Write" >> WriteScores(output_dir)  # noqa: B018
    return scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", required=True, help="file pattern of GZIP TFRecord tf.Examples")
    ap.add_argument("--model", required=True, help=".keras file or a directory holding model.keras")
    ap.add_argument("--feature-spec", required=True, help="JSON, see parse_feature_spec")
    ap.add_argument("--output", required=True, help="directory for scores-*.tfrecord.gz")
    ap.add_argument("--kind", choices=["self_influence", "influence"], default="self_influence")
    ap.add_argument("--layers", nargs="+", default=None, help="layer set K (self_influence)")
    ap.add_argument("--group-layers", default=None,
                    help="JSON list of layer-name lists forming the (W, U) group (influence)")
    ap.add_argument("--vector", default=None, help=".npy file with the test-side vector s (influence)")
    ap.add_argument("--loss", default=None, help="Keras loss config JSON (default: the model's compiled loss)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--checkpoints", nargs="+", default=None,
                    help="TracIn checkpoints (.weights.h5 files) summed with --learning-rates (self_influence)")
    ap.add_argument("--learning-rates", nargs="+", type=float, default=None)
    args, beam_args = ap.parse_known_args(argv)
    if args.kind == "self_influence" and not args.layers:
        ap.error("--layers is required for --kind self_influence")
    if args.kind == "influence" and (not args.vector or not args.group_layers):
        ap.error("--vector and --group-layers are required for --kind influence")
    from apache_beam.options.pipeline_options import PipelineOptions
    vector = np.load(args.vector) if args.vector else None
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        score_examples(p, args.examples, args.model, args.feature_spec, args.kind, args.output, args.layers,
                       args.loss, json.loads(args.group_layers) if args.group_layers else None, vector,
                       args.batch_size, checkpoints=args.checkpoints, learning_rates=args.learning_rates)
    print(f"wrote scores to {args.output}")


if __name__ == "__main__":
    sys.exit(main())

"""Beam transforms that score serialized ``tf.train.Example``s with the tf_influence library, and
the standalone Beam job.

The per-example work is one library call per batch (no formula here):

* ``self_influence`` — :func:`tf_influence.tracin.self_influence` over the layer set K (``si_layers``);
* ``influence`` — :func:`tf_influence.gradients.per_example_dot` with the test-side vector
  ``s`` (computed once by the driver, passed as a side input), i.e. ``I(z) = ∇g(z) · s``, over
  the parameter group of ``s``, rebuilt in every worker from its serialised
  :class:`tf_influence.params.GroupSpec` (checked variable by variable).

Each worker loads the Keras model once (``DoFn.setup``) and takes whole examples files (the file
names are reshuffled over the workers); each file is read, scored in batches and written as one
GZIP TFRecord scores file (``(key, score)`` records, the ``tf_influence.scores_io`` layout),
published under its final name only when every file is scored.

Standalone job (plain Beam, no TFX)::

    python -m tfx_components.beam_scoring --examples 'data/Split-train/*' --model model.keras \\
        --feature-spec '{"x": {"name": "image", "shape": [8, 8, 1]}, "y": {"name": "label"}}' \\
        --si-layers embedding --output out/scores --runner DirectRunner \\
        --direct_running_mode=multi_processing --direct_num_workers=2

    # influence scores from a saved InfluenceResult (test_vector.npy + result.json's group spec):
    python -m tfx_components.beam_scoring --kind influence --result saved_result/ ...

On Dataflow: ``--runner DataflowRunner --project P --region R --temp_location gs://B/tmp
--setup_file ./setup.py`` with ``--examples``/``--model``/``--output`` on GCS (compiled in the
tests with ``--dry_run``; not run here). On a Dask cluster:
``--runner tfx_components.dask_runner.DaskRunner --dask_client_address tcp://HOST:8786``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

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


def example_key(feats, key_feature: str, desc: str = "examples") -> bytes:
    """The identity of one example: its ``key_feature`` as bytes — a bytes feature as is, an int64
    feature (e.g. a CSV ID column) as its decimal digits. Anything else fails naming the feature and
    ``desc`` (the file or artifact)."""
    feat = feats.get(key_feature)
    if feat is None:
        raise ValueError(f"{desc}: an example has no key feature '{key_feature}' (it has {sorted(feats)}); "
                         "name the example's identity with key_feature / the feature spec's \"key\"")
    if feat.bytes_list.value:
        return feat.bytes_list.value[0]
    if feat.int64_list.value:
        return str(int(feat.int64_list.value[0])).encode()
    kind = "float" if feat.float_list.value else "empty"
    raise ValueError(f"{desc}: the key feature '{key_feature}' of an example is {kind}; a key is a bytes or "
                     "int64 feature with one value")


def decode_batch(records, spec, desc="examples"):
    """Serialized tf.Examples → ``(keys, x, y)`` numpy arrays; raises naming a missing feature."""
    import tensorflow as tf
    keys, xs, ys = [], [], []
    for rec in records:
        feats = tf.train.Example.FromString(rec).features.feature
        for name in (spec["x"]["name"], spec["y"]["name"]):
            if name not in feats:
                raise ValueError(f"{desc}: an example has no feature '{name}' (it has {sorted(feats)})")
        keys.append(example_key(feats, spec["key"], desc))
        xs.append(_values(feats[spec["x"]["name"]]))
        ys.append(_values(feats[spec["y"]["name"]]))
    return keys, _stack(xs, spec["x"], desc), _stack(ys, spec["y"], desc)


def _stack(values, part: dict, desc: str):
    """One feature of every example as ``[n, *shape]``; names the feature when its size is wrong."""
    shape = [int(d) for d in part["shape"]]
    want = int(np.prod(shape)) if shape else 1
    sizes = {len(v) for v in values}
    if sizes != {want}:
        raise ValueError(f"{desc}: feature '{part['name']}' has {sorted(sizes)} value(s) per example but the feature "
                         f"spec's shape {shape} needs {want}")
    return np.asarray(values, dtype=part["dtype"]).reshape([len(values)] + shape)


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
            with warnings.catch_warnings():
                # scoring never uses the optimizer: a saved optimizer whose slots were not built is harmless
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                return keras.models.load_model(c, compile=True)
    raise FileNotFoundError(f"no Keras model file at {path} (looked for {candidates}); add "
                            "`tfx_components.saving.save_for_influence(model, fn_args)` to the Trainer's run_fn "
                            "(Keras 3 cannot rebuild trainable layers from the SavedModel alone)")


def resolve_loss(model, loss_config):
    import keras
    if loss_config:
        cfg = json.loads(loss_config) if isinstance(loss_config, str) else loss_config
        return keras.losses.deserialize(cfg) if isinstance(cfg, dict) else keras.losses.get(cfg)
    loss = getattr(model, "loss", None)
    if loss is None:
        raise ValueError(f"model '{model.name}' was saved without a compiled loss; pass the loss explicitly")
    return loss


KINDS = ("self_influence", "influence")


class ScoreBatch(beam.DoFn):
    """Batch of serialized examples → ``(key, score)`` with one library call per batch."""

    def __init__(self, model_path, feature_spec, kind, si_layers=None, loss_config=None, group_spec=None,
                 desc="examples", checkpoints=None, learning_rates=None, worker_threads=None):
        if kind not in KINDS:
            raise ValueError(f"unknown score kind '{kind}'; choose one of {KINDS}")
        self.model_path, self.spec, self.kind = model_path, parse_feature_spec(feature_spec), kind
        self.si_layers, self.loss_config, self.desc = si_layers, loss_config, desc
        self.group_spec = group_spec if group_spec is None or isinstance(group_spec, str) else group_spec.to_json()
        self.checkpoints, self.learning_rates = checkpoints, learning_rates
        self.worker_threads = worker_threads

    def setup(self):
        import tf_influence as tfi
        if self.worker_threads:  # one process per core (as Dataflow's Python workers): one TF thread each
            import tensorflow as tf
            try:
                tf.config.threading.set_intra_op_parallelism_threads(int(self.worker_threads))
                tf.config.threading.set_inter_op_parallelism_threads(int(self.worker_threads))
            except RuntimeError:  # TensorFlow already initialised in this process (in-process runners)
                pass
        self.model = load_keras_model(self.model_path)
        self.objective = tfi.Objective(self.model, resolve_loss(self.model, self.loss_config))
        if self.kind == "self_influence":
            from tf_influence import tracin
            self.group = tracin.layer_set(self.model, self.si_layers)
        else:
            self.group = tfi.ParameterGroup.from_spec(self.model, self.group_spec)

    def score(self, records, vector=None):
        """``(keys, scores)`` of a batch of serialized examples (one library call)."""
        import tensorflow as tf
        from tf_influence import gradients, tracin
        keys, x, y = decode_batch(records, self.spec, self.desc)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(keys))
        if self.kind == "self_influence":
            scores = tracin.self_influence(self.objective, ds, self.group, checkpoints=self.checkpoints,
                                           learning_rates=self.learning_rates)
        else:
            scores = gradients.per_example_dot(self.objective, ds, self.group, np.asarray(vector))
        return keys, scores

    def process(self, records, vector=None):
        keys, scores = self.score(records, vector)
        for k, s in zip(keys, scores):
            yield k, float(s)


def _record_batches(path, batch_size, threads=None):
    """Batches of a TFRecord file's serialized records (TensorFlow's C++ reader; GZIP by the
    ``.gz`` / ``.gzip`` extension); a corrupt or truncated file fails naming the file.
    ``threads``: the size of tf.data's own thread pool (which intra-op settings do not limit)."""
    import tensorflow as tf
    gz = path.endswith((".gz", ".gzip"))
    try:
        ds = tf.data.TFRecordDataset(path, compression_type="GZIP" if gz else "").batch(batch_size)
        if threads:
            opts = tf.data.Options()
            opts.threading.private_threadpool_size = int(threads)
            opts.threading.max_intra_op_parallelism = 1
            ds = ds.with_options(opts)
        for batch in ds.as_numpy_iterator():
            yield list(batch)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
        raise IOError(f"reading {path}: corrupt or truncated TFRecord file ({e.message.splitlines()[0]})") from None


class ScoreFile(ScoreBatch):
    """One examples file → one scores file: reads it in batches of ``batch_size``, scores each
    batch with one library call, writes ``(key, score)`` records to a temporary GZIP TFRecord file
    under ``<output_dir>/.tmp-<id>/`` and emits ``(input path, temporary path, count)``. No
    per-example Beam element: at this job's cost per example (tens of µs of TensorFlow) Beam's
    per-element overhead would dominate (measured: 1·10⁵ digits took 22 s through
    ``ReadFromTFRecord`` → ``BatchElements`` → ``WriteToTFRecord`` in one process, of which 5 s
    were reading, decoding, scoring and encoding)."""

    def __init__(self, *args, output_dir, batch_size=256, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_dir, self.batch_size = output_dir, int(batch_size)

    def process(self, path, vector=None):
        import uuid

        import tensorflow as tf

        from tf_influence import scores_io
        tmp_dir = os.path.join(self.output_dir, f".tmp-{uuid.uuid4().hex}")
        tf.io.gfile.makedirs(tmp_dir)
        tmp = os.path.join(tmp_dir, "scores.tfrecord.gz")
        n = 0
        with tf.io.TFRecordWriter(tmp, options="GZIP") as writer:
            for records in _record_batches(path, self.batch_size, self.worker_threads):
                try:
                    keys, scores = self.score(records, vector)
                except ValueError as e:  # e.g. an example without the key feature: name the file
                    raise ValueError(f"{path}: {e}") from None
                for k, s in zip(keys, scores):
                    writer.write(scores_io.encode_score(k, float(s)))
                n += len(keys)
        yield path, tmp, n


def _publish(written, output_dir):
    """Move the temporary score files into place as ``scores-<i>-of-<n>.tfrecord.gz`` (in input file
    order), after removing score files of an earlier run in ``output_dir``; runs once, after every
    file was scored — a failed job publishes nothing."""
    import tensorflow as tf

    from tf_influence import scores_io
    written = sorted(written)
    for old in tf.io.gfile.glob(os.path.join(output_dir, scores_io.PATTERN)):
        tf.io.gfile.remove(old)
    total = 0
    for i, (_, tmp, n) in enumerate(written):
        tf.io.gfile.rename(tmp, os.path.join(output_dir, f"scores-{i:05d}-of-{len(written):05d}.tfrecord.gz"),
                           overwrite=True)
        tf.io.gfile.rmtree(os.path.dirname(tmp))
        total += n
    return total


TEMPORARY_PATTERNS = (".tmp-*", "beam-temp-*")   # this job's and Beam's WriteToTFRecord's


def remove_temporaries(output_dir: str) -> list:
    """Delete what an earlier failed or killed run left in ``output_dir`` (``.tmp-*`` score files,
    ``beam-temp-*`` shards); called when a job starts, so a rerun into the same folder leaves
    nothing partial beside the published files. Returns the removed paths."""
    import tensorflow as tf
    removed = []
    for pattern in TEMPORARY_PATTERNS:
        for path in tf.io.gfile.glob(os.path.join(output_dir, pattern)):
            (tf.io.gfile.rmtree if tf.io.gfile.isdir(path) else tf.io.gfile.remove)(path)
            removed.append(path)
    return removed


class ShardNames(beam.PTransform):
    """File pattern → its file names, spread over the workers: listed once when the pipeline is
    built, then reshuffled, so that each worker takes whole files. (``ReadFromTFRecord`` reads every
    file inside one fused stage: on the DirectRunner's multi-processing mode that is one worker,
    whatever ``direct_num_workers`` says — 2 workers measured 1.02–1.07× one.) Parallelism is the
    number of files: write corpora in shards."""

    def __init__(self, pattern: str):
        super().__init__()
        import tensorflow as tf
        self.pattern = pattern
        self.files = sorted(tf.io.gfile.glob(pattern))
        if not self.files:
            raise IOError(f"No files found based on the file pattern {pattern}")

    def expand(self, pbegin):
        return pbegin | "Files" >> beam.Create(self.files) | "Spread" >> beam.Reshuffle()


def score_examples(pipeline, examples_pattern, model_path, feature_spec, kind, output_dir, si_layers=None,
                   loss_config=None, group_spec=None, vector=None, batch_size=256, label="Score",
                   checkpoints=None, learning_rates=None, worker_threads=None):
    """Add the scoring job to ``pipeline``: the examples files (spread over the workers, one file
    at a time) → :class:`ScoreFile` (read in batches of ``batch_size``, one library call per batch,
    one scores file per examples file) → ``<output_dir>/scores-<i>-of-<n>.tfrecord.gz``, published
    once every file is scored. Returns the PCollection with the number of scores written.

    ``kind="self_influence"`` scores over ``si_layers`` (``None``: every layer with parameters);
    ``kind="influence"`` needs ``vector`` (the
    test-side ``s``, a side input) and ``group_spec`` (the :class:`~tf_influence.params.GroupSpec`
    of ``s``). ``worker_threads``: TensorFlow threads per worker process (default: TensorFlow's, all
    cores — right for one worker per machine; with one worker process per core, 1)."""
    if kind == "influence" and (vector is None or group_spec is None):
        raise ValueError("influence scoring needs the test-side vector and its parameter group spec")
    files = pipeline | f"{label}Read" >> ShardNames(examples_pattern)
    fn = ScoreFile(model_path, feature_spec, kind, si_layers, loss_config, group_spec, desc=examples_pattern,
                   checkpoints=checkpoints, learning_rates=learning_rates, worker_threads=worker_threads,
                   output_dir=output_dir, batch_size=batch_size)
    if vector is not None:
        side = pipeline | f"{label}Vector" >> beam.Create([np.asarray(vector)])
        written = files | f"{label}Score" >> beam.ParDo(fn, beam.pvalue.AsSingleton(side))
    else:
        written = files | f"{label}Score" >> beam.ParDo(fn)
    return (written | f"{label}Collect" >> beam.combiners.ToList()
            | f"{label}Write" >> beam.Map(_publish, output_dir))


def main(argv=None):
    from tf_influence import console
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", required=True, help="file pattern of GZIP TFRecord tf.Examples")
    ap.add_argument("--model", required=True, help=".keras file or a directory holding model.keras")
    ap.add_argument("--feature-spec", required=True, help="JSON, see parse_feature_spec")
    ap.add_argument("--output", required=True, help="directory for scores-*.tfrecord.gz")
    ap.add_argument("--kind", choices=KINDS, default="self_influence")
    ap.add_argument("--si-layers", nargs="+", default=None,
                    help="layer set K of self_influence: layer names or Keras paths (default: every layer with "
                         "parameters; the paper's K is the embedding: --si-layers embedding)")
    ap.add_argument("--result", default=None,
                    help="directory of a saved InfluenceResult: its test_vector.npy and group spec (influence)")
    ap.add_argument("--vector", default=None, help=".npy file with the test-side vector s (influence; or --result)")
    ap.add_argument("--group-spec", default=None,
                    help="GroupSpec JSON (or a .json file) of the parameters of s (influence; or --result)")
    ap.add_argument("--loss", default=None, help="Keras loss config JSON (default: the model's compiled loss)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--checkpoints", nargs="+", default=None,
                    help="TracIn checkpoints (.weights.h5 files) summed with --learning-rates (self_influence)")
    ap.add_argument("--learning-rates", nargs="+", type=float, default=None)
    ap.add_argument("--worker-threads", type=int, default=None,
                    help="TensorFlow threads per worker process (default all cores; 1 with one worker per core)")
    console.add_verbose_flag(ap)
    args, beam_args = ap.parse_known_args(argv)
    console.quiet(args.verbose)
    vector, group_spec = None, None
    if args.kind == "influence":
        if args.result:
            import tf_influence as tfi
            saved = tfi.InfluenceResult.load(args.result)
            if saved.group_spec is None:
                ap.error(f"--result {args.result}: the saved result has no group spec")
            vector, group_spec = np.asarray(saved.test_vector), saved.group_spec.to_json()
        if args.vector:
            vector = np.load(args.vector)
        if args.group_spec:
            group_spec = open(args.group_spec).read() if args.group_spec.endswith(".json") else args.group_spec
        if vector is None or group_spec is None:
            ap.error("--kind influence needs --result, or --vector and --group-spec")
        if vector.ndim != 1:
            ap.error(f"the test vector must be one vector (test target 'sum'), got shape {vector.shape}")
    from apache_beam.options.pipeline_options import PipelineOptions
    remove_temporaries(args.output)   # a killed earlier run's partial files (components: common.run_beam)
    try:
        with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
            score_examples(p, args.examples, args.model, args.feature_spec, args.kind, args.output, args.si_layers,
                           args.loss, group_spec, vector, args.batch_size, checkpoints=args.checkpoints,
                           learning_rates=args.learning_rates, worker_threads=args.worker_threads)
    except BaseException:   # a failure or Ctrl-C: no partial score file stays in --output
        remove_temporaries(args.output)
        raise
    print(f"wrote scores to {args.output}")


if __name__ == "__main__":
    # run the importable module's main, not this __main__ copy: the DoFns must be pickled as
    # tfx_components.beam_scoring.<class>, which worker processes can import (a __main__ class they cannot)
    from tfx_components import beam_scoring as _module
    sys.exit(_module.main())

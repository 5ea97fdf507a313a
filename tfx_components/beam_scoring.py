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

    # features, label and K derived: the model's named inputs, the one other feature as label, every layer
    python -m tfx_components.beam_scoring --examples 'data/Split-train/*' --model model.keras \\
        --output out/scores --runner DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2

    # or said explicitly: a hand-written spec, a key feature, the paper's embedding-only K
    python -m tfx_components.beam_scoring --examples 'data/Split-train/*' --model model.keras \\
        --feature-spec '{"x": {"name": "image", "shape": [8, 8, 1]}, "y": {"name": "label"}, "key": "key"}' \\
        --si-layers embedding --output out/scores

    # influence scores from a saved InfluenceResult (test_vector.npy + result.json's group spec):
    python -m tfx_components.beam_scoring --kind influence --result saved_result/ ...

On Dataflow: ``--runner DataflowRunner --project P --region R --temp_location gs://B/tmp
--setup_file ./setup.py`` with ``--examples``/``--model``/``--output`` on GCS (compiled in the
tests with ``--dry_run``; not run here). On a Dask cluster:
``--runner tfx_components.dask_runner.DaskRunner --dask_client_address tcp://HOST:8786``.
"""

from __future__ import annotations

import argparse
import os
import sys

import apache_beam as beam
import numpy as np


from tfx_components.example_io import (decode_batch, example_key, load_keras_model,  # noqa: F401 (re-exported)
                                      parse_feature_spec, record_batches, resolve_loss)


KINDS = ("self_influence", "influence")


class ScoreBatch(beam.DoFn):
    """Batch of serialized examples → ``(key, score)`` with one library call per batch."""

    def __init__(self, model_path, feature_spec, kind, si_layers=None, loss_config=None, group_spec=None,
                 desc="examples", checkpoints=None, learning_rates=None, worker_threads=None, vector_path=None):
        if kind not in KINDS:
            raise ValueError(f"unknown score kind '{kind}'; choose one of {KINDS}")
        self.model_path, self.spec, self.kind = model_path, parse_feature_spec(feature_spec), kind
        self.si_layers, self.loss_config, self.desc = si_layers, loss_config, desc
        self.group_spec = group_spec if group_spec is None or isinstance(group_spec, str) else group_spec.to_json()
        self.checkpoints, self.learning_rates = checkpoints, learning_rates
        self.worker_threads = worker_threads
        self.vector_path = vector_path        # the test-side vector's .npy file (influence), read in setup

    def setup(self):
        import tf_influence as tfi
        from tfx_components.example_io import set_worker_threads
        set_worker_threads(self.worker_threads)
        self.model = load_keras_model(self.model_path)
        self.vector = None
        if self.vector_path:                          # the test-side vector, read once per worker
            import tensorflow as tf
            self.vector = tf.constant(load_vector(self.vector_path))
        self.objective = tfi.Objective(self.model, resolve_loss(self.model, self.loss_config))
        if self.kind == "self_influence":
            from tf_influence import tracin
            self.group = tracin.layer_set(self.model, self.si_layers)
        else:
            self.group = tfi.ParameterGroup.from_spec(self.model, self.group_spec)

    def score(self, records, vector=None, file=None, start=0):
        """``(keys, scores)`` of a batch of serialized examples (one library call); ``file`` /
        ``start``: where the batch comes from (the identity of examples without a key feature)."""
        import tensorflow as tf
        from tf_influence import gradients, tracin
        keys, x, y = decode_batch(records, self.spec, self.desc, file=file, start=start)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(keys))
        if self.kind == "self_influence":
            scores = tracin.self_influence(self.objective, ds, self.group, checkpoints=self.checkpoints,
                                           learning_rates=self.learning_rates)
        else:
            scores = gradients.per_example_dot(self.objective, ds, self.group, vector)
        return keys, scores

    def process(self, records, vector=None):
        keys, scores = self.score(records, self.vector if vector is None else vector)
        for k, s in zip(keys, scores):
            yield k, float(s)


class ScoreFile(ScoreBatch):
    """One examples file → one scores file: reads it in batches of ``batch_size``, scores each
    batch with one library call, writes ``(key, score)`` records to a temporary GZIP TFRecord file
    under ``<temp_dir>/.tmp-<id>/`` (``temp_dir`` defaults to ``output_dir``; the components pass
    their execution's own temporary folder, so a killed run leaves nothing in an output folder) and emits ``(input path, temporary path, count)``. No
    per-example Beam element: at this job's cost per example (tens of µs of TensorFlow) Beam's
    per-element overhead would dominate (measured: 1·10⁵ digits took 22 s through
    ``ReadFromTFRecord`` → ``BatchElements`` → ``WriteToTFRecord`` in one process, of which 5 s
    were reading, decoding, scoring and encoding)."""

    def __init__(self, *args, output_dir, batch_size=256, temp_dir=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_dir, self.batch_size = output_dir, int(batch_size)
        self.temp_dir = temp_dir or output_dir

    def process(self, path, vector=None):
        vector = self.vector if vector is None else vector
        import uuid

        import tensorflow as tf

        from tf_influence import scores_io
        tmp_dir = os.path.join(self.temp_dir, f".tmp-{uuid.uuid4().hex}")
        tf.io.gfile.makedirs(tmp_dir)
        tmp = os.path.join(tmp_dir, "scores.tfrecord.gz")
        n = 0
        with tf.io.TFRecordWriter(tmp, options="GZIP") as writer:
            for records in record_batches(path, self.batch_size, self.worker_threads):
                try:
                    keys, scores = self.score(records, vector, file=path, start=n)
                except ValueError as e:  # e.g. an example without the key feature: name the file
                    raise ValueError(f"{path}: {e}") from None
                for k, s in zip(keys, scores):
                    writer.write(scores_io.encode_score(k, float(s)))
                n += len(keys)
        yield path, tmp, n


def _publish(written, output_dir, vector_file=None):
    """Move the temporary score files into place as ``scores-<i>-of-<n>.tfrecord.gz`` (in input file
    order), after removing score files of an earlier run in ``output_dir``; runs once, after every
    file was scored — a failed job publishes nothing. ``vector_file``: the job's own copy of the test
    vector (:func:`_write_vector`), removed with its folder."""
    import tensorflow as tf

    from tf_influence import scores_io
    written = sorted(written)
    tf.io.gfile.makedirs(output_dir)
    for old in tf.io.gfile.glob(os.path.join(output_dir, scores_io.PATTERN)):
        tf.io.gfile.remove(old)
    total = 0
    for i, (_, tmp, n) in enumerate(written):
        tf.io.gfile.rename(tmp, os.path.join(output_dir, f"scores-{i:05d}-of-{len(written):05d}.tfrecord.gz"),
                           overwrite=True)
        tf.io.gfile.rmtree(os.path.dirname(tmp))
        total += n
    if vector_file and tf.io.gfile.exists(os.path.dirname(vector_file)):
        tf.io.gfile.rmtree(os.path.dirname(vector_file))
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
                   checkpoints=None, learning_rates=None, worker_threads=None, temp_dir=None):
    """Add the scoring job to ``pipeline``: the examples files (spread over the workers, one file
    at a time) → :class:`ScoreFile` (read in batches of ``batch_size``, one library call per batch,
    one scores file per examples file) → ``<output_dir>/scores-<i>-of-<n>.tfrecord.gz``, published
    once every file is scored. Returns the PCollection with the number of scores written.

    ``kind="self_influence"`` scores over ``si_layers`` (``None``: every layer with parameters);
    ``kind="influence"`` needs ``vector`` (the
    test-side ``s``, a side input) and ``group_spec`` (the :class:`~tf_influence.params.GroupSpec`
    of ``s``). ``worker_threads``: TensorFlow threads per worker process (default: TensorFlow's, all
    cores — right for one worker per machine; with one worker process per core, 1). ``temp_dir``:
    where the score files are written until every file is scored (default ``output_dir``; the
    components use their execution's temporary folder)."""
    if kind == "influence" and (vector is None or group_spec is None):
        raise ValueError("influence scoring needs the test-side vector and its parameter group spec")
    vector_path, written_here = None, None
    if vector is not None:
        if isinstance(vector, (str, os.PathLike)):
            vector_path = str(vector)
        else:
            vector_path = written_here = _write_vector(vector, temp_dir or output_dir)
    files = pipeline | f"{label}Read" >> ShardNames(examples_pattern)
    fn = ScoreFile(model_path, feature_spec, kind, si_layers, loss_config, group_spec, desc=examples_pattern,
                   checkpoints=checkpoints, learning_rates=learning_rates, worker_threads=worker_threads,
                   output_dir=output_dir, batch_size=batch_size, temp_dir=temp_dir, vector_path=vector_path)
    written = files | f"{label}Score" >> beam.ParDo(fn)
    return (written | f"{label}Collect" >> beam.combiners.ToList()
            | f"{label}Write" >> beam.Map(_publish, output_dir, written_here))


def _write_vector(vector, folder: str) -> str:
    """The test-side vector as ``<folder>/.tmp-vector-<id>/vector.npy``, for the workers to read once each.
    Not a Beam side input or a ``Create``d element: those are pickled into the pipeline (compressed — 73 s
    for GPT-2-mid's 65 MB vector, most of a 140 s job) and copied per consumer. A ``.tmp-`` folder:
    :func:`remove_temporaries` removes it with the job's other temporaries."""
    import uuid

    import tensorflow as tf
    folder = os.path.join(folder, f".tmp-vector-{uuid.uuid4().hex}")
    tf.io.gfile.makedirs(folder)
    path = os.path.join(folder, "vector.npy")
    with tf.io.gfile.GFile(path, "wb") as fh:
        np.save(fh, np.asarray(vector))
    return path


def load_vector(path: str) -> np.ndarray:
    """A ``.npy`` vector from a local or remote (``gs://``) path: memory-mapped where local."""
    import tensorflow as tf
    if "://" not in str(path):
        return np.load(path, mmap_mode="r")
    with tf.io.gfile.GFile(path, "rb") as fh:
        return np.load(fh)


def resolve_spec(args) -> dict:
    """The job's feature spec: ``--feature-spec``, else derived from the model's inputs and
    ``--transform-graph`` / ``--schema`` / the first example of the first file."""
    import tensorflow as tf

    from tfx_components import example_io
    files = sorted(tf.io.gfile.glob(args.examples))
    if not files:
        raise IOError(f"No files found based on the file pattern {args.examples}")
    sample = None
    if not args.feature_spec:
        sample = next(record_batches(files[0], 1), [None])[0]
        if sample is None:
            raise ValueError(f"{files[0]}: no examples to read the features from")
    model = None if args.feature_spec else example_io.load_keras_model(args.model)
    return example_io.resolve_feature_spec(model, args.feature_spec, schema=args.schema,
                                           transform_graph=args.transform_graph, sample_record=sample,
                                           label_key=args.label_key, key_feature=args.key_feature,
                                           desc=args.examples)


def main(argv=None):
    from tf_influence import console
    from tfx_components import example_io
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from tf_influence.cli import add_arguments
    io = add_arguments(ap, example_io.ExampleSource,
                       title="examples, model and features (default: derived from the model's named inputs)")
    io.add_argument("--output", required=True,
                    help="folder for scores-<i>-of-<n>.tfrecord.gz ((key, score) records); earlier score files "
                         "and temporaries there are replaced, nothing partial is published")
    ap.add_argument("--kind", choices=KINDS, default="self_influence",
                    help="self_influence (TracIn SI over --si-layers) or influence (gradient . s with the test "
                         "vector of --result, or --vector and --group-spec)")
    ap.add_argument("--si-layers", nargs="+", default=None,
                    help="layer set K of self_influence: layer names or Keras paths (default: every layer with "
                         "parameters; the paper's K is the embedding: --si-layers embedding)")
    ap.add_argument("--result", default=None,
                    help="directory of a saved InfluenceResult: its test_vector.npy and group spec (influence)")
    ap.add_argument("--vector", default=None, help=".npy file with the test-side vector s (influence; or --result)")
    ap.add_argument("--group-spec", default=None,
                    help="GroupSpec JSON (or a .json file) of the parameters of s (influence; or --result)")
    ap.add_argument("--checkpoints", nargs="+", default=None,
                    help="TracIn checkpoints (.weights.h5 files) summed with --learning-rates (self_influence)")
    ap.add_argument("--learning-rates", nargs="+", type=float, default=None,
                    help="one learning rate per --checkpoints file (TracIn's eta; default 1 each)")
    console.add_verbose_flag(ap)
    args, beam_args = ap.parse_known_args(argv)
    from tf_influence.cli import from_args
    from_args(example_io.ExampleSource, args, parser=ap)  # validated once, in the dataclass
    console.quiet(args.verbose)
    vector, group_spec = None, None
    if args.kind == "influence":
        if args.result:
            import tf_influence as tfi
            saved = tfi.InfluenceResult.load(args.result)
            if saved.group_spec is None:
                ap.error(f"--result {args.result}: the saved result has no group spec")
            # the saved file itself goes to the workers (read once each), not an array in the pipeline
            vector, group_spec = os.path.join(args.result, "test_vector.npy"), saved.group_spec.to_json()
            del saved
        if args.vector:
            vector = args.vector
        if args.group_spec:
            group_spec = open(args.group_spec).read() if args.group_spec.endswith(".json") else args.group_spec
        if vector is None or group_spec is None:
            ap.error("--kind influence needs --result, or --vector and --group-spec")
        shape = load_vector(vector).shape
        if len(shape) != 1:
            ap.error(f"the test vector must be one vector (test target 'sum'), got shape {shape}")
    feature_spec = resolve_spec(args)
    from apache_beam.options.pipeline_options import PipelineOptions
    remove_temporaries(args.output)   # a killed earlier run's partial files (components: common.run_beam)
    try:
        with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
            score_examples(p, args.examples, args.model, feature_spec, args.kind, args.output, args.si_layers,
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

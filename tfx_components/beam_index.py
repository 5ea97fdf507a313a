"""The gradient index at corpus scale: a Beam job that writes the projected per-example gradients of
every example (:mod:`tf_influence.index`), and the query command.

Each worker loads the Keras model once (``DoFn.setup``), takes whole examples files (reshuffled over
the workers, as the scoring job), projects them in batches with one library call per batch
(:class:`tf_influence.projection.GradientProjector`) and writes one shard per examples file under a
temporary name; the shards and ``index.json`` (written last) are published only when every file is
done. Memory per worker: one examples file's projected vectors.

Build (plain Beam; on Dataflow / Dask the scoring job's runner flags apply)::

    python -m tfx_components.beam_index build --examples 'data/Split-train/*' --model model.keras \\
        --output index/ --k 16 --direct_running_mode=multi_processing --direct_num_workers=2

Query with a saved InfluenceResult's test vector (``Analyzer.influence`` / ``MultiStageInfluence``
results carry ``s`` and the group spec; the index must cover the same group)::

    python -m tfx_components.beam_index query --index index/ --model model.keras \\
        --result influence_out/first --top-k 100 --out top.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import apache_beam as beam
import numpy as np

from tfx_components.beam_scoring import ShardNames, remove_temporaries
from tfx_components.example_io import record_batches
from tfx_components.example_io import decode_batch, load_keras_model, parse_feature_spec, resolve_loss


class IndexFile(beam.DoFn):
    """One examples file → one shard of projected gradients (temporary name), ``(path, tmp, count)``."""

    def __init__(self, model_path, feature_spec, projection_json, group_spec=None, loss_config=None,
                 temp_dir=".", batch_size=256, desc="examples", worker_threads=None):
        self.model_path, self.spec = model_path, parse_feature_spec(feature_spec)
        self.projection_json, self.group_spec, self.loss_config = projection_json, group_spec, loss_config
        self.temp_dir, self.batch_size, self.desc, self.worker_threads = temp_dir, int(batch_size), desc, worker_threads

    def setup(self):
        import tf_influence as tfi
        from tf_influence.projection import GradientProjector, ProjectionArgs
        from tfx_components.example_io import set_worker_threads
        set_worker_threads(self.worker_threads)
        model = load_keras_model(self.model_path)
        objective = tfi.Objective(model, resolve_loss(model, self.loss_config))
        group = tfi.ParameterGroup.from_spec(model, self.group_spec) if self.group_spec else None
        self.projector = GradientProjector(objective, group, ProjectionArgs.from_json(self.projection_json))
        from tf_influence.index import encode_batch
        dtype = self.projector.args.dtype
        self._encode = lambda v: encode_batch(v, dtype)

    def process(self, path):
        import uuid

        import tensorflow as tf

        from tf_influence.index import write_shard
        dtype = self.projector.args.dtype
        keys, vecs, scales, sum_sq, n = [], [], [], np.zeros(self.projector.dim), 0
        for records in record_batches(path, self.batch_size, self.worker_threads):
            try:
                k, x, y = decode_batch(records, self.spec, self.desc, file=path, start=n)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(k))
            fn = self.projector.compiled_for(ds, then=self._encode)      # encoded in the graph (traced once)
            for xb, yb in ds:
                enc = fn(xb, yb)
                if not bool(enc["finite"]):
                    raise ValueError(f"{path}: the projected gradients of examples {n}..{n + len(k) - 1} contain "
                                     "NaN/Inf")
                vecs.append(enc["vectors"].numpy())
                if "scales" in enc:
                    scales.append(enc["scales"].numpy())
                sum_sq += enc["sum_sq"].numpy()
            keys += k
            n += len(k)
        tmp_dir = os.path.join(self.temp_dir, f".tmp-{uuid.uuid4().hex}")
        tf.io.gfile.makedirs(tmp_dir)
        tmp = os.path.join(tmp_dir, "vectors.npz")
        empty = np.zeros((0, self.projector.dim), np.int8 if dtype == "int8" else dtype)
        write_shard(tmp, keys, np.concatenate(vecs) if vecs else empty, dtype,
                    (np.concatenate(scales) if scales else np.zeros(0, np.float32)) if dtype == "int8" else None,
                    sum_sq)
        yield path, tmp, n


def _publish(written, output_dir, description, model_fingerprint, dtype):
    """Publish the workers' shards in input file order (:func:`tf_influence.index.publish`)."""
    import tensorflow as tf

    from tf_influence.index import publish
    written = sorted(written)
    meta = publish(output_dir, [(tmp, n) for _, tmp, n in written], description, model_fingerprint, dtype)
    for _, tmp, _ in written:
        tf.io.gfile.rmtree(os.path.dirname(tmp))
    return meta["count"]


def calibrated_args(objective, group, args, examples_pattern, feature_spec, examples: int | None = None,
                    report: dict | None = None):
    """``args`` with the budget shared by gradient norm, measured in the driver on the first examples
    of the first file (:func:`tf_influence.projection.calibrate`: at least 32, then until the shares
    are known to 10 %, at most ``examples`` — the records read); the workers get the resolved sizes,
    so they never need data to build the same ``P``. ``report``: filled as ``calibrate``'s (the index's
    ``calibration``)."""
    import tensorflow as tf

    from tf_influence.projection import CALIBRATION_EXAMPLES, calibrate
    if args.k is not None or args.allocation != "gradient_norm":
        return args
    examples = examples or CALIBRATION_EXAMPLES
    first = sorted(tf.io.gfile.glob(examples_pattern))[0]
    records = next(iter(record_batches(first, examples)))
    _, x, y = decode_batch(records, parse_feature_spec(feature_spec), first)
    return calibrate(objective, tf.data.Dataset.from_tensor_slices((x, y)).batch(64), group, args, examples,
                     report=report)


def index_examples(pipeline, examples_pattern, model_path, feature_spec, output_dir, projection_args=None,
                   group_spec=None, loss_config=None, batch_size=256, label="Index", temp_dir=None,
                   worker_threads=None):
    """Add the indexing job to ``pipeline`` (see the module docstring). The driver loads the model
    once to describe the projection and fingerprint the weights; returns the PCollection with the
    number of examples indexed."""
    import tf_influence as tfi
    from tf_influence.index import fingerprint
    from tf_influence.projection import GradientProjector, ProjectionArgs
    args = projection_args if isinstance(projection_args, ProjectionArgs) else (
        ProjectionArgs.from_json(projection_args) if isinstance(projection_args, str) else
        ProjectionArgs.from_dict(projection_args or {}))
    model = load_keras_model(model_path)
    objective = tfi.Objective(model, resolve_loss(model, loss_config))
    group = tfi.ParameterGroup.from_spec(model, group_spec) if group_spec else None
    calibration = {}
    args = calibrated_args(objective, group, args, examples_pattern, feature_spec, report=calibration)
    proj = GradientProjector(objective, group, args)
    description, fp = {**proj.describe(), "calibration": calibration}, fingerprint(model, proj.group)
    files = pipeline | f"{label}Read" >> ShardNames(examples_pattern)
    fn = IndexFile(model_path, feature_spec, args.to_json(), group_spec, loss_config, temp_dir or output_dir,
                   batch_size, desc=examples_pattern, worker_threads=worker_threads)
    return (files | f"{label}Project" >> beam.ParDo(fn) | f"{label}Collect" >> beam.combiners.ToList()
            | f"{label}Write" >> beam.Map(_publish, output_dir, description, fp, args.dtype))


def _build(args, beam_args):
    from apache_beam.options.pipeline_options import PipelineOptions

    from tf_influence.cli import from_args
    from tf_influence.projection import ProjectionArgs
    from tfx_components.beam_scoring import resolve_spec
    spec = resolve_spec(args)
    group_spec = None
    if args.layers:
        import tf_influence as tfi
        model = load_keras_model(args.model)
        group_spec = tfi.group_from_layers(model, args.layers, name="index").spec(model).to_json()
    remove_temporaries(args.output)
    try:
        with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
            index_examples(p, args.examples, args.model, spec, args.output, from_args(ProjectionArgs, args),
                           group_spec, args.loss, args.batch_size, worker_threads=args.worker_threads)
    except BaseException:
        remove_temporaries(args.output)
        raise
    from tf_influence.index import GradientIndex
    index = GradientIndex(args.output)
    print(f"indexed {index.count} examples into {args.output} (dim {index.dim}, "
          f"{index.bytes_per_example():.0f} bytes per example)")


def _query(args, query_args):
    import tf_influence as tfi
    from tf_influence.index import GradientIndex
    model = load_keras_model(args.model)
    objective = tfi.Objective(model, resolve_loss(model, args.loss))
    index = GradientIndex(args.index)
    if args.result:
        saved = tfi.InfluenceResult.load(args.result)
        vectors = np.asarray(saved.test_vector)
    elif args.vector:
        vectors = np.load(args.vector)
    else:
        raise SystemExit("query needs --result (a saved InfluenceResult) or --vector (a .npy over the index's group)")
    res = index.query(objective, vectors, query_args)
    out = {"index": args.index, "backend": res.backend, "queries": [
        {"harmful": [[k.decode(errors="replace"), float(s)] for k, s in zip(hk, hs)],
         "helpful": [[k.decode(errors="replace"), float(s)] for k, s in zip(lk, ls)]}
        for hk, hs, lk, ls in zip(res.harmful_keys, res.harmful_scores, res.helpful_keys, res.helpful_scores)]}
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"wrote {args.out} ({len(out['queries'])} queries, top {args.top_k})")
    else:
        print(text)


def main(argv=None):
    from tf_influence import console
    from tf_influence.cli import add_arguments
    from tf_influence.projection import ProjectionArgs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="project every example and write the index (Beam)")
    from tfx_components.example_io import ExampleSource
    io = add_arguments(b, ExampleSource, title="examples, model and features (default: derived from the model's "
                                               "named inputs)")
    io.add_argument("--output", required=True, help="index folder (index.json + vectors-*.npz)")
    b.add_argument("--layers", nargs="+", default=None,
                   help="layers whose parameters are indexed (default: every parameter); the query vectors must be "
                        "over the same group")
    add_arguments(b, ProjectionArgs)
    console.add_verbose_flag(b)
    q = sub.add_parser("query", help="top-k helpful / harmful examples per query vector")
    q.add_argument("--index", required=True, help="index folder")
    q.add_argument("--model", required=True, help="the model the index was built from (checked by fingerprint)")
    q.add_argument("--result", default=None, help="a saved InfluenceResult: its test vector(s) are the queries")
    q.add_argument("--vector", default=None, help=".npy with one query vector [p] or one per column [p, Q]")
    from tf_influence.index import QueryArgs
    # the command prints each query's top-k (no all_scores) and reads no corpus (no rerank)
    add_arguments(q, QueryArgs, exclude=("all_scores", "rerank"))
    q.add_argument("--loss", default=None, help="Keras loss config JSON (default: the model's compiled loss)")
    q.add_argument("--out", default=None, help="JSON file for the results (default: print)")
    console.add_verbose_flag(q)
    args, beam_args = ap.parse_known_args(argv)
    console.quiet(args.verbose)
    if args.command == "build":
        from tf_influence.cli import from_args
        from_args(ExampleSource, args, parser=b)           # validated once, in the dataclass
        _build(args, beam_args)
    else:
        if beam_args:
            ap.error(f"unrecognized arguments: {beam_args}")
        from tf_influence.cli import from_args
        from tf_influence.index import QueryArgs
        query_args = from_args(QueryArgs, args, parser=q)   # a bad combination is a usage error
        if query_args.precondition == "ekfac" and query_args.factors is None:
            q.error("--precondition ekfac needs --factors (a directory of saved factors)")
        _query(args, query_args)


if __name__ == "__main__":
    from tfx_components import beam_index as _module   # DoFns pickled by their importable module
    sys.exit(_module.main())

"""(E)K-FAC factors of a model fitted over a corpus of serialized ``tf.train.Example``s as a Beam
combiner, and the standalone Beam job.

The math is :class:`tf_influence.kfac.FactorStatistics` (the same steps
:func:`tf_influence.kfac.fit_factors` runs in one process):

1. every batch → its covariance sums (``covariances``), summed by a ``CombineGlobally``;
2. the sums → eigenbases (``eigenbases``, once, in one worker);
3. EK-FAC only: every batch → its eigenvalue-correction sums with the bases as a side input, summed;
4. → :class:`~tf_influence.kfac.KFACFactors`, saved to the output directory (``factors.npz`` +
   ``factors.json``; local or ``gs://``), loadable by ``KFACFactors.load`` and usable as
   ``SolverConfig("ekfac", factors=directory)`` or by the ``InfluenceScorer`` component.

Memory is bounded by the model and one microbatch per worker: nothing is gathered but the sums. Each worker
splits the batches ``BatchElements`` hands it as the in-process fit splits its own
(:func:`tf_influence.memory.factor_microbatch`), and checks the fit's memory plan
(:func:`tf_influence.memory.factor_plan`) against ``memory_budget`` — its own machine's, default a fraction of
its available memory — before the first pass over a batch of a new shape: a fit that cannot fit there fails
with :class:`~tf_influence.memory.MemoryBudgetError` naming the block, not with the worker killed.
With ``fisher="true"`` every batch samples its labels with a seed derived from its first key
(reproducible for a given batching; another batching draws another, equally valid, sample);
``fisher="empirical"`` is deterministic and equals the in-process result up to float summation order.

Standalone job (the examples, model and feature flags are the scoring and index jobs' —
:class:`tfx_components.example_io.ExampleSource` —, so the feature spec can be derived from a
``--schema``, a ``--transform-graph`` or the model's named inputs, as there)::

    python -m tfx_components.beam_factors --examples 'data/Split-train/*' --model model.keras \\
        --feature-spec '{"x": {"name": "image", "shape": [8, 8, 1]}, "y": {"name": "label"}}' \\
        --output factors/ --direct_running_mode=multi_processing --direct_num_workers=2
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import apache_beam as beam

from tfx_components import beam_scoring


def batch_step(keys) -> int:
    """The sampling seed of a batch: a hash of its first key (stable across processes)."""
    return int(hashlib.sha256(bytes(keys[0])).hexdigest()[:12], 16)


class _FactorPass(beam.DoFn):
    """Batch of serialized examples → its pass-1 (covariance) or pass-2 (correction) sums."""

    def __init__(self, model_path, feature_spec, group_spec, kind, fisher, seed, loss_config, desc, which,
                 worker_threads=None, dense_factor_max=None, product_dtype=None, memory_budget=None):
        self.model_path, self.spec = model_path, beam_scoring.parse_feature_spec(feature_spec)
        self.memory_budget = memory_budget
        self.group_spec, self.kind, self.fisher, self.seed = group_spec, kind, fisher, seed
        self.dense_factor_max, self.product_dtype = dense_factor_max, product_dtype
        self.loss_config, self.desc, self.which, self.worker_threads = loss_config, desc, which, worker_threads

    def setup(self):
        import tf_influence as tfi
        from tf_influence import kfac
        from tfx_components.example_io import set_worker_threads
        set_worker_threads(self.worker_threads)
        model = beam_scoring.load_keras_model(self.model_path)
        objective = tfi.Objective(model, beam_scoring.resolve_loss(model, self.loss_config))
        group = (tfi.ParameterGroup.from_spec(model, self.group_spec) if self.group_spec
                 else tfi.ParameterGroup.from_model(model))
        from tf_influence.kfac.products import DEFAULT_PRODUCT_DTYPE
        self.stats = kfac.FactorStatistics(objective, group, self.kind, self.fisher, self.seed,
                                           dense_factor_max=kfac.dense_factor_limit(self.dense_factor_max),
                                           product_dtype=self.product_dtype or DEFAULT_PRODUCT_DTYPE)
        self.microbatches = {}              # (batch, positions) → examples per step, its plan checked

    def microbatch(self, y) -> int:
        """Examples per step for a batch of ``y``'s shape: :func:`~tf_influence.memory.factor_microbatch`, the
        fit's :func:`~tf_influence.memory.factor_plan` checked against ``memory_budget`` for each new shape."""
        from tf_influence.memory import batch_shape, factor_microbatch, factor_plan
        shape = batch_shape(y)
        if shape not in self.microbatches:
            m = factor_microbatch(self.stats, shape)
            factor_plan(self.stats, batch_shape=shape, microbatch=m).check(self.memory_budget)
            self.microbatches[shape] = m
        return self.microbatches[shape]

    def process(self, records, bases=None):
        from tf_influence.kfac import add_statistics
        from tf_influence.kfac.statistics import microbatches
        from tf_influence.objective import finite_check
        keys, x, y = beam_scoring.decode_batch(records, self.spec, self.desc)
        m, total = self.microbatch(y), None
        with finite_check(f"K-FAC factors on {self.desc}"):
            for i, xs, ys in microbatches(x, y, m):   # each microbatch's labels drawn with its own first key's seed
                if self.which == "covariances":
                    part = self.stats.covariances(xs, ys, batch_step(keys[i:i + m]))
                else:
                    part = self.stats.correction(xs, ys, batch_step(keys[i:i + m]), bases)
                total = add_statistics(total, part)
        yield total

    def finalize(self, sums, bases, correction):
        return self.stats.factors(sums, bases, correction)


class SumStatistics(beam.CombineFn):
    """Sum of :class:`~tf_influence.kfac.FactorStatistics` sums (``None`` for no input)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, element):
        from tf_influence.kfac import add_statistics
        return add_statistics(acc, element)

    def merge_accumulators(self, accs):
        from tf_influence.kfac import add_statistics
        out = None
        for a in accs:
            out = add_statistics(out, a)
        return out

    def extract_output(self, acc):
        return acc


class _Finalize(beam.DoFn):
    """(sums, bases, correction) → KFACFactors saved to ``output_dir``; yields the directory."""

    def __init__(self, factor_pass: _FactorPass, output_dir: str, desc: str):
        self.factor_pass, self.output_dir, self.desc = factor_pass, output_dir, desc

    def setup(self):
        self.factor_pass.setup()

    def process(self, sums, bases, correction):
        if sums is None:
            raise ValueError(f"{self.desc}: no examples to fit K-FAC factors on")
        factors = self.factor_pass.finalize(sums, bases, correction)
        yield factors.save(self.output_dir)


class _Eigenbases(beam.DoFn):
    """The pass-1 sums → eigenbases, by the model's :meth:`FactorStatistics.eigenbases` (its precision: the
    same bases as the in-process fit)."""

    def __init__(self, factor_pass: _FactorPass, desc: str):
        self.factor_pass, self.desc = factor_pass, desc

    def setup(self):
        self.factor_pass.setup()

    def process(self, sums):
        if sums is None:
            raise ValueError(f"{self.desc}: no examples to fit K-FAC factors on")
        yield self.factor_pass.stats.eigenbases(sums)


def fit_factors(pipeline, examples_patterns, model_path, feature_spec, output_dir, group_spec=None,
                kind: str = "ekfac", fisher: str = "true", seed: int = 0, loss_config=None, batch_size: int = 256,
                label: str = "Factors", worker_threads: int | None = None, dense_factor_max: int | None = None,
                product_dtype: str | None = None, memory_budget=None):
    """Add the two passes over ``examples_patterns`` (one pattern or a list) to ``pipeline``;
    the factors are written to ``output_dir``. ``group_spec``: the parameter group
    (:class:`~tf_influence.params.GroupSpec` JSON), default every trainable variable;
    ``worker_threads``: TensorFlow threads per worker process (None: all cores); ``dense_factor_max`` and
    ``product_dtype``: as :func:`tf_influence.kfac.fit_factors`' (None: its default); ``memory_budget``: what each
    worker's memory plan is checked against (``FactorArgs.memory_budget``; None: a fraction of the worker's
    available memory), before its first pass over a batch of a new shape."""
    from tf_influence import kfac
    from tf_influence.kfac.products import DEFAULT_PRODUCT_DTYPE, check_product_dtype
    from tf_influence.memory import check_budget_value
    product_dtype = check_product_dtype(DEFAULT_PRODUCT_DTYPE if product_dtype is None else product_dtype)
    check_budget_value(memory_budget)
    if kind not in kfac.KINDS:
        raise ValueError(f"kind must be one of {kfac.KINDS}, got '{kind}'")
    if fisher not in kfac.FISHERS:
        raise ValueError(f"fisher must be one of {kfac.FISHERS}, got '{fisher}'")
    patterns = [examples_patterns] if isinstance(examples_patterns, str) else list(examples_patterns)
    desc = ", ".join(patterns)

    def read(tag):
        reads = [pipeline | f"{label}Read{tag}{i}" >> beam.io.ReadFromTFRecord(
            p, coder=beam.coders.BytesCoder(), compression_type=beam.io.filesystem.CompressionTypes.AUTO)
            for i, p in enumerate(patterns)]
        records = reads[0] if len(reads) == 1 else tuple(reads) | f"{label}Flatten{tag}" >> beam.Flatten()
        return records | f"{label}Batch{tag}" >> beam.BatchElements(min_batch_size=min(32, batch_size),
                                                                   max_batch_size=batch_size)

    def make(which):
        return _FactorPass(model_path, feature_spec, group_spec, kind, fisher, seed, loss_config, desc, which,
                           worker_threads, dense_factor_max, product_dtype, memory_budget)

    sums = (read("1") | f"{label}Covariances" >> beam.ParDo(make("covariances"))
            | f"{label}SumCovariances" >> beam.CombineGlobally(SumStatistics()))
    bases = sums | f"{label}Eigenbases" >> beam.ParDo(_Eigenbases(make("covariances"), desc))
    if kind == "ekfac":
        corr = (read("2") | f"{label}Correction" >> beam.ParDo(make("correction"), beam.pvalue.AsSingleton(bases))
                | f"{label}SumCorrection" >> beam.CombineGlobally(SumStatistics()))
    else:
        corr = pipeline | f"{label}NoCorrection" >> beam.Create([None])
    return sums | f"{label}Save" >> beam.ParDo(_Finalize(make("covariances"), output_dir, desc),
                                               beam.pvalue.AsSingleton(bases), beam.pvalue.AsSingleton(corr))


def main(argv=None):
    from tf_influence import console
    from tf_influence.analyzer import FactorArgs
    from tf_influence.cli import add_arguments, from_args
    from tfx_components.example_io import ExampleSource
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the scoring and index jobs' flags (ExampleSource), except that --examples takes one or more patterns
    io = add_arguments(ap, ExampleSource, exclude=("examples",),
                       title="examples, model and features (default: derived from the model's named inputs)")
    io.add_argument("--examples", required=True, nargs="+",
                    help="file pattern(s) of GZIP TFRecord tf.train.Examples; the factors are fitted over all of "
                         "them (the features are derived from the first file of the first pattern)")
    io.add_argument("--output", required=True, help="directory for factors.npz / factors.json")
    ap.add_argument("--group-spec", default=None,
                    help="GroupSpec JSON (or a .json file) of the parameters; default every trainable variable")
    # the same FactorArgs (defaults, help) as Analyzer.fit_factors; the Beam passes read every example
    add_arguments(ap, FactorArgs, exclude=("max_examples", "hessian_samples", "covariance_max_examples"))
    console.add_verbose_flag(ap)
    args, beam_args = ap.parse_known_args(argv)
    console.quiet(args.verbose)
    first = argparse.Namespace(**{**vars(args), "examples": args.examples[0]})
    from_args(ExampleSource, first, parser=ap)           # validated once, in the dataclass
    fargs = from_args(FactorArgs, args)
    group_spec = args.group_spec
    if group_spec and group_spec.endswith(".json"):
        group_spec = open(group_spec).read()
    feature_spec = beam_scoring.resolve_spec(first)
    from apache_beam.options.pipeline_options import PipelineOptions
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        fit_factors(p, args.examples, args.model, feature_spec, args.output, group_spec, fargs.kind,
                    fargs.fisher, fargs.seed, args.loss, args.batch_size, worker_threads=args.worker_threads,
                    dense_factor_max=fargs.dense_factor_max, product_dtype=fargs.product_dtype,
                    memory_budget=fargs.memory_budget)
    print(f"wrote {fargs.kind} factors to {args.output}")


if __name__ == "__main__":
    # run the importable module's main, not this __main__ copy: the DoFns must be pickled as
    # tfx_components.beam_factors.<class>, which worker processes can import (a __main__ class they cannot)
    from tfx_components import beam_factors as _module
    sys.exit(_module.main())

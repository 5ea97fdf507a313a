"""The Beam jobs on a real Dask distributed cluster (a LocalCluster of 2 worker processes started
here; the same flags point at a remote scheduler): Beam semantics the jobs rely on (reads, side
inputs, BatchElements' finish_bundle, combiners, multi-output ParDo, GroupByKey across processes,
file sinks) equal the DirectRunner's; scores and K-FAC factors equal the DirectRunner's and the
in-process library's; the ScoreFilter component's Beam work runs there; bad input fails loudly."""

import glob
import gzip
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence import scores_io, tracin
from tests import tfx_helpers as th
from tests.tfx_helpers import BEAM_SETUP_FILE

distributed = pytest.importorskip("dask.distributed")
beam = pytest.importorskip("apache_beam")
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from tests.tfx_components.test_beam_scoring import SPEC, setup  # noqa: E402,F401 — the same corpus and model fixture
from tfx_components import beam_scoring  # noqa: E402
from tfx_components.dask_runner import DaskRunnerError  # noqa: E402

RUNNER = "--runner=tfx_components.dask_runner.DaskRunner"


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as c:
        yield [RUNNER, f"--dask_client_address={c.scheduler_address}", *BEAM_SETUP_FILE]


def _semantics(p, src, out):
    recs = p | "Read" >> beam.io.ReadFromTFRecord(src)
    side = p | "Side" >> beam.Create([3])
    batches = recs | beam.BatchElements(min_batch_size=7, max_batch_size=33)   # last batch: finish_bundle
    sizes = batches | "Size" >> beam.Map(lambda b, k: len(b) * k, beam.pvalue.AsSingleton(side))
    total = sizes | beam.CombineGlobally(sum)
    split = recs | beam.ParDo(_Parity()).with_outputs("odd", main="even")
    counts = ((split.even, split.odd) | beam.Flatten() | beam.Map(lambda r: (r[:2], 1))
              | beam.CombinePerKey(sum))                                       # str keys across processes
    lengths = split.odd | "Len" >> beam.Map(len) | "Max" >> beam.CombineGlobally(max)
    typed = (recs | "Pair" >> beam.Map(lambda r: (r[:2], (len(r), r))) | "G" >> beam.GroupByKey()
             | "Tuples" >> beam.Map(lambda kv: all(type(v) is tuple for v in kv[1])) | beam.CombineGlobally(all))
    (typed | "Ty" >> beam.Map(lambda t: f"values stay tuples {t}")) | "WTy" >> beam.io.WriteToText(out + "-types")
    (total | "T" >> beam.Map(lambda t: f"total {t}")) | "WT" >> beam.io.WriteToText(out + "-total")
    (counts | "C" >> beam.MapTuple(lambda k, v: f"{k.decode()} {v}")) | "WC" >> beam.io.WriteToText(out + "-counts")
    (lengths | "L" >> beam.Map(lambda m: f"odd max {m}")) | "WL" >> beam.io.WriteToText(out + "-odd")


class _Parity(beam.DoFn):
    def process(self, r):
        yield beam.pvalue.TaggedOutput("odd", r) if int(r[1:]) % 2 else r


def _lines(prefix):
    return sorted(line for f in glob.glob(prefix + "*") for line in open(f).read().splitlines())


def test_beam_semantics_equal_the_direct_runner(cluster, tmp_path):
    src = str(tmp_path / "in")
    with beam.Pipeline(options=PipelineOptions(cluster)) as p:   # a file sink on Dask, read back below
        p | beam.Create([f"r{i}".encode() for i in range(500)]) | beam.io.WriteToTFRecord(src)
    assert len(list(tf.data.TFRecordDataset(glob.glob(src + "*")))) == 500
    for name, args in (("direct", []), ("dask", cluster)):
        with beam.Pipeline(options=PipelineOptions(args)) as p:
            _semantics(p, src + "*", str(tmp_path / name))
    for what in ("total", "counts", "odd", "types"):
        assert _lines(str(tmp_path / f"dask-{what}")) == _lines(str(tmp_path / f"direct-{what}"))
    assert _lines(str(tmp_path / "dask-total")) == ["total 1500"]
    assert _lines(str(tmp_path / "dask-types")) == ["values stay tuples True"]
    assert "r4 111" in _lines(str(tmp_path / "dask-counts"))   # r4, r40–r49, r400–r499


def test_group_by_key_uses_the_task_shuffle(cluster, tmp_path):
    """GroupByKey is translated to dask's task shuffle: the graph is built before any Client exists,
    where dask would pick its single-machine on-disk (partd) shuffle, which lost groups between worker
    processes (a CI run saw ScoreFilter's boundary side input arrive empty). Every one of 3,000 keys
    over 40 input partitions comes back with all its values."""
    from apache_beam.runners.dask import overrides
    from tfx_components.dask_runner import _Translator
    p = beam.Pipeline()
    _ = (p | beam.Create(list(range(6000))) | beam.Reshuffle() | beam.Map(lambda v: (v % 3000, v))
         | beam.GroupByKey())
    p.replace_all(overrides.dask_overrides())
    tr = _Translator(1 << 20, reshuffle_partitions=40)
    p.visit(tr)
    keys = [str(k) for leaf in tr.leaves() for k in dict(leaf.__dask_graph__())]
    assert keys and not any("partd" in k or "groupby-disk" in k for k in keys)
    with beam.Pipeline(options=PipelineOptions(cluster)) as p:
        (p | beam.Create(list(range(6000))) | beam.Reshuffle() | beam.Map(lambda v: (v % 3000, v))
         | beam.GroupByKey() | beam.MapTuple(lambda k, vs: f"{k} {sorted(vs)}")
         | beam.io.WriteToText(str(tmp_path / "groups")))
    lines = _lines(str(tmp_path / "groups"))
    assert len(lines) == 3000 and "7 [7, 3007]" in lines


def test_scoring_job_equals_direct_runner_and_library(cluster, setup, tmp_path):  # noqa: F811
    root, path, index, x, y, pre = setup
    examples = str(root / "examples" / "Split-train" / "*")
    outs = {}
    for name, args in (("dask", cluster), ("direct", ["--direct_running_mode=in_memory"])):
        outs[name] = str(tmp_path / name)
        beam_scoring.main(["--examples", examples, "--model", path, "--feature-spec", json.dumps(SPEC),
                           "--si-layers", "embedding", "--output", outs[name], "--batch-size", "16", *args])
    got, direct = scores_io.read_scores(outs["dask"]), scores_io.read_scores(outs["direct"])
    assert set(got) == set(index) == set(direct)
    ref = tracin.self_influence(tfi.Objective(pre, pre.loss), tf.data.Dataset.from_tensor_slices((x, y)).batch(90),
                                ["embedding"])
    for k, i in index.items():
        assert got[k] == pytest.approx(direct[k], rel=1e-5) and got[k] == pytest.approx(float(ref[i]), rel=1e-5)
    # influence: the test vector reaches the workers as a side input
    group = tfi.ParameterGroup.from_model(pre)
    v = np.random.default_rng(0).normal(size=group.size).astype(np.float32)
    np.save(str(tmp_path / "v.npy"), v)
    out = str(tmp_path / "inf")
    beam_scoring.main(["--examples", examples, "--model", path, "--feature-spec", json.dumps(SPEC),
                       "--kind", "influence", "--vector", str(tmp_path / "v.npy"),
                       "--group-spec", group.spec(pre).to_json(), "--output", out, *cluster])
    got = scores_io.read_scores(out)
    ref = tfi.per_example_dot(tfi.Objective(pre, pre.loss), tf.data.Dataset.from_tensor_slices((x, y)).batch(90),
                              group, v)
    assert set(got) == set(index)
    for k, i in index.items():
        assert got[k] == pytest.approx(float(ref[i]), rel=1e-4, abs=1e-6)


def test_factor_combiner_equals_the_library(cluster, setup, tmp_path):  # noqa: F811
    """The FactorFitter's Beam work (two passes, CombineGlobally, bases as a side input) on Dask."""
    from tf_influence import kfac
    from tfx_components import beam_factors
    root, path, index, x, y, pre = setup
    out = str(tmp_path / "factors")
    beam_factors.main(["--examples", str(root / "examples" / "Split-train" / "*"), "--model", path,
                       "--feature-spec", json.dumps(SPEC), "--output", out, "--fisher", "empirical",
                       "--batch-size", "16", *cluster])
    got = kfac.KFACFactors.load(out)
    group = tfi.ParameterGroup.from_model(pre)
    ref = kfac.fit_factors(tfi.Objective(pre), tf.data.Dataset.from_tensor_slices((x, y)).batch(32), group,
                           fisher="empirical")
    assert got.num_examples == len(x)
    v = np.random.default_rng(1).normal(size=group.size)
    a = kfac.KFACInverse(got, pre, group, damping=0.1)(v).numpy()
    b = kfac.KFACInverse(ref, pre, group, damping=0.1)(v).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


@pytest.mark.slow   # make test-slow: ScoreFilter's job runs on the DirectRunner in make test, and its Beam parts
def test_score_filter_component_on_dask(cluster, tmp_path):   # (GroupByKey, Flatten, sinks) on Dask in the first test
    """The ScoreFilter executor's Beam job (global top-k, CoGroupByKey, TFRecord sinks) on Dask."""
    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor

    from tests.tfx_components.test_score_filter import artifacts
    from tfx_components.score_filter.executor import Executor
    ex, sc, out, written, table = artifacts(tmp_path)
    ctx = BaseBeamExecutor.Context(beam_pipeline_args=cluster, tmp_dir=str(tmp_path / "tmp"), unique_id="1")
    Executor(ctx).Do({"examples": [ex], "scores": [sc]}, {"filtered_examples": [out]},
                     {"mode": "drop_top_fraction", "value": 0.1, "key_feature": "key"})
    kept = th.read_examples(os.path.join(out.uri, "Split-train"))
    expected = scores_io.select_kept(table, "drop_top_fraction", 0.1)
    assert len(kept) == 54 and {written["train"][k] for k in expected} == set(kept)
    assert sorted(th.read_examples(os.path.join(out.uri, "Split-eval"))) == sorted(written["eval"].values())


def test_bad_input_fails_loudly(cluster, setup, tmp_path):  # noqa: F811
    root, path, *_ = setup
    shards = sorted(glob.glob(str(root / "examples" / "Split-train" / "*")))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, s in enumerate(shards):
        (corpus / f"part-{i}.gz").write_bytes(open(s, "rb").read())
    (corpus / "part-1.gz").write_bytes(gzip.compress(b"not a tfrecord" * 10))   # a corrupt shard in the middle
    with pytest.raises(Exception, match="part-1.gz"):
        beam_scoring.main(["--examples", str(corpus / "*"), "--model", path, "--feature-spec", json.dumps(SPEC),
                           "--si-layers", "embedding", "--output", str(tmp_path / "o"), *cluster])
    assert not glob.glob(str(tmp_path / "o" / "scores*"))
    with pytest.raises(DaskRunnerError, match="only the global window"):
        with beam.Pipeline(options=PipelineOptions(cluster)) as p:
            (p | beam.Create([1, 2]) | beam.WindowInto(beam.window.FixedWindows(10))
             | beam.Map(lambda v: (v, v)) | beam.GroupByKey())


@pytest.mark.slow   # make test-slow: the scoring job and the factor combiner run on Dask in make test
def test_gradient_index_job_on_dask_equals_the_in_process_index(cluster, setup, tmp_path):  # noqa: F811
    """The gradient index's Beam build job on the Dask cluster: every key once, each vector equal to the
    in-process projection of the same example (float32 storage, k = 8 per side)."""
    from tf_influence.index import GradientIndex
    from tf_influence.projection import GradientProjector, ProjectionArgs
    from tfx_components import beam_index
    root, path, index, x, y, pre = setup
    out = str(tmp_path / "index")
    beam_index.main(["build", "--examples", str(root / "examples" / "Split-train" / "*"), "--model", path,
                     "--feature-spec", json.dumps(SPEC), "--output", out, "--k", "8", "--dtype", "float32",
                     "--batch-size", "16", *cluster])
    built = GradientIndex(out)
    got = {k: v for ks, vs in built.iter_shards() for k, v in zip(ks, vs)}
    assert built.count == len(index) and set(got) == set(index)
    ref = GradientProjector(tfi.Objective(pre, pre.loss), args=ProjectionArgs(k=8, dtype="float32")).project(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(90))
    for k, i in index.items():
        np.testing.assert_allclose(got[k], ref[i], rtol=1e-4, atol=1e-7)

"""ScoreFilter: executor on real TFRecord artifacts, and a real LocalDagRunner pipeline
(sqlite MLMD, DirectRunner in multi-processing mode)."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("tfx")

from tfx import v1 as tfx  # noqa: E402
from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor  # noqa: E402
from tfx.types import artifact_utils, standard_artifacts  # noqa: E402

from tf_influence import scores_io  # noqa: E402
from tfx_components.artifacts import InfluenceScores, set_scores_metadata  # noqa: E402
from tfx_components.score_filter.component import ScoreFilter  # noqa: E402
from tfx_components.score_filter.executor import Executor  # noqa: E402
from tests import tfx_helpers as th  # noqa: E402

from tests.tfx_helpers import BEAM_IN_PROCESS, BEAM_MULTIPROCESSING  # noqa: E402


def artifacts(tmp_path, splits=("train", "eval"), score_splits=("train",), n_train=60):
    ex_uri, sc_uri, out_uri = (str(tmp_path / n) for n in ("examples", "scores", "out"))
    written = th.write_examples(ex_uri, {k: v for k, v in th.digits_splits(n_train).items() if k in splits})
    rng = np.random.default_rng(1)
    keys = sorted(written["train"])
    scores = rng.normal(size=len(keys))
    for s in score_splits:
        th.write_scores(sc_uri, s, keys, scores)
    ex = standard_artifacts.Examples()
    ex.uri, ex.split_names = ex_uri, artifact_utils.encode_split_names(list(splits))
    ex.span, ex.version = 3, 1
    sc = InfluenceScores()
    sc.uri = sc_uri
    set_scores_metadata(sc, score_splits, "test", key_feature="key")
    out = standard_artifacts.Examples()
    out.uri = out_uri
    return ex, sc, out, written, dict(zip(keys, scores))


def run_executor(tmp_path, ex, sc, out, mode="drop_top_fraction", value=0.1, key_feature="key", **extra):
    ctx = BaseBeamExecutor.Context(beam_pipeline_args=BEAM_IN_PROCESS, tmp_dir=str(tmp_path / "tmp"),
                                   unique_id="1")
    Executor(ctx).Do({"examples": [ex], "scores": [sc]}, {"filtered_examples": [out]},
                     {"mode": mode, "value": value, "key_feature": key_feature, **extra})


def test_executor_filters_and_conserves(tmp_path):
    ex, sc, out, written, table = artifacts(tmp_path)
    run_executor(tmp_path, ex, sc, out)
    kept = th.read_examples(os.path.join(out.uri, "Split-train"))
    expected = scores_io.select_kept(table, "drop_top_fraction", 0.1)
    assert len(kept) == 54 and {written["train"][k] for k in expected} == set(kept)  # every byte of every feature
    assert sorted(th.read_examples(os.path.join(out.uri, "Split-eval"))) == sorted(written["eval"].values())
    counts = json.loads(out.get_string_custom_property("filter_counts"))
    assert counts["train"] == {"in": 60, "kept": 54, "dropped": 6, "filtered": True, "cut": "exact"}
    assert counts["eval"]["filtered"] is False and counts["eval"]["kept"] == 20
    assert (out.get_int_custom_property("num_in"), out.get_int_custom_property("num_kept"),
            out.get_int_custom_property("num_dropped")) == (80, 74, 6)
    assert artifact_utils.decode_split_names(out.split_names) == ["train", "eval"]
    assert (out.span, out.version) == (3, 1)
    # the dropped examples are the 6 highest scores
    top = sorted(table, key=lambda k: -table[k])[:6]
    assert not {written["train"][k] for k in top} & set(kept)


@pytest.mark.parametrize("mode,value,n_kept", [("keep_lowest", 20, 20), ("keep_highest", 20, 20),
                                               ("drop_above", 0.0, None)])
def test_executor_modes(tmp_path, mode, value, n_kept):
    ex, sc, out, written, table = artifacts(tmp_path)
    run_executor(tmp_path, ex, sc, out, mode, value)
    kept = set(th.read_examples(os.path.join(out.uri, "Split-train")))
    expected = scores_io.select_kept(table, mode, value)
    assert kept == {written["train"][k] for k in expected}
    if n_kept is not None:
        assert len(kept) == n_kept
    if mode == "keep_lowest":
        assert max(table[k] for k in expected) <= min(table[k] for k in set(table) - expected)


@pytest.mark.parametrize("mode,value", [("drop_top_fraction", 0.1), ("keep_highest", 50)])
def test_the_beam_cut_equals_the_library_with_ties(tmp_path, mode, value):
    """The boundary is found on either side of the cut (the smaller one) and ties are broken by key,
    exactly as ``select_kept`` on the whole table — here with many tied scores."""
    ex, sc, out, written, table = artifacts(tmp_path)
    keys = sorted(table)
    tied = {k: float(np.round(table[k])) for k in keys}  # scores in {-2, ..., 2}: many ties
    for f in os.listdir(os.path.join(sc.uri, "Split-train")):
        os.remove(os.path.join(sc.uri, "Split-train", f))
    th.write_scores(sc.uri, "train", keys, [tied[k] for k in keys])
    run_executor(tmp_path, ex, sc, out, mode, value)
    expected = {written["train"][k] for k in scores_io.select_kept(tied, mode, value)}
    counts = json.loads(out.get_string_custom_property("filter_counts"))["train"]
    assert counts["kept"] == len(expected) and counts["dropped"] == 60 - len(expected)
    if expected:
        assert set(th.read_examples(os.path.join(out.uri, "Split-train"))) == expected


def test_approximate_quantile_cut_stays_within_its_bound(tmp_path):
    """Above ``max_exact_boundary`` the boundary comes from approximate quantiles: on 5,000 scores
    with ε = 4·10⁻³ its rank is within 1.5·ε·n of the exact cut's; the executor takes that path, keeps
    a prefix of the order and records the method."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that

    from tfx_components.score_filter import executor as sf
    n, eps = 5_000, 4e-3
    rng = np.random.default_rng(0)
    table = {f"k{i:05d}".encode(): float(v) for i, v in enumerate(rng.normal(size=n))}
    order = sorted((v, k) for k, v in table.items())
    for side, k in (("largest", 500), ("smallest", 1_750)):
        def check(got, side=side, k=k):
            rank = order.index(got[0])
            exact = k - 1 if side == "smallest" else n - k
            assert abs(rank - exact) <= 1.5 * eps * n, (rank, exact)
        with beam.Pipeline(argv=BEAM_IN_PROCESS) as p:
            scored = p | beam.Create(list(table.items()))
            assert_that(sf._boundary(scored, side, k, "t", n, max_exact=10, epsilon=eps), check)
    ex, sc, out, written, table = artifacts(tmp_path)
    run_executor(tmp_path, ex, sc, out, "drop_top_fraction", 0.1, max_exact_boundary=1, quantile_epsilon=0.02)
    counts = json.loads(out.get_string_custom_property("filter_counts"))["train"]
    assert counts["cut"] == "approximate (quantile_epsilon=0.02)" and abs(counts["dropped"] - 6) <= 1.5 * 0.02 * 60 + 1
    kept = set(th.read_examples(os.path.join(out.uri, "Split-train")))
    kept_scores = [v for k, v in table.items() if written["train"][k] in kept]
    dropped_scores = [v for k, v in table.items() if written["train"][k] not in kept]
    assert max(kept_scores) <= min(dropped_scores)
    with pytest.raises(ValueError, match="quantile_epsilon must be in"):
        run_executor(tmp_path, ex, sc, out, quantile_epsilon=2.0)


def test_bad_input_names_the_artifact(tmp_path):
    ex, sc, out, written, table = artifacts(tmp_path, score_splits=("train", "test"))
    with pytest.raises(ValueError, match=r"split\(s\) \['test'\].*Examples artifact"):
        run_executor(tmp_path, ex, sc, out)
    # an example without a score
    ex, sc, out, written, table = artifacts(tmp_path / "b")
    keys = sorted(table)[1:]
    for f in os.listdir(os.path.join(sc.uri, "Split-train")):
        os.remove(os.path.join(sc.uri, "Split-train", f))
    th.write_scores(sc.uri, "train", keys, [table[k] for k in keys])
    with pytest.raises(Exception, match="has no score"):
        run_executor(tmp_path / "b", ex, sc, out)
    # a missing key feature: the scores say 'example_id', the examples have none (the file is named)
    ex, sc, out, written, table = artifacts(tmp_path / "c")
    set_scores_metadata(sc, ["train"], "test", key_feature="example_id")
    with pytest.raises(Exception, match=r"file .*data_tfrecord-0000.*no key feature 'example_id'"):
        run_executor(tmp_path / "c", ex, sc, out, key_feature=None)
    # a key_feature that contradicts the scores artifact's
    with pytest.raises(ValueError, match="ScoreFilter.key_feature='key'. but .* is keyed by 'example_id'"):
        run_executor(tmp_path / "c", ex, sc, out, key_feature="key")
    # a score without an example
    ex, sc, out, written, table = artifacts(tmp_path / "d")
    scores_io.write_scores(os.path.join(sc.uri, "Split-train"), [b"ghost"], [1.0], shard=1)
    with pytest.raises(ValueError, match="1 score\\(s\\).*have no example"):
        run_executor(tmp_path / "d", ex, sc, out)
    # an empty split directory
    ex, sc, out, written, table = artifacts(tmp_path / "e")
    for f in os.listdir(os.path.join(ex.uri, "Split-eval")):
        os.remove(os.path.join(ex.uri, "Split-eval", f))
    with pytest.raises(ValueError, match="split 'eval' has no files"):
        run_executor(tmp_path / "e", ex, sc, out)
    with pytest.raises(ValueError, match="unknown filter mode"):
        ScoreFilter(examples=None, scores=None, mode="drop_everything", value=1)
    # two examples with one key, a key scored twice, a NaN score
    ex, sc, out, written, table = artifacts(tmp_path / "f")
    k0 = sorted(written["train"])[0]
    import tensorflow as tf
    with tf.io.TFRecordWriter(os.path.join(ex.uri, "Split-train", "data_tfrecord-00009-of-00010.gz"),
                              options="GZIP") as w:
        w.write(written["train"][k0])
    with pytest.raises(ValueError, match="1 examples share a key"):
        run_executor(tmp_path / "f", ex, sc, out)
    ex, sc, out, written, table = artifacts(tmp_path / "g")
    scores_io.write_scores(os.path.join(sc.uri, "Split-train"), [k0], [0.5], shard=1)
    with pytest.raises(Exception, match="duplicate score for key"):
        run_executor(tmp_path / "g", ex, sc, out)
    ex, sc, out, written, table = artifacts(tmp_path / "h")
    for f in os.listdir(os.path.join(sc.uri, "Split-train")):
        os.remove(os.path.join(sc.uri, "Split-train", f))
    with tf.io.TFRecordWriter(os.path.join(sc.uri, "Split-train", "scores-00000.tfrecord.gz"), options="GZIP") as w:
        for k in sorted(table):  # write_scores refuses NaN; a foreign writer might not
            w.write(scores_io.encode_score(k, float("nan") if k == k0 else table[k]))
    with pytest.raises(Exception, match="score of key .* is nan"):
        run_executor(tmp_path / "h", ex, sc, out)


def test_local_dag_runner_pipeline_with_cache(tmp_path):
    from tfx.orchestration import metadata
    from tfx.orchestration import pipeline as tfx_pipeline
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    ex, sc, _, written, table = artifacts(tmp_path)
    ex_imp = tfx.dsl.Importer(source_uri=ex.uri, artifact_type=standard_artifacts.Examples,
                              properties={"split_names": ex.split_names}).with_id("import_examples")
    sc_imp = tfx.dsl.Importer(source_uri=sc.uri, artifact_type=InfluenceScores,
                              custom_properties={"split_names": json.dumps(["train"]), "score_kind": "test"}
                              ).with_id("import_scores")
    flt = ScoreFilter(examples=ex_imp.outputs["result"], scores=sc_imp.outputs["result"], mode="keep_lowest",
                      value=45)
    db = str(tmp_path / "mlmd.sqlite")
    pipe = tfx_pipeline.Pipeline(pipeline_name="score_filter_test", pipeline_root=str(tmp_path / "root"),
                                 components=[ex_imp, sc_imp, flt], enable_cache=True,
                                 metadata_connection_config=metadata.sqlite_metadata_connection_config(db),
                                 beam_pipeline_args=BEAM_MULTIPROCESSING)
    LocalDagRunner().run(pipe)
    LocalDagRunner().run(pipe)  # cached: no second ScoreFilter output
    with metadata.Metadata(metadata.sqlite_metadata_connection_config(db)) as m:
        outs = [a for a in m.store.get_artifacts_by_type("Examples") if "num_kept" in a.custom_properties]
        assert len(outs) == 1
        a = outs[0]
        assert a.custom_properties["num_kept"].int_value == 65  # 45 of train + 20 eval
        assert a.custom_properties["num_dropped"].int_value == 15
        kept = set(th.read_examples(os.path.join(a.uri, "Split-train")))
    assert kept == {written["train"][k] for k in scores_io.select_kept(table, "keep_lowest", 45)}


def test_a_failed_component_registers_no_output(tmp_path):
    """ScoreFilter fails (an example has no score): the run raises and MLMD holds no published
    output of it — nothing partial is registered as a successful artifact."""
    from tfx.orchestration import metadata
    from tfx.orchestration import pipeline as tfx_pipeline
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    ex, sc, _, written, table = artifacts(tmp_path)
    keys = sorted(table)[1:]
    for f in os.listdir(os.path.join(sc.uri, "Split-train")):
        os.remove(os.path.join(sc.uri, "Split-train", f))
    th.write_scores(sc.uri, "train", keys, [table[k] for k in keys])
    ex_imp = tfx.dsl.Importer(source_uri=ex.uri, artifact_type=standard_artifacts.Examples,
                              properties={"split_names": ex.split_names}).with_id("import_examples")
    sc_imp = tfx.dsl.Importer(source_uri=sc.uri, artifact_type=InfluenceScores,
                              custom_properties={"split_names": json.dumps(["train"]), "score_kind": "test"}
                              ).with_id("import_scores")
    flt = ScoreFilter(examples=ex_imp.outputs["result"], scores=sc_imp.outputs["result"], mode="keep_lowest", value=5)
    db = str(tmp_path / "mlmd.sqlite")
    pipe = tfx_pipeline.Pipeline(pipeline_name="score-filter-fail", pipeline_root=str(tmp_path / "root"),
                                 components=[ex_imp, sc_imp, flt], enable_cache=False,
                                 metadata_connection_config=metadata.sqlite_metadata_connection_config(db),
                                 beam_pipeline_args=BEAM_IN_PROCESS)
    with pytest.raises(Exception, match="has no score"):
        LocalDagRunner().run(pipe)
    from ml_metadata.proto import metadata_store_pb2
    with metadata.Metadata(metadata.sqlite_metadata_connection_config(db)) as m:
        live = [a for a in m.store.get_artifacts_by_type("Examples")
                if a.state == metadata_store_pb2.Artifact.LIVE and "/ScoreFilter/" in a.uri]
        failed = [e for e in m.store.get_executions() if e.last_known_state == metadata_store_pb2.Execution.FAILED]
    assert live == [] and len(failed) == 1


def test_corrupt_tfrecord_names_the_artifact(tmp_path):
    ex, sc, out, written, table = artifacts(tmp_path)
    path = os.path.join(ex.uri, "Split-train", "data_tfrecord-00000-of-00002.gz")
    with open(path, "r+b") as fh:  # keep the gzip header, garble the payload
        fh.seek(20)
        fh.write(b"\x00garbage\x00" * 20)
    with pytest.raises(Exception, match=f"ScoreFilter on Examples artifact {ex.uri}"):
        run_executor(tmp_path, ex, sc, out)

"""influence_pipeline end to end with LocalDagRunner (reduced size), TFX caching on rerun, and the
Kubeflow V2 / Vertex compilation."""

import json
import os

import numpy as np

import pytest

pytest.importorskip("tfx")

from pipelines import influence_pipeline  # noqa: E402
from tests.tfx_helpers import BEAM_IN_PROCESS  # noqa: E402

# Beam in process: multi-processing is exercised by test_beam_scoring / test_score_filter / test_scorers
BEAM = [f"--beam-arg={a}" for a in BEAM_IN_PROCESS]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tfds_dir):
    root = tmp_path_factory.mktemp("influence_pipeline")
    report = root / "summary.json"
    influence_pipeline.main(["--quick", "--root", str(root), "--report", str(report), "--data-dir", tfds_dir, *BEAM])
    return root, report, tfds_dir


def test_influence_pipeline_runs_end_to_end(run):
    root, report, _ = run
    s = json.load(open(report))
    for name in ("ImportExampleGen", "Trainer", "InfluenceScorer", "ScoreFilter", "RandomScores", "CompareModels"):
        assert s["components"][name] and all(st == "COMPLETE" for st in s["components"][name]), name
    assert len(s["components"]["Trainer"]) == 6
    assert len(s["filters"]) == 2
    # the report artifact: the influence scores' page, its images, and the top-10 % cut the filter made
    (page,) = [p for p in s["reports"] if "/InfluenceReport/" in p]
    html = open(page).read()
    top = next(f for f in s["filters"] if "drop_top" in f["uri"])["counts"]["train"]
    assert f"dropped {top['dropped']} of {top['in']}" in html
    assert html.count('<img class="thumb"') == 16 and 'class="example harmful' in html
    for f in s["filters"]:
        c = f["counts"]["train"]
        assert c["in"] == s["data"]["pretrain"] == c["kept"] + c["dropped"] and c["dropped"] == round(0.1 * c["in"])
    comp = s["comparison"]
    assert comp["n_test"] == s["data"]["finetune_test"]
    for k in ("original", "drop_top", "drop_random"):
        assert 0 <= comp[k]["accuracy"] <= 1 and comp[k]["loss"] > 0
        # the finetuning seeds: their mean and spread are those of the listed runs
        assert len(comp[k]["losses"]) == comp["seeds"] == 5
        assert comp[k]["loss_mean"] == pytest.approx(np.mean(comp[k]["losses"]))
        assert comp[k]["loss_std"] == pytest.approx(np.std(comp[k]["losses"], ddof=1))
        assert len(set(comp[k]["losses"])) > 1                     # the seeds differ
    (comparison,) = [p for p in s["reports"] if p.endswith("comparison.html")]
    text = open(comparison).read()
    assert f"{comp['drop_top']['loss_mean']:.4f} ± {comp['drop_top']['loss_std']:.4f}" in text
    assert s["wall_seconds"] > 0
    # the scorer ran with the pipeline's InfluenceArgs, whole: its defaults and the quick CG budget
    import tf_influence as tfi
    assert tfi.InfluenceArgs.from_dict(s["influence_args"]) == influence_pipeline.pipeline_influence_args(quick=True)
    assert s["influence_args"]["pretrain_solver"]["iterative"]["max_iter"] == influence_pipeline.QUICK_CG_ITERATIONS


def _kept_keys(uri):
    import tensorflow as tf
    from tfx_components import common
    files = common.glob_files([os.path.join(uri, "Split-train", "*")])
    keys = []
    for r in common.read_records(files, uri):
        ex = tf.train.Example.FromString(r)
        keys.append(ex.features.feature["key"].bytes_list.value[0])
    return keys


def test_the_pipeline_drops_exactly_the_top_scored_pretraining_examples(run):
    """The pipeline's claim: the 'drop_top' branch trains on the pretraining set minus its 10 %
    highest multi-stage influence scores, 'drop_random' minus 10 % by random scores — the same rule
    (``select_kept``, ties by key) applied to the InfluenceScorer's / RandomScores' artifacts."""
    from tf_influence import scores_io
    from tf_influence.selection import select_kept
    _, report, _ = run
    s = json.load(open(report))
    by_kind = {a["score_kind"]: a["uri"] for a in s["scores"]}
    assert {"multi_stage_fixed", "random"} <= set(by_kind)
    for branch, kind in (("drop_top", "multi_stage_fixed"), ("drop_random", "random")):
        (flt,) = [f for f in s["filters"] if f"{os.sep}{branch}{os.sep}" in f["uri"]]
        scores = scores_io.read_scores(os.path.join(by_kind[kind], "Split-train"))
        keys = sorted(scores)
        mask = select_kept([scores[k] for k in keys], "drop_top_fraction", 0.1, keys=keys)
        kept = _kept_keys(flt["uri"])
        assert len(kept) == len(set(kept)) == flt["counts"]["train"]["kept"]
        want = {k for k, m in zip(keys, mask) if m}
        assert set(kept) == {k.encode() if isinstance(k, str) and isinstance(kept[0], bytes) else k for k in want}
        dropped = set(keys) - want
        assert min(scores[k] for k in dropped) >= max(scores[k] for k in want)   # the top-scored ones


def test_rerun_is_served_from_the_tfx_cache(run):
    root, report, data_dir = run
    influence_pipeline.main(["--quick", "--root", str(root), "--report", str(report), "--data-dir", data_dir, *BEAM])
    s = json.load(open(report))
    assert "CACHED" in s["components"]["Trainer"] and "CACHED" in s["components"]["InfluenceScorer"]


def test_compiles_for_kubeflow_v2(tmp_path):
    from pipelines.summary import compile_kubeflow_v2
    pipeline = influence_pipeline.create_pipeline(str(tmp_path), str(tmp_path / "data"), quick=True,
                                                  pretrain_solver="ekfac")
    spec = json.load(open(compile_kubeflow_v2(pipeline, "influence_pipeline", str(tmp_path), "tf-influence:test")))
    tasks = spec["pipelineSpec"]["root"]["dag"]["tasks"]
    assert {"FactorFitter", "InfluenceScorer", "drop_top", "drop_random", "CompareModels"} <= set(tasks)
    # the factors flow from FactorFitter into InfluenceScorer
    assert "pretrain_factors" in tasks["InfluenceScorer"]["inputs"]["artifacts"]

"""influence_pipeline end to end with LocalDagRunner (reduced size), TFX caching on rerun, and the
Kubeflow V2 / Vertex compilation."""

import json

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
    for f in s["filters"]:
        c = f["counts"]["train"]
        assert c["in"] == s["data"]["pretrain"] == c["kept"] + c["dropped"] and c["dropped"] == round(0.1 * c["in"])
    comp = s["comparison"]
    assert comp["n_test"] == s["data"]["finetune_test"]
    for k in ("original", "drop_top", "drop_random"):
        assert 0 <= comp[k]["accuracy"] <= 1 and comp[k]["loss"] > 0
    assert s["wall_seconds"] > 0


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

"""presence_pipeline end to end with LocalDagRunner (reduced size) and its Kubeflow V2 compilation."""

import json

import pytest

pytest.importorskip("tfx")

from pipelines import presence_pipeline  # noqa: E402
from tests.tfx_helpers import BEAM_IN_PROCESS  # noqa: E402


def test_presence_pipeline_runs_end_to_end(tmp_path):
    report = tmp_path / "summary.json"
    presence_pipeline.main(["--quick", "--root", str(tmp_path / "root"), "--report", str(report),
                            *[f"--beam-arg={a}" for a in BEAM_IN_PROCESS]])
    s = json.load(open(report))
    for name in ("ImportExampleGen", "Trainer", "SelfInfluenceScorer", "ScoreFilter", "CompareLMs"):
        assert s["components"][name] and all(st == "COMPLETE" for st in s["components"][name]), name
    assert len(s["components"]["Trainer"]) == 3
    (f,) = s["filters"]
    assert f["mode"] == "keep_lowest"
    assert f["counts"]["train"] == {"in": 480, "kept": 384, "dropped": 96, "filtered": True, "cut": "exact"}
    assert f["counts"]["test"]["filtered"] is False
    c = s["comparison"]
    assert set(c) >= {"uniform", "presence_sequential", "presence"}
    assert c["filter"]["kept"] == 384 and c["filter"]["noise_in_pool"] == 96
    # the pipeline's claim: PRESENCE-Sequential trained on exactly the 384 lowest self-influence windows
    import os

    import tensorflow as tf

    from tf_influence import scores_io
    from tf_influence.selection import select_kept
    from tfx_components import common
    (si,) = [a["uri"] for a in s["scores"] if a["score_kind"] == "self_influence"]
    scores = scores_io.read_scores(os.path.join(si, "Split-train"))
    keys = sorted(scores)
    lowest = {k for k, m in zip(keys, select_kept([scores[k] for k in keys], "keep_lowest", 384, keys=keys)) if m}
    kept = [tf.train.Example.FromString(r).features.feature["key"].bytes_list.value[0]
            for r in common.read_records(common.glob_files([os.path.join(f["uri"], "Split-train")]), f["uri"])]
    assert len(kept) == 384 and set(kept) == lowest
    assert max(scores[k] for k in lowest) <= min(scores[k] for k in set(keys) - lowest)


def test_presence_pipeline_compiles_for_kubeflow_v2(tmp_path):
    from pipelines.summary import compile_kubeflow_v2
    pipeline = presence_pipeline.create_pipeline(str(tmp_path), str(tmp_path / "data"), n_train=480, quick=True)
    spec = json.load(open(compile_kubeflow_v2(pipeline, "presence_pipeline", str(tmp_path), "tf-influence:test")))
    assert {"SelfInfluenceScorer", "ScoreFilter", "presence_trainer"} <= set(spec["pipelineSpec"]["root"]["dag"]["tasks"])

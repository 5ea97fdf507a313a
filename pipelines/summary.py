"""Shared pipeline helpers: Beam defaults, log quieting, and the MLMD summary written to
``reports/pipelines/<pipeline>.json``."""

import json
import logging
import os
import time
import warnings

BEAM_DEFAULT = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def quiet():
    """Hide TensorFlow / Beam / absl chatter (warnings of google-cloud packages included)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")
    for name in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


def summarize(metadata_path: str) -> dict:
    """Component states, ScoreFilter counts and the comparison report of a LocalDagRunner run (from MLMD)."""
    from tfx.orchestration import metadata
    out = {"components": {}}
    with metadata.Metadata(metadata.sqlite_metadata_connection_config(metadata_path)) as m:
        store = m.store
        types = {t.id: t.name for t in store.get_execution_types()}
        state = {1: "NEW", 2: "RUNNING", 3: "COMPLETE", 4: "FAILED", 5: "CACHED", 6: "CANCELED"}
        for ex in store.get_executions():
            node = ex.custom_properties.get("__node_id__") or ex.properties.get("__node_id__")
            name = types.get(ex.type_id, "?")
            key = name.split(".")[-1]
            out["components"].setdefault(key, []).append(state.get(ex.last_known_state, str(ex.last_known_state)))
            del node
        for a in store.get_artifacts_by_type("Examples"):
            if "filter_counts" in a.custom_properties:
                counts = json.loads(a.custom_properties["filter_counts"].string_value)
                mode = a.custom_properties["filter_mode"].string_value
                out.setdefault("filters", []).append({"uri": a.uri, "mode": mode, "counts": counts})
        for a in store.get_artifacts_by_type("ModelEvaluation"):
            if "comparison" in a.custom_properties:
                out["comparison"] = json.loads(a.custom_properties["comparison"].string_value)
    return out




def execute(name: str, make_pipeline, root: str, runner: str, image: str, report: str | None, extra: dict,
            t0: float) -> str:
    """Compile (``kubeflow_v2``: ``<root>/<name>.json`` for Vertex AI Pipelines) or run (``local``:
    LocalDagRunner with sqlite MLMD at ``<root>/metadata.sqlite``) a pipeline built by
    ``make_pipeline(metadata_path)``; a local run writes its summary JSON. Returns the written path."""
    if runner == "kubeflow_v2":
        from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as kfv2
        kfv2.KubeflowV2DagRunner(config=kfv2.KubeflowV2DagRunnerConfig(default_image=image), output_dir=root,
                                 output_filename=f"{name}.json").run(make_pipeline(None))
        path = os.path.join(root, f"{name}.json")
        print(f"wrote {path}")
        return path
    from tfx import v1 as tfx
    md = os.path.join(root, "metadata.sqlite")
    tfx.orchestration.LocalDagRunner().run(make_pipeline(md))
    summary = {"pipeline": name, **extra, **summarize(md), "wall_seconds": time.perf_counter() - t0}
    report = report or os.path.join("reports", "pipelines", f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    with open(report, "w") as fh:
        json.dump(summary, fh, indent=1)
    print(json.dumps(summary.get("comparison", {}), indent=1))
    print(f"wrote {report} ({summary['wall_seconds']:.0f} s)")
    return report

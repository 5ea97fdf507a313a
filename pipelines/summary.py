"""Shared pipeline helpers: Beam defaults and the MLMD summary written to
``reports/pipelines/<pipeline>.json``. (Log quieting: ``tf_influence.console``.)"""

import json
import os
import time

_SETUP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
#: ``--setup_file`` of this repository: the package remote Beam workers (Dataflow) install — it holds
#: ``tf_influence`` and ``tfx_components``. Without a dependency flag every TFX Beam executor instead
#: packs TFX itself into an ephemeral sdist (about 2 s per component run) that lacks these components.
BEAM_SETUP_FILE = [f"--setup_file={_SETUP}"] if os.path.exists(_SETUP) else []
BEAM_DEFAULT = ["--direct_running_mode=multi_processing", "--direct_num_workers=2", *BEAM_SETUP_FILE]


def summarize(metadata_path: str) -> dict:
    """Component states, ScoreFilter counts and the comparison report of a LocalDagRunner run (from MLMD)."""
    from tfx.orchestration import metadata
    out = {"components": {}}
    with metadata.Metadata(metadata.sqlite_metadata_connection_config(metadata_path)) as m:
        store = m.store
        types = {t.id: t.name for t in store.get_execution_types()}
        state = {1: "NEW", 2: "RUNNING", 3: "COMPLETE", 4: "FAILED", 5: "CACHED", 6: "CANCELED"}
        for ex in store.get_executions():
            key = types.get(ex.type_id, "?").split(".")[-1]
            out["components"].setdefault(key, []).append(state.get(ex.last_known_state, str(ex.last_known_state)))
        for a in store.get_artifacts_by_type("Examples"):
            if "filter_counts" in a.custom_properties:
                counts = json.loads(a.custom_properties["filter_counts"].string_value)
                mode = a.custom_properties["filter_mode"].string_value
                out.setdefault("filters", []).append({"uri": a.uri, "mode": mode, "counts": counts})
        for a in store.get_artifacts_by_type("tf_influence.InfluenceScores"):
            kind = a.custom_properties["score_kind"].string_value if "score_kind" in a.custom_properties else ""
            out.setdefault("scores", []).append({"uri": a.uri, "score_kind": kind})
        for a in store.get_artifacts_by_type("ModelEvaluation"):
            if "comparison" in a.custom_properties:
                out["comparison"] = json.loads(a.custom_properties["comparison"].string_value)
    return out




class component_progress:
    """One line per TFX component as LocalDagRunner finishes it (wraps ``Launcher.launch``, which
    LocalDagRunner calls once per node, in this process)."""

    def __init__(self, say, total: int):
        self.say, self.total, self.done = say, total, 0

    def __enter__(self):
        from tfx.orchestration.portable import launcher
        self.cls, self.original = launcher.Launcher, launcher.Launcher.launch
        progress = self

        def launch(launcher_self, *args, **kwargs):
            node = launcher_self._pipeline_node.node_info.id  # noqa: SLF001 (TFX's own attribute)
            t = time.perf_counter()
            result = progress.original(launcher_self, *args, **kwargs)
            progress.done += 1
            progress.say(f"  [{progress.done:2d}/{progress.total}] {node:32s} {time.perf_counter() - t:6.1f} s")
            return result
        self.cls.launch = launch
        return self

    def __exit__(self, *exc):
        self.cls.launch = self.original
        return False


def format_comparison(comparison: dict) -> str:
    """The comparison report as aligned lines: one per model (its metrics), then the other entries."""
    lines = []
    for name, value in comparison.items():
        if isinstance(value, dict):
            metrics = ", ".join(f"{k} {100 * v:.2f} %" if k == "accuracy" else f"{k} {v:.4g}"
                                for k, v in value.items())
            lines.append(f"  {name:22s} {metrics}")
        else:
            lines.append(f"  {name:22s} {value}")
    return "\n".join(lines)


def compile_kubeflow_v2(pipeline, name: str, root: str, image: str) -> str:
    """Compile ``pipeline`` to ``<root>/<name>.json`` for Vertex AI Pipelines (Kubeflow V2)."""
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as kfv2
    kfv2.KubeflowV2DagRunner(config=kfv2.KubeflowV2DagRunnerConfig(default_image=image), output_dir=root,
                             output_filename=f"{name}.json").run(pipeline)
    return os.path.join(root, f"{name}.json")


def execute(name: str, make_pipeline, root: str, runner: str, image: str, report: str | None, extra: dict,
            t0: float, verbose: bool = False) -> str:
    """Compile (``kubeflow_v2``: ``<root>/<name>.json`` for Vertex AI Pipelines) or run (``local``:
    LocalDagRunner with sqlite MLMD at ``<root>/metadata.sqlite``) a pipeline built by
    ``make_pipeline(metadata_path)``; a local run writes its summary JSON. Returns the written path."""
    if runner == "kubeflow_v2":
        path = compile_kubeflow_v2(make_pipeline(None), name, root, image)
        print(f"wrote {path}")
        return path
    from tfx import v1 as tfx

    from tf_influence import console
    md = os.path.join(root, "metadata.sqlite")
    pipeline = make_pipeline(md)
    log = os.path.join(root, f"{name}.log")
    print(f"running {name}: {len(pipeline.components)} components (LocalDagRunner, MLMD {md})"
          + ("" if verbose else f"; library logs → {log}"), flush=True)
    with console.redirect_output(log, enabled=not verbose) as out, component_progress(out.print,
                                                                                        len(pipeline.components)):
        tfx.orchestration.LocalDagRunner().run(pipeline)
    summary = {"pipeline": name, **extra, **summarize(md), "wall_seconds": time.perf_counter() - t0}
    report = report or os.path.join("reports", "pipelines", f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    with open(report, "w") as fh:
        json.dump(summary, fh, indent=1)
    print(format_comparison(summary.get("comparison", {})))
    print(f"wrote {report} ({summary['wall_seconds']:.0f} s)")
    return report

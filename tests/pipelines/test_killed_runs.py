"""A pipeline run SIGKILLed while SelfInfluenceScorer writes its scores, then run again: no partial
file ever sits under a published name, no temporary stays in any output folder or in the killed
execution's temporary folder, and MLMD shows what TFX does with the killed execution (it stays
RUNNING; the rerun executes the component anew) — what the README tells users."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytest.importorskip("tfx")

from tests.tfx_components.test_example_io import run_and_kill, write_records  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kill_pipeline_main.py")
STATES = {1: "NEW", 2: "RUNNING", 3: "COMPLETE", 4: "FAILED", 5: "CACHED", 6: "CANCELED"}


def _executions(db):
    from tfx.orchestration import metadata
    with metadata.Metadata(metadata.sqlite_metadata_connection_config(db)) as m:
        types = {t.id: t.name.split(".")[-1] for t in m.store.get_execution_types()}
        return [(e.id, types[e.type_id], STATES[e.last_known_state]) for e in m.store.get_executions()]


def _temporaries(root):
    return sorted(os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
                  if n.startswith((".tmp-", "beam-temp-")) or n == "staged")


@pytest.mark.slow   # make test-slow: a killed standalone job runs in make test (test_example_io.py)
def test_killed_pipeline_then_rerun_leaves_no_temporary(tmp_path):
    x_in = keras.Input((4,), name="x")
    model = keras.Model(x_in, keras.layers.Dense(3, name="head")(keras.layers.Dense(8, name="embedding")(x_in)))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    os.makedirs(tmp_path / "model" / "Format-Serving")
    model.save(str(tmp_path / "model" / "Format-Serving" / "model.keras"))
    rng = np.random.default_rng(0)
    rows = [{"x": rng.normal(size=4).astype(np.float32), "label": [int(rng.integers(3))]} for _ in range(1000)]
    write_records(str(tmp_path / "examples" / "Split-train"), rows, shards=2)
    root = tmp_path / "pipeline_root"
    run_and_kill([sys.executable, SCRIPT, str(tmp_path)], lambda: any(".tmp-" in p for p in _temporaries(root)))
    killed = [p for p in _temporaries(root) if ".tmp-" in p]
    assert killed and all(f"{os.sep}.system{os.sep}" in p for p in killed), killed   # never in an output folder
    scores_dirs = list((root / "SelfInfluenceScorer" / "scores").glob("*"))
    assert all(not list(d.rglob("scores-*")) for d in scores_dirs)                     # nothing published
    assert ("SelfInfluenceScorer", "RUNNING") in [(t, s) for _, t, s in _executions(str(tmp_path / "mlmd.sqlite"))]

    subprocess.run([sys.executable, SCRIPT, str(tmp_path)], check=True, capture_output=True)
    assert _temporaries(root) == []
    runs = [(t, s) for _, t, s in _executions(str(tmp_path / "mlmd.sqlite"))]
    assert runs.count(("SelfInfluenceScorer", "RUNNING")) == 1      # TFX leaves the killed execution as it was
    assert ("SelfInfluenceScorer", "COMPLETE") in runs and ("ScoreFilter", "COMPLETE") in runs

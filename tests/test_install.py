"""The install step keeps `pip check` honest: keras-hub is installed with --no-deps (its
tensorflow-text>=2.20.1 would replace the pinned TensorFlow), and that is the only unmet requirement."""

import subprocess
import sys

#: The one line `pip check` may print (requirements-hub.txt says why).
ALLOWED = {"keras-hub 0.32.0 requires tensorflow-text, which is not installed."}


def test_pip_check_reports_only_the_documented_gap():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = {line.strip() for line in (out.stdout + out.stderr).splitlines()
             if line.strip() and "is ignored: it is neither a file nor a directory" not in line}
    assert lines - ALLOWED == set(), f"unexpected pip check output: {sorted(lines - ALLOWED)}"


def test_pinned_stack_is_what_is_installed():
    import keras
    import keras_hub
    import tensorflow as tf
    assert (tf.__version__, keras.__version__, keras_hub.__version__) == ("2.16.2", "3.15.1", "0.32.0")


def test_the_wheel_ships_the_library_and_the_components_with_their_dependencies(tmp_path):
    """``pip install tf-influence`` gets ``tf_influence`` and ``tfx_components`` only (pipelines,
    experiments, benchmarks and model_zoo run from a clone) and every package the library imports."""
    import pathlib
    import zipfile
    import shutil
    root = pathlib.Path(__file__).resolve().parents[1]
    src = tmp_path / "src"   # setuptools writes build/ into the tree it builds: build a copy, not the checkout
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".venv", ".git", "reports", "build", "*.egg-info",
                                                               "__pycache__", "bazel-*", ".bazel-deps"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("tf_influence-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"tf_influence", "tfx_components"}, top
    assert "tf_influence/kfac/inverse.py" in names and "tf_influence/presence/model.py" in names
    meta = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    requires = {line.split(":", 1)[1].strip().split(" ")[0].split("=")[0].split(">")[0].split(";")[0]
                for line in meta.splitlines() if line.startswith("Requires-Dist:")}
    assert {"tensorflow", "keras", "numpy", "scipy", "tqdm", "apache-beam"} <= requires, requires

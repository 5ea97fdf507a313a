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

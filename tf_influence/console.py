"""Log hygiene for command-line entry points: show progress and results, not library chatter.

Importing ``tf_influence`` changes nothing global beyond defaulting ``TF_CPP_MIN_LOG_LEVEL``.
Entry points (the experiments, pipelines, benchmarks and the Beam job) call :func:`quiet` first
thing; it hides only *known-harmless* output:

* ``FutureWarning`` / ``DeprecationWarning`` / ``PendingDeprecationWarning`` (mostly Google client
  libraries, TFX and Beam on import), in this process and — through ``PYTHONWARNINGS`` — in the
  Beam worker processes it starts;
* TensorFlow's C++ log lines (``TF_CPP_MIN_LOG_LEVEL=3``: cuDNN/cuBLAS factory registration on a
  CPU machine, ``Local rendezvous is aborting with status: OUT_OF_RANGE`` at the end of every
  ``tf.data`` pass inside a ``tf.function``). Failures still reach the user as Python exceptions;
* INFO / WARNING records of the ``absl``, ``tensorflow``, ``apache_beam``, ``tfx`` and
  ``ml_metadata`` loggers, and TensorFlow's ``tf.function`` retracing notices.

Warnings of this package (e.g. ``SolverNotConvergedWarning``) and every error stay visible.
``--verbose`` (:func:`add_verbose_flag`) skips all of it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_CATEGORIES = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)
_LOGGERS = ("absl", "tensorflow", "apache_beam", "tfx", "ml_metadata", "h5py", "matplotlib")


def quiet(verbose: bool = False) -> None:
    """Hide known-harmless third-party output (see module docstring); no-op with ``verbose=True``."""
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    if "tensorflow" not in sys.modules:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    else:  # already imported: new processes (Beam workers) still honour it
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    existing = os.environ.get("PYTHONWARNINGS", "")
    extra = ",".join(f"ignore::{c.__name__}" for c in _CATEGORIES)
    os.environ["PYTHONWARNINGS"] = f"{existing},{extra}" if existing else extra
    for category in _CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # absl's own verbosity (TFX logs through absl)
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    if "tensorflow" in sys.modules:
        sys.modules["tensorflow"].get_logger().setLevel(logging.ERROR)


def quiet_for_cli(argv=None) -> None:
    """:func:`quiet` unless ``--verbose`` is on the command line; for the top of an entry-point
    module, before it imports TensorFlow."""
    argv = sys.argv if argv is None else argv
    quiet(verbose="--verbose" in argv)


#: the help of every command's ``--verbose`` (this flag, or a ``verbose`` field of a command's dataclass)
VERBOSE_HELP = "show third-party warnings and TensorFlow / Beam / TFX logs (hidden by default)"


def add_verbose_flag(parser) -> None:
    """``--verbose``: show every third-party warning and log line (see :func:`quiet`)."""
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


class redirect_output:
    """Send everything written to file descriptors 1 and 2 — by this process *and* the processes it
    starts (Beam workers, ``pip`` / ``setup.py`` runs of TFX's module packaging) — to ``log_path``;
    :meth:`print` writes to the terminal. Nothing is lost: the log keeps every line, and an
    exception still reaches the terminal (the descriptors are restored before it propagates).

    With ``enabled=False`` it does nothing and :meth:`print` is ``print``.
    """

    def __init__(self, log_path: str, enabled: bool = True):
        self.log_path, self.enabled = log_path, enabled

    def __enter__(self):
        if not self.enabled:
            self.terminal = sys.stdout
            return self
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        self.log = open(self.log_path, "ab")
        os.dup2(self.log.fileno(), 1)
        os.dup2(self.log.fileno(), 2)
        self.terminal = os.fdopen(os.dup(self.saved[0]), "w", buffering=1)
        return self

    def print(self, *args, **kwargs):
        print(*args, file=self.terminal, flush=True, **kwargs)

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.terminal.close()
        self.log.close()
        if exc[0] is not None:
            print(f"(full log: {self.log_path})", file=sys.stderr, flush=True)
        return False

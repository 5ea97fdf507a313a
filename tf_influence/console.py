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
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_INFLUENCE_TF_LOG_LEVEL", "0")
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


def add_verbose_flag(parser) -> None:
    """``--verbose``: show every third-party warning and log line (see :func:`quiet`)."""
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party warnings and TensorFlow / Beam / TFX logs (hidden by default)")


class _ComponentProgress(logging.Handler):
    """Prints one line per TFX component from LocalDagRunner's own "Component … is running /
    finished" records; every other record of the logger is dropped."""

    def __init__(self, total: int | None, stream):
        super().__init__(logging.INFO)
        self.total, self.stream, self.done, self.started = total, stream, 0, {}

    def emit(self, record):
        import time
        msg = record.msg if isinstance(record.msg, str) else ""
        if not msg.startswith("Component %s is") or not record.args:
            return
        node = record.args[0]
        if msg.endswith("running."):
            self.started[node] = time.perf_counter()
        elif msg.endswith("finished."):
            self.done += 1
            seconds = time.perf_counter() - self.started.pop(node, time.perf_counter())
            of = f"/{self.total}" if self.total else ""
            print(f"  [{self.done:2d}{of}] {node:32s} {seconds:6.1f} s", file=self.stream, flush=True)


class component_progress:
    """Context manager: a progress line per finished TFX component during a ``LocalDagRunner`` run
    (quiet mode only; with ``verbose`` TFX's full logs are shown instead).

    >>> with component_progress(total=3):   # doctest: +SKIP
    ...     LocalDagRunner().run(pipeline)
    """

    def __init__(self, total: int | None = None, verbose: bool = False, stream=None):
        self.total, self.verbose, self.stream = total, verbose, stream or sys.stdout

    def __enter__(self):
        if self.verbose:
            return self
        self.logger = logging.getLogger("absl")
        self.saved = (self.logger.level, self.logger.propagate)
        self.handler = _ComponentProgress(self.total, self.stream)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # the INFO records go to the progress handler only
        return self

    def __exit__(self, *exc):
        if not self.verbose:
            self.logger.removeHandler(self.handler)
            self.logger.setLevel(self.saved[0])
            self.logger.propagate = self.saved[1]

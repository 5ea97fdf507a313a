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
    """Hide known-harmless third-party output (see module docstring); no-op with ``verbose=True``. Also
    picks numpy's OpenBLAS kernels for this CPU when the user has not (:func:`tune_openblas`)."""
    tune_openblas()
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


# -- numpy's BLAS on virtual machines -----------------------------------------------------------------
def openblas_coretype() -> str | None:
    """The fastest OpenBLAS kernel set this CPU supports by its ``/proc/cpuinfo`` flags (``SkylakeX`` with
    AVX-512, ``Haswell`` with AVX2), or None. OpenBLAS detects the CPU itself, but on some virtual machines
    it sees an unknown model and falls back to generic ``Prescott`` kernels (SSE3): on the 2-core VM where
    this was measured, a ``[3072, 3072]`` ``eigh`` — one factor side of GPT-2 small's MLP — took 8.8 s
    instead of 3.2 s."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return None
    if "avx512f" in flags:
        return "SkylakeX"
    if "avx2" in flags and "fma" in flags:
        return "Haswell"
    return None


def tune_openblas() -> str | None:
    """Entry points call this first: set ``OPENBLAS_CORETYPE`` to :func:`openblas_coretype` when the user
    has not set it and numpy is not imported yet (OpenBLAS reads it when it loads). Returns what is set."""
    if "OPENBLAS_CORETYPE" in os.environ:
        return os.environ["OPENBLAS_CORETYPE"]
    if "numpy" in sys.modules:
        return None
    core = openblas_coretype()
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
    return core


_BLAS_WARNED = []


def warn_generic_blas() -> None:
    """Warn once when numpy's OpenBLAS runs generic (``Prescott``) kernels on a CPU with AVX2 / AVX-512:
    the factor fits' eigendecompositions are then about 2.8× slower than they need to be."""
    if _BLAS_WARNED:
        return
    _BLAS_WARNED.append(True)
    core = openblas_coretype()
    if core is None or "OPENBLAS_CORETYPE" in os.environ:
        return
    try:
        from threadpoolctl import threadpool_info
        generic = any(str(i.get("architecture", "")).lower() in ("prescott", "generic")
                      for i in threadpool_info() if i.get("internal_api") == "openblas")
    except Exception:   # noqa: BLE001 — no way to tell: say nothing
        return
    if generic:
        warnings.warn(f"numpy's OpenBLAS did not recognise this CPU and runs generic kernels; set "
                      f"OPENBLAS_CORETYPE={core} before starting Python (the CPU has "
                      f"{'AVX-512' if core == 'SkylakeX' else 'AVX2'}): the factor fits' eigendecompositions run "
                      "about 2.8× faster", UserWarning, stacklevel=3)

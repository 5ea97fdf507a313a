"""Shared pieces of the benchmark scripts: timing and the output (JSON file + readable table)."""

from __future__ import annotations

import json
import os
import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls (tracing);
    every tensor ``fn`` returns is fetched inside the timing."""
    import tensorflow as tf
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        _ = [o.numpy() for o in tf.nest.flatten(out) if hasattr(o, "numpy")]
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


#: The folders whose code a measurement depends on (:func:`code_version`'s ``changes``).
CODE_FOLDERS = ("tf_influence", "tfx_components", "benchmarks", "model_zoo")


def code_version(root: str | None = None) -> dict:
    """What a measurement ran, to store beside its numbers: ``{"commit", "changes", "date"}`` — the checkout's
    commit (7 hex digits; None outside a git checkout or without git), whether tracked files of
    :data:`CODE_FOLDERS` differed from it (uncommitted changes), and the UTC date and time. A results page
    shows it, so a number measured on older code is seen to be older, not taken for the current code's."""
    import datetime
    import subprocess
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def git(*argv):
        return subprocess.run(["git", "-C", root, *argv], capture_output=True, text=True, timeout=30, check=True).stdout
    try:
        commit = git("rev-parse", "--short=7", "HEAD").strip()
        changes = bool(git("status", "--porcelain", "--untracked-files=no", "--", *CODE_FOLDERS).strip())
    except (OSError, subprocess.SubprocessError):
        commit, changes = None, False
    return {"commit": commit, "changes": changes, "date": date}


def dump_json(out: dict, path: str, indent: int = 1) -> None:
    """Write ``out`` to ``path`` as JSON, :func:`stamped` with the code writing it (its folder made if missing):
    every benchmark's results file goes through here."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(stamped(out), fh, indent=indent)


def stamped(out):
    """``out`` (a dict) with ``"measured"``: the :func:`code_version` of the run writing it, replacing an earlier
    run's — every results file the benchmarks write says which code last wrote it (the docs print it under the
    file's tables). A file that keeps parts of an earlier run (``benchmarks.index``'s models not measured,
    ``benchmarks.hub``'s parts not run) takes the latest run's stamp: the stamp dates the file, not each part."""
    return {**out, "measured": code_version()} if isinstance(out, dict) else out


def write_json(out: dict, path: str, indent: int = 1) -> None:
    """Write ``out`` to ``path`` as JSON (its folder made if missing) and say so."""
    dump_json(out, path, indent)
    print(f"wrote {path}")


def write_report(out: dict, path: str, width: int = 45, indent: int = 2) -> None:
    """Write ``out`` to ``path`` (JSON) and print one ``key value`` line per entry."""
    dump_json(out, path, indent)
    for k, val in out.items():
        print(f"{k:{width}s} {val:.4g}" if isinstance(val, float) else f"{k:{width}s} {val}")


def parse_args(cls, argv, doc: str | None):
    """The benchmark's arguments dataclass ``cls`` from the command line: its flags are generated
    from the fields (``tf_influence.cli``, as every other command of the project), and a value the
    dataclass refuses is a usage error. A ``verbose`` field, when present, is applied at once."""
    import argparse

    from tf_influence import cli, console
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_arguments(ap, cls)
    args = cli.from_args(cls, ap.parse_args(argv), parser=ap)
    if hasattr(args, "verbose"):
        console.quiet(args.verbose)
    return args

"""``python -m experiments.reproduce``: run the chosen experiments, cache and report them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import tensorflow as tf

from tf_influence import console

from .analyse import (case1_fixed, case1_fixed_ekfac, case2_updated, case2_updated_ekfac, cleansing, cross_task, figure3,
                      finetune_size, identity_baseline, loss_baseline, task_similarity, text_multistage)
from .config import EXPERIMENTS, Context, ReproConfig
from .datamodels import lds
from .report import _fmt, write_report

EXPERIMENT_FUNCTIONS = {
    "case1_fixed": case1_fixed,
    "case2_updated": case2_updated,
    "case1_fixed_ekfac": case1_fixed_ekfac,
    "case2_updated_ekfac": case2_updated_ekfac,
    "identity_baseline": identity_baseline,
    "loss_baseline": loss_baseline,
    "cleansing": cleansing,
    "task_similarity": task_similarity,
    "finetune_size": finetune_size,
    "cross_task": cross_task,
    "figure3": figure3,
    "text_multistage": text_multistage,
    "lds": lds,
}
assert tuple(EXPERIMENT_FUNCTIONS) == EXPERIMENTS


def _apply_overrides(cfg: ReproConfig, items, ap) -> ReproConfig:
    fields = {f.name: f for f in dataclasses.fields(ReproConfig)}
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            ap.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        current = getattr(cfg, key)
        try:
            if isinstance(current, bool):
                changes[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(current, tuple):
                changes[key] = tuple(int(v) for v in value.split(","))
            elif current is None:
                changes[key] = None if value.lower() == "none" else (int(value) if value.isdigit() else value)
            else:
                changes[key] = type(current)(value)
        except ValueError:
            ap.error(f"--set {item!r}: cannot convert {value!r} to {type(current).__name__}")
    return dataclasses.replace(cfg, **changes)


@dataclass
class ReproduceArgs:
    """How the reproduction runs (the command's flags; the experiments' sizes are ``ReproConfig``'s)."""

    quick: bool = field(default=False, metadata={"help": "reduced sizes (CI): checks the harness, not the numbers"})
    only: str = field(default="", metadata={"help": f"comma-separated subset of {','.join(EXPERIMENTS)}"})
    out: str = field(default="reports/reproduction", metadata={"help": "folder of results.json and the report"})
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "TFDS data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    overrides: list = field(default_factory=list, metadata={
        "repeat": True, "flag": "set",
        "help": "FIELD=VALUE: override a ReproConfig field, e.g. --set case2_finetune_steps=1000 (repeatable)"})
    verbose: bool = field(default=False, metadata={"help": console.VERBOSE_HELP})


def main(argv=None):
    import experiments.reproduce as package
    from tf_influence.cli import add_arguments, from_args
    ap = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=package.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, ReproduceArgs)
    args = from_args(ReproduceArgs, ap.parse_args(argv), parser=ap)
    console.quiet(args.verbose)
    only = [e for e in args.only.split(",") if e] or list(EXPERIMENTS)
    unknown = sorted(set(only) - set(EXPERIMENTS))
    if unknown:
        ap.error(f"unknown experiment(s) {unknown}; choose from {EXPERIMENTS}")
    cfg = ReproConfig.quick_config(data_dir=args.data_dir) if args.quick else ReproConfig(data_dir=args.data_dir)
    cfg = _apply_overrides(cfg, args.overrides, ap)
    t0 = time.perf_counter()
    tf.config.experimental.enable_op_determinism()
    ctx = Context(cfg, args.out, progress=args.progress)
    path = os.path.join(args.out, "results.json")
    results = {}
    if os.path.exists(path) and args.only:
        with open(path) as fh:
            results = json.load(fh)  # keep the other experiments of an earlier run
    failures = []
    for name in only:
        t = time.perf_counter()
        print(f"[reproduce] {name} …", flush=True)
        try:
            r = EXPERIMENT_FUNCTIONS[name](ctx)
        except Exception as err:  # report and continue with the other experiments
            import traceback

            traceback.print_exc()
            failures.append(name)
            r = {"error": f"{type(err).__name__}: {err}"}
        r["seconds"] = time.perf_counter() - t
        results[name] = r
        print(f"[reproduce] {name}: {_fmt(name, r)} ({r['seconds']:.0f} s)", flush=True)
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1, default=float)
    table = write_report(results, cfg, args.out, time.perf_counter() - t0)
    print(table)
    print(f"wrote {path} and {os.path.join(args.out, 'report.md')}")
    if failures:
        raise SystemExit(f"experiments failed: {failures}")

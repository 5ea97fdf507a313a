"""``python -m experiments.presence_lm``: run the grid (or a part of it) and print the report."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from typing import Optional

from tf_influence import console

from .config import LMConfig
from .grid import PARTS, run


@dataclass
class PresenceLMArgs:
    """How the LM grid runs (the command's flags; the grid itself is ``LMConfig``)."""

    quick: bool = field(default=False, metadata={"help": "reduced sizes (CI): checks the harness, not the numbers"})
    out: str = field(default="reports/presence", metadata={"help": "folder of the runs cache and the report"})
    seeds: Optional[int] = field(default=None, metadata={"help": "number of seeds (None: 3; quick 1)"})
    steps: Optional[int] = field(default=None, metadata={"help": "training steps (None: LMConfig's)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    parts: str = field(default=",".join(PARTS), metadata={
        "help": "comma-separated subset of main,side,corner to run; a subset only fills the run cache (results "
                "are written when all parts are run)"})
    verbose: bool = field(default=False, metadata={"help": console.VERBOSE_HELP})


def main(argv=None):
    import experiments.presence_lm as package
    from tf_influence.cli import add_arguments, from_args
    ap = argparse.ArgumentParser(prog="python -m experiments.presence_lm", description=package.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, PresenceLMArgs)
    args = from_args(PresenceLMArgs, ap.parse_args(argv), parser=ap)
    console.quiet(args.verbose)
    cfg = LMConfig.quick_config() if args.quick else LMConfig()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    parts = tuple(p for p in args.parts.split(",") if p)
    out = run(cfg, args.out, progress=args.progress, parts=parts)
    if set(parts) != set(PARTS):
        print(f"cached {out['runs']} runs of {', '.join(parts)} in {args.out}/lm_runs")
        return
    print(open(os.path.join(args.out, "lm_report.md")).read())

"""``python -m experiments.presence_lm``: run the grid (or a part of it) and print the report."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from tf_influence import console

from .config import LMConfig
from .grid import PARTS, run


def main(argv=None):
    import experiments.presence_lm as package
    ap = argparse.ArgumentParser(prog="python -m experiments.presence_lm", description=package.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="reports/presence")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated subset of main,side,corner to run; a subset only fills the run cache "
                         "(results are written when all parts are run)")
    console.add_verbose_flag(ap)
    args = ap.parse_args(argv)
    console.quiet(args.verbose)
    cfg = LMConfig.quick_config() if args.quick else LMConfig()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    parts = tuple(p for p in args.parts.split(",") if p)
    out = run(cfg, args.out, progress=not args.no_progress, parts=parts)
    if set(parts) != set(PARTS):
        print(f"cached {out['runs']} runs of {', '.join(parts)} in {args.out}/lm_runs")
        return
    print(open(os.path.join(args.out, "lm_report.md")).read())

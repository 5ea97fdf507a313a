"""MkDocs hook: result pages are generated from the JSON files the benchmarks write, so a number on
a page cannot disagree with its source. A page writes ``{{ results: NAME }}``; the hook replaces it
with the tables of ``docs/results/NAME.json`` (``python -m benchmarks.hub --out docs/results/hub.json``)."""

from __future__ import annotations

import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
PLACEHOLDER = re.compile(r"\{\{\s*results:\s*([\w-]+)\s*\}\}")
INCLUDE = re.compile(r"\{\{\s*file:\s*([\w./-]+)\s*\}\}")   # a file of the repository, e.g. CHANGELOG.md


def _fmt(v, digits=3):
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5) else f"{v:.{digits}g}"
    return str(v)


def hub_tables(d: dict) -> str:
    """The keras-hub benchmark's tables (benchmarks/hub.py)."""
    rows = ["| measurement | value | target |", "|---|---|---|",
            f"| GPT-2 causal LM parameters (`n_params`) | {_fmt(d['n_params'])} | ≥ 1 M |",
            f"| pretraining sequences (`n_pretrain_examples`) | {_fmt(d['n_pretrain_examples'])} | ≥ 20,000 |",
            f"| one training epoch (`train_epoch_seconds`) | {_fmt(d['train_epoch_seconds'])} s | |",
            f"| defaults, everything (`default_over_epoch`) | **{_fmt(d['default_over_epoch'])} epochs** "
            f"({_fmt(d['default_seconds'])} s) | ≤ 3 |",
            f"| the same on 2,000 sequences (`default_over_epoch_2k`) | **{_fmt(d['default_over_epoch_2k'])} "
            f"epochs** ({_fmt(d['default_seconds_2k'])} s; epoch {_fmt(d['train_epoch_seconds_2k'])} s) | ≤ 10 |",
            f"| what `auto` chose (`default_solver`) | {', '.join(f'{k}: {v}' for k, v in d['default_solver'].items())} | |"]
    phases = d.get("default_seconds_by_phase", {})
    if phases:
        rows.append(f"| time by phase | {', '.join(f'{k} {_fmt(v)} s' for k, v in phases.items())} | |")
    fid = ["| method | Pearson | Spearman | n | over identity |", "|---|---|---|---|---|"]
    for name, v in d["fidelity"].items():
        over = d["fidelity_over_identity"].get(name)
        fid.append(f"| {name} ({', '.join(f'{k}: {m}' for k, m in d['fidelity_solvers'][name].items())}) | "
                   f"{_fmt(v['pearson'])} | {_fmt(v['spearman'])} | {v['n']} | {_fmt(over) + '×' if over else '—'} |")
    setup = d["fidelity_setup"]
    hvp = ["| layer case | relative HVP error |", "|---|---|"] + [
        f"| {k} | {_fmt(v)} |" for k, v in d["hvp_fd_rel_error"].items()]
    return "\n".join([
        "**Speed** (multi-stage influence with every argument at its default: tracing, factors, both "
        "solves, scoring every sequence, over one training epoch of the LM):", "", *rows, "",
        f"**Fidelity** against warm-started leave-one-out retraining ({_fmt(setup['n_params'])}-parameter "
        f"GPT-2, {setup['n_pretrain']} sequences, {setup['n_loo']} removals; target ≥ 2× identity):", "", *fid, "",
        "**Second derivatives**: HVP against float64 central differences of the gradient (target ≤ 1e-6):",
        "", *hvp, "", f"`quick` run: {d.get('quick')}."])


GENERATORS = {"hub": hub_tables}


def render(name: str) -> str:
    path = os.path.join(HERE, "results", f"{name}.json")
    if name not in GENERATORS:
        raise KeyError(f"no generator for results '{name}' (known: {sorted(GENERATORS)})")
    with open(path) as fh:
        return GENERATORS[name](json.load(fh))


def include(rel: str) -> str:
    path = os.path.normpath(os.path.join(HERE, os.pardir, rel))
    with open(path) as fh:
        return fh.read()


def on_page_markdown(markdown, page, config, files):
    markdown = INCLUDE.sub(lambda m: include(m.group(1)), markdown)
    return PLACEHOLDER.sub(lambda m: render(m.group(1)), markdown)

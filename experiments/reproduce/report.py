"""One line per experiment (paper value vs ours) and ``report.md``."""

from __future__ import annotations

import dataclasses
import json
import os

from .config import EXPERIMENTS, NO_FIGURE, PAPER, ReproConfig

def _fmt(name, r):
    if r is None:
        return "not run"
    if "error" in r:
        return f"FAILED: {r['error']}"
    if "pearson" in r:
        floor = r.get("noise_floor")
        return f"r = {r['pearson']:.2f} (Spearman {r['spearman']:.2f}, n = {r['n_examples']})" + (
            f"; noise floor: random removals move the test loss {floor['random_over_top']:.2f}× as much as the "
            "top-scored ones" if floor else "")
    if name == "cleansing":
        return (
            f"acc {100 * r['acc_original']:.2f} ± {100 * r['acc_original_std']:.2f} % → "
            f"{100 * r['acc_drop_top']:.2f} ± {100 * r['acc_drop_top_std']:.2f} % (drop top 10 %), "
            f"{100 * r['acc_drop_random']:.2f} ± {100 * r['acc_drop_random_std']:.2f} % (drop random 10 %); "
            f"test loss {r['loss_original']:.4f} → {r['loss_drop_top']:.4f} / {r['loss_drop_random']:.4f} "
            f"({r['n_seeds']} seeds)"
        )
    if name == "task_similarity":
        return f"mean \\|score\\| {r['mean_abs_same_task']:.3g} (same task) vs {r['mean_abs_different_task']:.3g} (different)"
    if name == "finetune_size":
        return (
            f"mean \\|score\\| {r['mean_abs_n']:.3g} (n = {r['n_finetune_n']}) vs {r['mean_abs_3n']:.3g} "
            f"(3n = {r['n_finetune_3n']})"
        )
    if name == "text_multistage":
        return ", ".join(f"{m} r = {r[m]['pearson']:.2f}" for m in ("cg", "ekfac", "identity")) + (
            f" (n = {r['n_examples']}; finetune test accuracy {100 * r['finetune_test_accuracy']:.0f} %)")
    if name == "lds":
        fmt = lambda rows: "; ".join(f"{m} {v['lds']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"  # noqa: E731
                                     for m, v in rows.items())
        text = f"from scratch: {fmt(r['methods'])} (noise floor: seed-to-seed LDS " \
               f"{r['methods']['case1_cg']['noise_floor']['seed_to_seed_lds']:.2f})"
        if r.get("methods_continue"):
            text += f". Warm-started: {fmt(r['methods_continue'])}"
        return text + f" ({r['num_subsets']} subsets × {r['num_seeds']} seeds, subset fraction {r.get('subset_fraction', r.get('alpha'))}, `lds.png`)"
    if name == "figure3":
        return f"{r.get('shown', 0)} of {r['n_misclassified']} misclassified test images, `figure3.png`"
    return json.dumps(r)


def write_report(results: dict, cfg: ReproConfig, out_dir: str, total_seconds: float) -> str:
    lines = ["| experiment | paper | ours | seconds |", "|---|---|---|---|"]
    for name in EXPERIMENTS:
        r = results.get(name)
        secs = f"{r['seconds']:.0f}" if r and "seconds" in r else "–"
        lines.append(f"| `{name}` | {PAPER[name]} | {_fmt(name, r)} | {secs} |")
    table = "\n".join(lines)
    md = [
        f"# Multi-stage influence: reproduction on `{cfg.dataset}`",
        "",
        f"Command: `python -m experiments.reproduce{' --quick' if cfg.quick else ''}` — "
        f"total wall time {total_seconds:.0f} s.",
        "",
        table,
        "",
        "Figures: " + ", ".join(f"`{n}.png`" for n in EXPERIMENTS if n not in NO_FIGURE),
        "",
        "Configuration:",
        "",
        "```json",
        json.dumps(dataclasses.asdict(cfg), indent=1),
        "```",
    ]
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    return table

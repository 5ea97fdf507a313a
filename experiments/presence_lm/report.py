"""``lm_report.md`` and ``lm_grid.png``."""

from __future__ import annotations

import os


def _fmt(r):
    return (f"{r['heldout_loss_mean']:.3f} ± {r['heldout_loss_std']:.3f}",
            f"{100 * r['downstream_accuracy_mean']:.1f} ± {100 * r['downstream_accuracy_std']:.1f}")


def _base(rows) -> dict:
    """Each data setting's uniform row, keyed by ``(noise_kind, noise_fraction, steps)``."""
    return {_setting(r): r for r in rows if r["method"] == "uniform"}


def _setting(r) -> tuple:
    return r["noise_kind"], r["noise_fraction"], r.get("steps")


def _report(grid, side, corner, default, cfg, out_dir, seconds, reference, n_runs, diagnostics=()):
    base = _base(grid + corner)
    lines = [f"# PRESENCE on a token-level transformer LM{' (quick)' if cfg.quick else ''}", "",
             f"Command: `python -m experiments.presence_lm{' --quick' if cfg.quick else ''}` ({n_runs} runs, "
             f"{seconds / 60:.0f} min of training and evaluation; "
             f"{len(cfg.seeds)} seed(s)). Held-out clean loss (nats/token, lower is better) and downstream accuracy "
             "(%, which of 6 standard-library domains a window documents, encoder finetuned), mean ± std over "
             "seeds; ✓ / ✗ after a number = better / worse than uniform (same data, same steps) by ≥ 2 std on "
             "that metric.", "",
             f"Downstream yardsticks: the same finetuning from a random initialisation "
             f"{100 * reference['random_init_accuracy_mean']:.1f} ± {100 * reference['random_init_accuracy_std']:.1f} %, "
             f"majority class {100 * reference['majority_class_accuracy']:.1f} %.", "",
             "| noise | method | schedule | held-out loss | downstream acc. |", "|---|---|---|---|---|"]

    def mark(r, b, key):
        return "" if r is b else (" ✓" if beats(r, b, key) else (" ✗" if beats(b, r, key) else ""))

    def table(rows):
        for r in rows:
            b = base[_setting(r)]
            loss, acc = _fmt(r)
            lines.append(f"| {r['noise_kind']} {100 * r['noise_fraction']:.0f} % | {r['method']} | {r['schedule']} | "
                         f"{loss}{mark(r, b, 'heldout_loss')} | {acc}{mark(r, b, 'downstream_accuracy')} |")
    table(grid)
    if corner:
        lines += ["", f"Longer training ({cfg.corner_steps} steps, {len(cfg.corner_seeds)} seeds):", "",
                  "| noise | method | schedule | held-out loss | downstream acc. |", "|---|---|---|---|---|"]
        table(corner)
    if side:
        lines += ["", "Side grid (τ = 0 control; switch point, microbatch count and K on 30 % jumbled; "
                  "source-clustered microbatches):", "",
                  "| noise | schedule | batching | microbatches | switch | K | held-out loss | downstream acc. |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in side:
            loss, acc = _fmt(r)
            lines.append(f"| {r['noise_kind']} {100 * r['noise_fraction']:.0f} % | {r['schedule']} | {r['batching']} | "
                         f"{r['num_microbatches']} | {r['switch']:g} | {'+'.join(r['si_layers'])} | {loss} | {acc} |")
    if diagnostics:
        lines += ["", "Where the weights go (τ = −1, one run each; per-window weight = microbatch weight / microbatch "
                  "size, uniform = 1 / batch):", "",
                  "| noise | batching | ε | weight per noisy window | per clean window | corr(weight, noisy count) | "
                  "effective microbatches | steps 20–120: SI mean, σ within a step, max abs(w − 1/n) |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in diagnostics:
            u = d["uniform_weight_per_window"]
            noisy = "—" if d["weight_per_noisy_window"] is None else f"{d['weight_per_noisy_window'] / u:.2f}× uniform"
            corr = "—" if d["corr_weight_noisy_count"] is None else f"{d['corr_weight_noisy_count']:+.2f}"
            lines.append(f"| {d['noise_kind']} {100 * d['noise_fraction']:.0f} % | {d['batching']} | "
                         f"{'relative' if d['relative_eps'] else 'literal 1e-6'} | {noisy} | "
                         f"{d['weight_per_clean_window'] / u:.2f}× | {corr} | {d['effective_microbatches_mean']:.2f} of "
                         f"{d['num_microbatches']} | {d['early_si_mean']:.2g}, {d['early_si_std_within_step']:.2g}, "
                         f"{d['early_max_abs_weight_minus_uniform']:.3f} |")
    lines += ["", f"Chosen default: {default}", ""]
    with open(os.path.join(out_dir, "lm_report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _plot(grid, path, reference=None):
    """Held-out loss (top) and downstream accuracy (bottom) of every variant in every data setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    settings = sorted({(r["noise_kind"], r["noise_fraction"]) for r in grid}, key=lambda s: (s[0] != "none", s))
    variants = []
    for r in grid:
        v = (r["method"], r["schedule"])
        if v not in variants:
            variants.append(v)
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.3 * len(settings)), 6.4), sharex=True)
    w = 0.8 / len(variants)
    for ax, key, label, margin in ((axes[0], "heldout_loss", "held-out clean loss (nats/token)", 0.1),
                                   (axes[1], "downstream_accuracy", "downstream accuracy", 0.05)):
        for j, v in enumerate(variants):
            means, stds = [], []
            for s in settings:
                r = next(r for r in grid if (r["noise_kind"], r["noise_fraction"]) == s
                         and (r["method"], r["schedule"]) == v)
                means.append(r[f"{key}_mean"])
                stds.append(r[f"{key}_std"])
            ax.bar(np.arange(len(settings)) + j * w, means, w, yerr=stds, capsize=2,
                   label=v[1] if v[0] == "presence" else ("uniform" if v[0] == "uniform" else f"sequential {v[1]}"))
        allm = [r[f"{key}_mean"] for r in grid]
        ax.set_ylim(min(allm) - margin, max(allm) + margin)
        ax.set_ylabel(label, fontsize=8)
        if key == "downstream_accuracy" and reference:
            ax.axhline(reference["random_init_accuracy_mean"], color="k", ls="--", lw=0.8,
                       label="random init (finetuned)")
    axes[1].set_xticks(np.arange(len(settings)) + 0.4 - w / 2)
    axes[1].set_xticklabels([f"{k} {100 * f:.0f}%" for k, f in settings], fontsize=8)
    axes[0].legend(fontsize=6, ncol=3)
    axes[1].legend(fontsize=6, ncol=4)
    axes[0].set_title("PRESENCE on a token-level transformer LM", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def beats(row, base, key="heldout_loss", sds: float = 2.0) -> bool:
    """``row`` better than ``base`` by ≥ ``sds`` standard deviations over seeds (the larger std)."""
    sd = max(row[f"{key}_std"], base[f"{key}_std"])
    diff = (base[f"{key}_mean"] - row[f"{key}_mean"]) if key == "heldout_loss" else (
        row[f"{key}_mean"] - base[f"{key}_mean"])
    return diff > 0 and diff >= sds * sd

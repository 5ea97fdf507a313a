"""PRESENCE evidence on embedded English text (standard-library docstrings).

    python -m experiments.presence_text [--quick] [--out reports/presence]

1. *Self-influence as a quality signal* (the paper's Figure 1): a character LM trained on clean
   docstring text scores held-out clean windows, the same windows with their words permuted
   (jumbled) and out-of-domain windows (stdlib source code). Reports the mean SI of each
   (layer set K = the embedding layer) and a histogram.
2. *Training variants* on a pool with injected noise (10 % jumbled + 10 % code windows), the
   same number of steps each, several seeds: ``uniform`` (plain Keras ``fit``), ``presence``
   (two-stage τ: +1 for the first 30 % of steps, then −1; 4 microbatches), ``presence_sequential``
   (a scoring model trained on the pool drops the 20 % highest-SI windows; then uniform
   training on the rest) and ``presence_sequential_reverse`` (drops the 20 % lowest). Held-out
   clean loss (mean per-character cross-entropy) mean ± std over seeds.

Writes ``<out>/results.json`` (keys ``mean_si_clean``, ``mean_si_jumbled``,
``mean_si_out_of_domain`` and, per variant, ``loss_mean`` / ``loss_std``), ``report.md``,
``si_distribution.png`` and ``variants.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field

from tf_influence import console

VARIANTS = ("uniform", "presence", "presence_sequential", "presence_sequential_reverse")

#: Fixed seeds of the experiment's data and scoring models (training seeds are ``cfg.seeds``):
CORPUS_SEED = 1234          # shuffling the corpus windows and drawing the injected noise
JUMBLE_PROBE_SEED = 7       # jumbling the clean probe windows for the SI comparison
CLEAN_SCORER_SEED = 100     # the scoring model trained on clean text (SI of clean / jumbled / code)
POOL_SCORER_SEED = 200      # the scoring model trained on the noisy pool (PRESENCE-Sequential)


@dataclass
class TextConfig:
    seq_len: int = 64
    n_train: int = 2400
    n_heldout: int = 500
    noise_fraction: float = 0.2       # half jumbled, half code
    batch_size: int = 32
    steps: int = 800
    scoring_steps: int = 800
    lr: float = 3e-3
    num_microbatches: int = 4
    switch_fraction: float = 0.3      # PRESENCE: τ = +1 for the first 30 % of steps, then −1
    keep_fraction: float = 0.8        # PRESENCE-Sequential keeps 80 %
    seeds: tuple = (0, 1, 2)
    quick: bool = False

    @classmethod
    def quick_config(cls):
        return cls(n_train=480, n_heldout=96, steps=60, scoring_steps=60, seeds=(0,), quick=True)


def run(cfg: TextConfig, out_dir: str, progress: bool = True) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_influence as tfi
    from model_zoo import text
    from tf_influence import presence, tracin

    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    prose, code = text.load_corpus()
    L = cfg.seq_len + 1
    rng = np.random.default_rng(CORPUS_SEED)
    clean = text.windows(" ".join(prose), L)
    clean = [clean[i] for i in rng.permutation(len(clean))]
    code_w = text.windows(code, L)
    code_w = [code_w[i] for i in rng.permutation(len(code_w))]
    need = cfg.n_train + 2 * cfg.n_heldout
    if len(clean) < need:
        raise ValueError(f"the embedded corpus has {len(clean)} windows, {need} needed")
    heldout = clean[:cfg.n_heldout]
    probe = clean[cfg.n_heldout:2 * cfg.n_heldout]   # clean windows for the SI comparison
    pool_clean = clean[2 * cfg.n_heldout:2 * cfg.n_heldout + cfg.n_train]
    n_noise = int(round(cfg.noise_fraction * cfg.n_train))
    n_jumbled = n_noise // 2
    n_code = n_noise - n_jumbled
    pool = pool_clean[:cfg.n_train - n_noise] + [text.jumble(s, rng) for s in pool_clean[-n_jumbled:]] + \
        code_w[cfg.n_heldout:cfg.n_heldout + n_code]
    is_noise = np.r_[np.zeros(cfg.n_train - n_noise, bool), np.ones(n_noise, bool)]
    perm = rng.permutation(len(pool))
    pool, is_noise = [pool[i] for i in perm], is_noise[perm]

    def xy(samples):
        return text.lm_pairs(text.encode(samples))

    def train(samples, seed, variant="uniform"):
        x, y = xy(samples)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).repeat().batch(
            cfg.batch_size, drop_remainder=True)
        model = text.build_lm(cfg.seq_len, seed=seed)
        if variant == "presence":
            pm = presence.PresenceModel(model, num_microbatches=cfg.num_microbatches, si_layers=["embedding"])
            pm.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss=text.lm_loss())
            cb = presence.PresenceCallback(presence.two_stage(int(cfg.switch_fraction * cfg.steps)),
                                           keep_weights=False)
            pm.fit(ds, steps_per_epoch=cfg.steps, epochs=1, verbose=0, callbacks=[cb], shuffle=False)
            return model, cb.records
        model.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss=text.lm_loss())
        model.fit(ds, steps_per_epoch=cfg.steps, epochs=1, verbose=0, shuffle=False)
        return model, None

    def heldout_loss(model):
        x, y = xy(heldout)
        obj = tfi.Objective(model, text.lm_loss())
        return float(np.mean(obj.per_example_losses(tf.constant(x), tf.constant(y)).numpy()))

    def si(model, samples):
        x, y = xy(samples)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(128)
        return tracin.self_influence(tfi.Objective(model, text.lm_loss()), ds, ["embedding"])

    results = {"config": asdict(cfg)}
    # 1. SI of clean vs jumbled vs out-of-domain text, scoring model trained on clean text
    t = time.perf_counter()
    scorer, _ = train(clean[2 * cfg.n_heldout:2 * cfg.n_heldout + cfg.n_train], seed=CLEAN_SCORER_SEED)
    s_clean = si(scorer, probe)
    s_jumbled = si(scorer, [text.jumble(s, np.random.default_rng(JUMBLE_PROBE_SEED)) for s in probe])
    s_ood = si(scorer, code_w[:cfg.n_heldout])
    results.update(mean_si_clean=float(s_clean.mean()), mean_si_jumbled=float(s_jumbled.mean()),
                   mean_si_out_of_domain=float(s_ood.mean()),
                   median_si=dict(clean=float(np.median(s_clean)), jumbled=float(np.median(s_jumbled)),
                                  out_of_domain=float(np.median(s_ood))),
                   fraction_jumbled_above_clean_median=float(np.mean(s_jumbled > np.median(s_clean))),
                   fraction_ood_above_clean_median=float(np.mean(s_ood > np.median(s_clean))),
                   si_seconds=time.perf_counter() - t)
    _hist({"clean": s_clean, "jumbled": s_jumbled, "out-of-domain (code)": s_ood},
          os.path.join(out_dir, "si_distribution.png"))

    # 2. training variants on the noisy pool
    t = time.perf_counter()
    pool_scorer, _ = train(pool, seed=POOL_SCORER_SEED)
    pool_si = si(pool_scorer, pool)
    keep = int(round(cfg.keep_fraction * len(pool)))
    pool_x, pool_y = xy(pool)
    pool_ds = tf.data.Dataset.from_tensor_slices((pool_x, pool_y)).batch(128)
    filt = presence.presence_sequential(tfi.Objective(pool_scorer, text.lm_loss()), pool_ds, ["embedding"], keep=keep)
    rev = presence.presence_sequential(tfi.Objective(pool_scorer, text.lm_loss()), pool_ds, ["embedding"], keep=keep,
                                     reverse=True)
    results["sequential_filter"] = {
        "pool": len(pool), "kept": int(len(filt.kept)), "dropped": int(len(filt.dropped)),
        "noise_in_pool": int(is_noise.sum()),
        "noise_dropped": int(is_noise[filt.dropped].sum()),
        "noise_dropped_reverse": int(is_noise[rev.dropped].sum()),
        "mean_si_noise": float(pool_si[is_noise].mean()), "mean_si_clean": float(pool_si[~is_noise].mean())}
    sets = {"uniform": pool, "presence": pool, "presence_sequential": [pool[i] for i in filt.kept],
            "presence_sequential_reverse": [pool[i] for i in rev.kept]}
    it = [(v, s) for v in VARIANTS for s in cfg.seeds]
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="training variants", leave=False)
    losses = {v: [] for v in VARIANTS}
    for variant, seed in it:
        model, _ = train(sets[variant], seed, variant)
        losses[variant].append(heldout_loss(model))
    for v in VARIANTS:
        arr = np.array(losses[v])
        results[v] = {"loss_mean": float(arr.mean()), "loss_std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                      "losses": arr.tolist(), "perplexity_mean": float(np.exp(arr).mean()),
                      "n_train": len(sets[v])}
    results["variants_seconds"] = time.perf_counter() - t
    results["seconds"] = time.perf_counter() - t_start
    _bars(results, os.path.join(out_dir, "variants.png"))
    path = os.path.join(out_dir, "results.json")
    if os.path.exists(path):   # keep the other experiments' keys (presence_lm's lm_grid, chosen_default …)
        with open(path) as fh:
            results = {**json.load(fh), **results}
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    _report(results, out_dir)
    return results


def _hist(groups, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    allv = np.concatenate(list(groups.values()))
    bins = np.geomspace(max(allv.min(), 1e-12), allv.max(), 40)
    for label, s in groups.items():
        ax.hist(s, bins=bins, alpha=0.5, label=f"{label} (mean {s.mean():.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("self-influence (TracIn, layer set K = embedding)")
    ax.set_ylabel("text windows")
    ax.legend(fontsize=7)
    ax.set_title("Self-influence of clean, jumbled and out-of-domain text", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    means = [results[v]["loss_mean"] for v in VARIANTS]
    stds = [results[v]["loss_std"] for v in VARIANTS]
    ax.bar(range(len(VARIANTS)), means, yerr=stds, capsize=4, color=["grey", "C0", "C2", "C3"])
    ax.set_xticks(range(len(VARIANTS)))
    ax.set_xticklabels(["uniform", "PRESENCE", "Sequential", "Seq.-reverse"], fontsize=8)
    lo = min(m - s for m, s in zip(means, stds))
    hi = max(m + s for m, s in zip(means, stds))
    ax.set_ylim(lo - 0.2 * (hi - lo + 1e-3), hi + 0.2 * (hi - lo + 1e-3))
    ax.set_ylabel("held-out clean loss (nats/char)")
    ax.set_title("Training on a pool with 20 % injected noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(r, out_dir):
    lines = [f"# PRESENCE on embedded text{' (quick)' if r['config']['quick'] else ''}", "",
             f"Command: `python -m experiments.presence_text{' --quick' if r['config']['quick'] else ''}` "
             f"({r['seconds']:.0f} s).", "",
             "| text | mean self-influence | median |", "|---|---|---|",
             f"| clean (held-out docstrings) | {r['mean_si_clean']:.4g} | {r['median_si']['clean']:.4g} |",
             f"| jumbled (words permuted) | {r['mean_si_jumbled']:.4g} | {r['median_si']['jumbled']:.4g} |",
             f"| out-of-domain (source code) | {r['mean_si_out_of_domain']:.4g} | "
             f"{r['median_si']['out_of_domain']:.4g} |", "",
             "| training variant | examples | held-out clean loss (mean ± std over seeds) |", "|---|---|---|"]
    for v in VARIANTS:
        lines.append(f"| `{v}` | {r[v]['n_train']} | {r[v]['loss_mean']:.4f} ± {r[v]['loss_std']:.4f} |")
    f = r["sequential_filter"]
    lines += ["", f"PRESENCE-Sequential dropped {f['dropped']} of {f['pool']} windows, {f['noise_dropped']} of the "
                  f"{f['noise_in_pool']} injected noisy ones (reverse: {f['noise_dropped_reverse']}).", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


@dataclass
class PresenceTextArgs:
    """How the text experiment runs (the command's flags; the experiment itself is ``TextConfig``)."""

    quick: bool = field(default=False, metadata={"help": "reduced sizes (CI): checks the harness, not the numbers"})
    out: str = field(default="reports/presence", metadata={"help": "folder of the report"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    verbose: bool = field(default=False, metadata={"help": console.VERBOSE_HELP})


def main(argv=None):
    from tf_influence.cli import add_arguments, from_args
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, PresenceTextArgs)
    args = from_args(PresenceTextArgs, ap.parse_args(argv), parser=ap)
    console.quiet(args.verbose)
    cfg = TextConfig.quick_config() if args.quick else TextConfig()
    run(cfg, args.out, progress=args.progress)
    print(open(os.path.join(args.out, "report.md")).read())


if __name__ == "__main__":
    main()

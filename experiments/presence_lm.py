"""PRESENCE on a token-level transformer language model: where does reweighting help?

    python -m experiments.presence_lm [--quick] [--out reports/presence] [--seeds 3]

Model: a causal word-level transformer LM (:func:`experiments.text.build_transformer_lm`; one
block, width 64, 2 heads) over a Keras ``TextVectorization`` vocabulary (1,000 words, fitted here
on the embedded English corpus — standard-library docstrings; nothing downloaded). Causal rather
than masked: held-out perplexity is then the model's own objective, exactly comparable across
variants, and PRESENCE's microbatch self-influence is computed from the same loss.

Data: the docstring paragraphs are split (fixed seed) into a pretraining stream (70 %), a
held-out stream (15 %: clean perplexity) and a downstream stream (15 %). The pretraining pool is
``n_train`` windows of ``seq_len + 1`` tokens (stride 8) of which ``noise_fraction`` are replaced
by noise of one kind:

* ``jumbled`` — a clean window with its words permuted (the paper's Figure 1 noise);
* ``code`` — windows of the same modules' source code (out of domain, many unknown words);
* ``duplicates`` — copies of 20 pool windows, repeated (exact duplicates);
* ``none`` — no injected noise.

Measured for every variant, over seeds (mean ± std): **held-out clean loss** (mean token
cross-entropy; perplexity = exp) and a **downstream task** — telling a window of the downstream
stream from the same window with its words permuted, by a logistic-regression head on the frozen
LM's mean-pooled last-block features (a linear probe: trained on one half of the downstream
paragraphs, accuracy on the other half).

Variants (same number of optimizer steps each): ``uniform`` (plain ``fit``), ``presence`` with a τ
schedule — ``two_stage`` (the paper: τ = +1 for the first ``switch`` of the steps, then −1),
``negative`` (τ = −1 throughout: down-weight high self-influence), ``positive`` (τ = +1), and
the control ``zero`` (τ = 0: the reweighted training step with uniform weights) —
``num_microbatches`` microbatches, layer set K = ``si_layers``; and ``presence_sequential``
(drop the highest self-influence windows of the pool, scored by a model trained on the pool, keep
``keep`` of them, then uniform training). A side grid on 30 % jumbled noise varies the switch
point, the microbatch count and K.

Every run is cached (``<out>/lm_runs/<key>.json``): an interrupted command resumes. Writes
``lm_grid`` (rows of ``noise_kind``, ``noise_fraction``, ``method``, ``schedule``,
``heldout_loss_mean/std``, ``downstream_accuracy_mean/std``, ``n_seeds``, …), ``lm_side_grid``,
``lm_config`` and ``chosen_default`` into ``<out>/results.json`` (other keys are kept), a
``lm_report.md`` table and ``lm_grid.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace

from tf_influence import console

NOISE_KINDS = ("jumbled", "code", "duplicates")
SCHEDULES = ("two_stage", "negative", "positive")
CORPUS_SEED = 4321
SCORER_SEED = 300


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 1000
    seq_len: int = 32
    width: int = 64
    heads: int = 2
    blocks: int = 1
    ffn: int = 128
    n_train: int = 2000
    batch_size: int = 32
    steps: int = 300
    lr: float = 2e-3
    num_microbatches: int = 4
    switch: float = 0.3
    si_layers: tuple = ("tok_emb",)
    seeds: tuple = (0, 1, 2)
    fractions: tuple = (0.1, 0.3)
    kinds: tuple = NOISE_KINDS
    schedules: tuple = SCHEDULES
    keeps: tuple = (0.7, 0.9)
    quick: bool = False

    @classmethod
    def quick_config(cls):
        return cls(n_train=128, steps=4, seeds=(0,), fractions=(0.3,), kinds=("jumbled",), schedules=("two_stage",),
                   keeps=(0.7,), quick=True)


# -- data ------------------------------------------------------------------------------------------
_CORPORA: dict = {}


def corpus_for(cfg: LMConfig) -> "Corpus":
    """The :class:`Corpus` of ``cfg`` (built once per process: fitting the vocabulary takes seconds)."""
    key = (cfg.vocab, cfg.seq_len, cfg.n_train)
    if key not in _CORPORA:
        _CORPORA[key] = Corpus(cfg)
    return _CORPORA[key]


class Corpus:
    """Token windows of the embedded corpus (see the module docstring)."""

    def __init__(self, cfg: LMConfig):
        import keras
        import numpy as np
        import tensorflow as tf

        from experiments import text
        self.cfg = cfg
        prose, code = text.load_corpus()
        rng = np.random.default_rng(CORPUS_SEED)
        order = rng.permutation(len(prose))
        n = len(prose)
        parts = {"pretrain": order[:int(0.7 * n)], "heldout": order[int(0.7 * n):int(0.85 * n)],
                 "downstream": order[int(0.85 * n):]}
        self.tv = keras.layers.TextVectorization(max_tokens=cfg.vocab, standardize="lower_and_strip_punctuation",
                                                 split="whitespace", output_mode="int")
        self.tv.adapt(tf.data.Dataset.from_tensor_slices([prose[i] for i in parts["pretrain"]]).batch(256))
        self.vocab_size = len(self.tv.get_vocabulary())
        L = cfg.seq_len + 1

        def stream(idx):
            return np.concatenate([np.asarray(self.tv(prose[i])) for i in idx]).astype(np.int32)

        def wins(ids, stride):
            return np.stack([ids[s:s + L] for s in range(0, len(ids) - L + 1, stride)])
        pre = wins(stream(parts["pretrain"]), 8)
        self.pretrain = pre[rng.permutation(len(pre))]
        self.heldout = wins(stream(parts["heldout"]), 16)
        half = len(parts["downstream"]) // 2
        self.down_train = wins(stream(parts["downstream"][:half]), 8)
        self.down_test = wins(stream(parts["downstream"][half:]), 8)
        code_ids = np.asarray(self.tv(code)).astype(np.int32)
        cw = wins(code_ids, L)
        self.code = cw[rng.permutation(len(cw))]
        if len(self.pretrain) < cfg.n_train:
            raise ValueError(f"the corpus gives {len(self.pretrain)} pretraining windows, n_train={cfg.n_train}")

    @staticmethod
    def jumble(windows, rng):
        out = windows.copy()
        for row in out:
            rng.shuffle(row)
        return out

    def pool(self, kind: str, fraction: float):
        """``(windows [n_train, L], is_noise [n_train])`` for a noise kind and fraction (fixed seed)."""
        import numpy as np
        rng = np.random.default_rng(CORPUS_SEED + 1)
        n = self.cfg.n_train
        base = self.pretrain[:n].copy()
        k = int(round(fraction * n)) if kind != "none" else 0
        noisy = rng.choice(n, size=k, replace=False)
        if kind == "jumbled":
            base[noisy] = self.jumble(base[noisy], rng)
        elif kind == "code":
            base[noisy] = self.code[:k]
        elif kind == "duplicates":
            originals = self.pretrain[n:n + 20]
            base[noisy] = originals[np.arange(k) % len(originals)]
        elif kind != "none":
            raise ValueError(f"unknown noise kind '{kind}'; choose one of {NOISE_KINDS + ('none',)}")
        is_noise = np.zeros(n, bool)
        is_noise[noisy] = True
        return base, is_noise

    def downstream(self):
        """``(x_train, y_train, x_test, y_test)``: original (0) vs words-permuted (1) windows."""
        import numpy as np
        rng = np.random.default_rng(CORPUS_SEED + 2)
        out = []
        for w in (self.down_train, self.down_test):
            w = w[:, :-1]
            x = np.concatenate([w, self.jumble(w, rng)])
            y = np.r_[np.zeros(len(w), np.int64), np.ones(len(w), np.int64)]
            out += [x, y]
        return tuple(out)


# -- one run ------------------------------------------------------------------------------------------
def _loss():
    import keras
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def train(cfg: LMConfig, corpus: Corpus, windows, seed: int, schedule: str = "uniform"):
    """Train a fresh LM on ``windows`` for ``cfg.steps`` steps; ``schedule``: ``uniform`` or a τ schedule."""
    import keras
    import tensorflow as tf

    from experiments import text
    from tf_influence import presence
    x, y = windows[:, :-1], windows[:, 1:].astype("int64")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).repeat().batch(
        cfg.batch_size, drop_remainder=True)
    model = text.build_transformer_lm(corpus.vocab_size, cfg.seq_len, cfg.width, cfg.heads, cfg.blocks, cfg.ffn,
                                      seed=seed)
    if schedule == "uniform":
        model.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss=_loss())
        model.fit(ds, steps_per_epoch=cfg.steps, epochs=1, verbose=0, shuffle=False)
        return model
    sched = {"two_stage": lambda: presence.two_stage(int(cfg.switch * cfg.steps)),
             "negative": lambda: presence.inverse(1.0), "positive": lambda: presence.direct(1.0),
             "zero": lambda: presence.ConstantSchedule(0.0)}[schedule]()
    pm = presence.PresenceModel(model, num_microbatches=cfg.num_microbatches, si_layers=list(cfg.si_layers))
    pm.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss=_loss())
    pm.fit(ds, steps_per_epoch=cfg.steps, epochs=1, verbose=0, shuffle=False,
           callbacks=[presence.PresenceCallback(sched, keep_weights=False)])
    return model


def evaluate(cfg: LMConfig, corpus: Corpus, model) -> dict:
    """Held-out clean loss and downstream (linear-probe) accuracy of a trained LM."""
    import keras
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    h = corpus.heldout
    logits = model.predict(h[:, :-1], batch_size=256, verbose=0)
    loss = float(np.mean(_loss()(h[:, 1:], logits)))
    feats = keras.Model(model.input, model.get_layer(f"norm{cfg.blocks - 1}b").output)
    xtr, ytr, xte, yte = corpus.downstream()

    def pooled(x):
        return feats.predict(x, batch_size=256, verbose=0).mean(axis=1)
    scaler = StandardScaler().fit(pooled(xtr))
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(pooled(xtr)), ytr)
    acc = float(clf.score(scaler.transform(pooled(xte)), yte))
    return {"heldout_loss": loss, "downstream_accuracy": acc}


def sequential_kept(cfg: LMConfig, corpus: Corpus, windows, keep: float, cache_dir: str, setting: str):
    """Indices PRESENCE-Sequential keeps: the ``keep`` fraction with the lowest self-influence
    under a model trained on the pool (scores cached per pool)."""
    import numpy as np
    import tensorflow as tf

    import tf_influence as tfi
    from tf_influence import tracin
    path = os.path.join(cache_dir, f"si-{setting}-{_digest(_training(cfg), 'scorer')}.npy")
    if os.path.exists(path):
        si = np.load(path)
    else:
        scorer = train(cfg, corpus, windows, SCORER_SEED)
        ds = tf.data.Dataset.from_tensor_slices((windows[:, :-1], windows[:, 1:].astype("int64"))).batch(256)
        si = np.asarray(tracin.self_influence(tfi.Objective(scorer, _loss()), ds, list(cfg.si_layers)))
        np.save(path, si)
    n_keep = int(round(keep * len(windows)))
    return np.sort(np.argsort(si, kind="stable")[:n_keep])


def _training(c: LMConfig) -> dict:
    """The fields that change a run's result (not the grid's seeds / fractions / keeps)."""
    return {k: v for k, v in asdict(c).items() if k not in ("seeds", "fractions", "kinds", "schedules", "keeps", "quick")}


def _digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- the grid -----------------------------------------------------------------------------------------------
def _variants(cfg: LMConfig):
    """``(setting, method, schedule, keep, cfg)`` of the main grid and of the side grid."""
    settings = ([] if cfg.quick else [("none", 0.0)]) + [(k, f) for k in cfg.kinds for f in cfg.fractions]
    main = []
    for kind, frac in settings:
        main.append((kind, frac, "uniform", "uniform", None, cfg))
        for s in cfg.schedules:
            main.append((kind, frac, "presence", s, None, cfg))
        for keep in cfg.keeps:
            main.append((kind, frac, "presence_sequential", f"keep={keep:g}", keep, cfg))
    side = []
    if not cfg.quick:
        # control: the PRESENCE training path with τ = 0 (uniform weights) — separates the effect of
        # the reweighting from any difference of the reweighted step itself
        for kind, frac in (("none", 0.0), ("jumbled", 0.3), ("duplicates", 0.3)):
            side.append((kind, frac, "presence", "zero", None, cfg))
        for sw in (0.1, 0.6):
            side.append(("jumbled", 0.3, "presence", "two_stage", None, replace(cfg, switch=sw)))
        for s in ("two_stage", "negative"):
            for m in (2, 8):
                side.append(("jumbled", 0.3, "presence", s, None, replace(cfg, num_microbatches=m)))
            side.append(("jumbled", 0.3, "presence", s, None, replace(
                cfg, si_layers=("tok_emb", "attention0", "ffn0_in", "ffn0_out", "logits"))))
    return main, side


def run(cfg: LMConfig, out_dir: str, progress: bool = True) -> dict:
    import numpy as np
    t0 = time.perf_counter()
    cache = os.path.join(out_dir, "lm_runs")
    os.makedirs(cache, exist_ok=True)
    corpus = corpus_for(cfg)
    main, side = _variants(cfg)
    jobs = [(v, seed) for v in main + side for seed in cfg.seeds]
    it = jobs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc="PRESENCE LM grid", leave=False)
    runs = {}
    for (kind, frac, method, schedule, keep, c), seed in it:
        setting = f"{kind}-{frac:g}"
        key = _digest(_training(c), setting, method, schedule, seed)
        path = os.path.join(cache, f"{key}.json")
        if os.path.exists(path):
            with open(path) as fh:
                rec = json.load(fh)
        else:
            t = time.perf_counter()
            windows, is_noise = corpus.pool(kind, frac)
            extra = {}
            if method == "presence_sequential":
                kept = sequential_kept(c, corpus, windows, keep, cache, setting)
                extra = {"noise_dropped": int(is_noise.sum() - is_noise[kept].sum()), "noise_in_pool": int(is_noise.sum())}
                windows = windows[kept]
            model = train(c, corpus, windows, seed, "uniform" if method != "presence" else schedule)
            rec = {**evaluate(c, corpus, model), **extra, "seconds": time.perf_counter() - t}
            with open(path, "w") as fh:
                json.dump(rec, fh)
        runs.setdefault((kind, frac, method, schedule, _digest(_training(c))), []).append(rec)

    def rows(variants):
        out, seen = [], set()
        for kind, frac, method, schedule, keep, c in variants:
            k = (kind, frac, method, schedule, _digest(_training(c)))
            if k in seen:
                continue
            seen.add(k)
            recs = runs[k]
            loss = np.array([r["heldout_loss"] for r in recs])
            acc = np.array([r["downstream_accuracy"] for r in recs])
            row = {"noise_kind": kind, "noise_fraction": frac, "method": method, "schedule": schedule,
                   "heldout_loss_mean": float(loss.mean()), "heldout_loss_std": float(loss.std(ddof=1)) if len(loss) > 1 else 0.0,
                   "heldout_perplexity_mean": float(np.exp(loss).mean()),
                   "downstream_accuracy_mean": float(acc.mean()),
                   "downstream_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                   "n_seeds": len(recs), "num_microbatches": c.num_microbatches, "switch": c.switch,
                   "si_layers": list(c.si_layers)}
            if method == "presence_sequential":
                row["noise_dropped"] = recs[0]["noise_dropped"]
                row["noise_in_pool"] = recs[0]["noise_in_pool"]
            out.append(row)
        return out
    grid, side_rows = rows(main), rows(side)
    default = choose_default(grid)
    res_path = os.path.join(out_dir, "results.json")
    results = {}
    if os.path.exists(res_path):
        with open(res_path) as fh:
            results = json.load(fh)
    results.update(lm_grid=grid, lm_side_grid=side_rows, chosen_default=default,
                   lm_config={**asdict(cfg), "vocabulary": corpus.vocab_size,
                              "pretrain_windows_available": int(len(corpus.pretrain)),
                              "heldout_windows": int(len(corpus.heldout)),
                              "downstream_train": int(2 * len(corpus.down_train)),
                              "downstream_test": int(2 * len(corpus.down_test))},
                   lm_seconds=time.perf_counter() - t0)
    with open(res_path, "w") as fh:
        json.dump(results, fh, indent=1)
    _report(grid, side_rows, default, cfg, out_dir, time.perf_counter() - t0)
    _plot(grid, os.path.join(out_dir, "lm_grid.png"))
    return results


def beats(row, base, key="heldout_loss", sds: float = 2.0) -> bool:
    """``row`` better than ``base`` by ≥ ``sds`` standard deviations over seeds (the larger std)."""
    sd = max(row[f"{key}_std"], base[f"{key}_std"])
    diff = (base[f"{key}_mean"] - row[f"{key}_mean"]) if key == "heldout_loss" else (
        row[f"{key}_mean"] - base[f"{key}_mean"])
    return diff > 0 and diff >= sds * sd


def choose_default(grid) -> str:
    """The τ schedule with the most settings better than uniform on held-out loss (ties: fewer
    settings worse), with the evidence in one line."""
    base = {(r["noise_kind"], r["noise_fraction"]): r for r in grid if r["method"] == "uniform"}
    present = [s for s in SCHEDULES if any(r["schedule"] == s for r in grid)]
    score = {}
    for s in present:
        rows = [r for r in grid if r["method"] == "presence" and r["schedule"] == s]
        better = sum(r["heldout_loss_mean"] < base[(r["noise_kind"], r["noise_fraction"])]["heldout_loss_mean"]
                     for r in rows)
        sig = sum(beats(r, base[(r["noise_kind"], r["noise_fraction"])]) for r in rows)
        worse = sum(beats(base[(r["noise_kind"], r["noise_fraction"])], r) for r in rows)
        score[s] = (sig, better, -worse, len(rows))
    best = max(present, key=lambda s: score[s][:3])
    sig, better, neg_worse, n = score[best]
    return (f"{best}: lower held-out loss than uniform in {better} of {n} data settings "
            f"({sig} by ≥ 2 std over seeds, significantly worse in {-neg_worse}); others: "
            + ", ".join(f"{s} {score[s][1]}/{score[s][3]} ({score[s][0]} ≥ 2 std, {-score[s][2]} worse)"
                        for s in present if s != best))


def _fmt(r):
    return (f"{r['heldout_loss_mean']:.3f} ± {r['heldout_loss_std']:.3f}",
            f"{100 * r['downstream_accuracy_mean']:.1f} ± {100 * r['downstream_accuracy_std']:.1f}")


def _report(grid, side, default, cfg, out_dir, seconds):
    base = {(r["noise_kind"], r["noise_fraction"]): r for r in grid if r["method"] == "uniform"}
    lines = [f"# PRESENCE on a token-level transformer LM{' (quick)' if cfg.quick else ''}", "",
             f"Command: `python -m experiments.presence_lm{' --quick' if cfg.quick else ''}` ({seconds:.0f} s; "
             f"{len(cfg.seeds)} seed(s)). Held-out clean loss (nats/token, lower is better) and downstream accuracy "
             "(%, original vs words-permuted, linear probe), mean ± std over seeds; ✓ = better than uniform by "
             "≥ 2 std on held-out loss, ✗ = worse by ≥ 2 std.", "",
             "| noise | method | schedule | held-out loss | downstream acc. |", "|---|---|---|---|---|"]
    for r in grid:
        b = base[(r["noise_kind"], r["noise_fraction"])]
        mark = "" if r is b else (" ✓" if beats(r, b) else (" ✗" if beats(b, r) else ""))
        loss, acc = _fmt(r)
        lines.append(f"| {r['noise_kind']} {100 * r['noise_fraction']:.0f} % | {r['method']} | {r['schedule']} | "
                     f"{loss}{mark} | {acc} |")
    if side:
        lines += ["", "Side grid (τ = 0 control; switch point, microbatch count and K on 30 % jumbled):", "",
                  "| noise | schedule | microbatches | switch | K | held-out loss | downstream acc. |",
                  "|---|---|---|---|---|---|---|"]
        for r in side:
            loss, acc = _fmt(r)
            lines.append(f"| {r['noise_kind']} {100 * r['noise_fraction']:.0f} % | {r['schedule']} | "
                         f"{r['num_microbatches']} | {r['switch']:g} | {'+'.join(r['si_layers'])} | {loss} | {acc} |")
    lines += ["", f"Chosen default: {default}", ""]
    with open(os.path.join(out_dir, "lm_report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _plot(grid, path):
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
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(settings)), 3.6))
    w = 0.8 / len(variants)
    for j, v in enumerate(variants):
        means, stds = [], []
        for s in settings:
            r = next(r for r in grid if (r["noise_kind"], r["noise_fraction"]) == s and (r["method"], r["schedule"]) == v)
            means.append(r["heldout_loss_mean"])
            stds.append(r["heldout_loss_std"])
        ax.bar(np.arange(len(settings)) + j * w, means, w, yerr=stds, capsize=2,
               label=v[1] if v[0] == "presence" else ("uniform" if v[0] == "uniform" else f"sequential {v[1]}"))
    ax.set_xticks(np.arange(len(settings)) + 0.4 - w / 2)
    ax.set_xticklabels([f"{k} {100 * f:.0f}%" for k, f in settings], fontsize=8)
    allm = [r["heldout_loss_mean"] for r in grid]
    ax.set_ylim(min(allm) - 0.1, max(allm) + 0.1)
    ax.set_ylabel("held-out clean loss (nats/token)")
    ax.legend(fontsize=6, ncol=3)
    ax.set_title("PRESENCE on a token-level transformer LM", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="reports/presence")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    console.add_verbose_flag(ap)
    args = ap.parse_args(argv)
    console.quiet(args.verbose)
    cfg = LMConfig.quick_config() if args.quick else LMConfig()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    run(cfg, args.out, progress=not args.no_progress)
    print(open(os.path.join(args.out, "lm_report.md")).read())


if __name__ == "__main__":
    main()

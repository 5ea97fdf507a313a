"""The grid of variants (main, side, corner), the downstream reference and the chosen default."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace

from .config import SCHEDULES, LMConfig
from .data import Corpus, corpus_for
from .report import _base, _plot, _report, _setting, beats
from .train import (_cached, _digest, _training, evaluate, finetune_accuracy, sequential_kept, train,
                    weight_diagnostics)


#: the informative corner: 30 % jumbled text (the noise self-influence detects) and no noise,
#: trained ``corner_steps`` steps with ``corner_seeds``
CORNER = (("none", 0.0), ("jumbled", 0.3))


def _variants(cfg: LMConfig):
    """``(setting, method, schedule, keep, cfg)`` of the main grid, the side grid and the longer-training
    corner."""
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
        # source-clustered microbatches (each microbatch all clean or all noise, as when a loader packs
        # a microbatch from one shard / document): can microbatch SI separate noise when it is concentrated?
        for kind in ("jumbled", "code"):
            by_source = replace(cfg, batching="by_source")
            side.append((kind, 0.3, "uniform", "uniform", None, by_source))
            for s in ("two_stage", "negative"):
                side.append((kind, 0.3, "presence", s, None, by_source))
    corner = []
    if not cfg.quick and cfg.corner_steps:
        long = replace(cfg, steps=cfg.corner_steps, seeds=cfg.corner_seeds)
        for kind, frac in CORNER:
            corner += [(kind, frac, "uniform", "uniform", None, long),
                       (kind, frac, "presence", "two_stage", None, long),
                       (kind, frac, "presence", "negative", None, long),
                       (kind, frac, "presence_sequential", "keep=0.9", 0.9, long)]
    return main, side, corner


PARTS = ("main", "side", "corner")
#: settings whose microbatch weights are traced (τ = −1, seed 0): see :func:`weight_diagnostics`
#: ``(noise, fraction, batching, relative_eps)``; the last one is eq. 7's literal ε, for comparison
DIAGNOSED = (("none", 0.0, "shuffled", True), ("jumbled", 0.3, "shuffled", True), ("jumbled", 0.3, "by_source", True),
             ("code", 0.3, "by_source", True), ("jumbled", 0.3, "shuffled", False))


def run(cfg: LMConfig, out_dir: str, progress: bool = True, parts=PARTS) -> dict:
    """Run (or load from the cache) every run of ``parts`` and, when all parts are asked for, write
    the results; a subset only fills the cache (e.g. to run parts in separate processes)."""
    import numpy as np
    t0 = time.perf_counter()
    cache = os.path.join(out_dir, "lm_runs")
    os.makedirs(cache, exist_ok=True)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    corpus = corpus_for(cfg)
    main, side, corner = _variants(cfg)
    chosen = [v for name, vs in zip(PARTS, (main, side, corner)) if name in parts for v in vs]
    jobs = [(v, seed) for v in chosen for seed in v[-1].seeds]
    it = jobs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc="PRESENCE LM grid", leave=False)
    runs, compute = {}, 0.0
    for (kind, frac, method, schedule, keep, c), seed in it:
        setting = f"{kind}-{frac:g}"

        def one_run(kind=kind, frac=frac, method=method, schedule=schedule, keep=keep, c=c, seed=seed,
                    setting=setting):
            t = time.perf_counter()
            windows, is_noise = corpus.pool(kind, frac)
            extra = {}
            if method == "presence_sequential":
                kept = sequential_kept(c, corpus, windows, keep, cache, setting)
                extra = {"noise_dropped": int(is_noise.sum() - is_noise[kept].sum()), "noise_in_pool": int(is_noise.sum())}
                windows, is_noise = windows[kept], is_noise[kept]
            model = train(c, corpus, windows, seed, "uniform" if method != "presence" else schedule, is_noise)
            return {**evaluate(c, corpus, model, seed), **extra, "seconds": time.perf_counter() - t}
        rec = _cached(os.path.join(cache, f"{_digest(_training(c), setting, method, schedule, seed)}.json"), one_run)
        runs.setdefault((kind, frac, method, schedule, _digest(_training(c))), []).append(rec)
        compute += rec.get("seconds", 0.0)
    if set(parts) != set(PARTS):
        return {"runs": len(jobs), "parts": list(parts)}

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
                   "n_seeds": len(recs), "steps": c.steps, "batching": c.batching,
                   "num_microbatches": c.num_microbatches, "switch": c.switch,
                   "si_layers": list(c.si_layers)}
            if method == "presence_sequential":
                row["noise_dropped"] = recs[0]["noise_dropped"]
                row["noise_in_pool"] = recs[0]["noise_in_pool"]
            out.append(row)
        return out
    grid, side_rows, corner_rows = rows(main), rows(side), rows(corner)
    reference = downstream_reference(cfg, corpus, cache, grid)
    diagnostics = []
    for kind, frac, batching, rel in ((("jumbled", 0.3, "shuffled", True),) if cfg.quick else DIAGNOSED):
        c = replace(cfg, batching=batching, relative_eps=rel)
        diagnostics.append(_cached(os.path.join(cache, f"diag-{_digest(_training(c), kind, frac, 'negative', 0)}.json"),
                                   lambda c=c, kind=kind, frac=frac: weight_diagnostics(c, corpus, kind, frac, "negative")))
    default = choose_default(grid + corner_rows)
    res_path = os.path.join(out_dir, "results.json")
    results = {}
    if os.path.exists(res_path):
        with open(res_path) as fh:
            results = json.load(fh)
    results.update(lm_grid=grid, lm_side_grid=side_rows, lm_corner=corner_rows, chosen_default=default,
                   lm_config={**asdict(cfg), "vocabulary": corpus.vocab_size,
                              "pretrain_windows_available": int(len(corpus.pretrain)),
                              "heldout_windows": int(len(corpus.heldout)),
                              "downstream_train": int(len(corpus.down["train"][1])),
                              "downstream_test": int(len(corpus.down["test"][1])),
                              "downstream_domains": list(corpus.domains)},
                   lm_downstream_reference=reference, lm_weight_diagnostics=diagnostics,
                   lm_seconds=time.perf_counter() - t0, lm_compute_seconds=compute, lm_runs=len(jobs))
    with open(res_path, "w") as fh:
        json.dump(results, fh, indent=1)
    _report(grid, side_rows, corner_rows, default, cfg, out_dir, compute, reference, len(jobs), diagnostics)
    _plot(grid, os.path.join(out_dir, "lm_grid.png"), reference)
    return results


def downstream_reference(cfg: LMConfig, corpus: Corpus, cache: str, grid) -> dict:
    """The downstream task's yardsticks: the same finetuning from a randomly initialised LM (per seed,
    cached), the majority class, and the uniformly pretrained LM without noise."""
    import numpy as np

    from model_zoo import text
    def random_init(seed):
        model = text.build_transformer_lm(corpus.vocab_size, cfg.seq_len, cfg.width, cfg.heads, cfg.blocks, cfg.ffn,
                                          seed=seed)
        return {"downstream_accuracy": finetune_accuracy(cfg, corpus, model, seed)}
    accs = np.array([_cached(os.path.join(cache, f"{_digest(_training(cfg), 'random_init', seed)}.json"),
                             lambda seed=seed: random_init(seed))["downstream_accuracy"] for seed in cfg.seeds])
    yte = corpus.down["test"][1]
    out = {"random_init_accuracy_mean": float(accs.mean()),
           "random_init_accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
           "majority_class_accuracy": float(np.bincount(yte).max() / len(yte)), "n_seeds": len(accs)}
    clean = [r for r in grid if r["method"] == "uniform" and r["noise_kind"] == "none"]
    if clean:
        out["uniform_no_noise_accuracy_mean"] = clean[0]["downstream_accuracy_mean"]
        out["uniform_no_noise_accuracy_std"] = clean[0]["downstream_accuracy_std"]
    return out


def choose_default(grid) -> str:
    """The τ schedule with the most settings better than uniform on held-out loss (ties: fewer
    settings worse), with the evidence in one line."""
    base = _base(grid)
    present = [s for s in SCHEDULES if any(r["schedule"] == s for r in grid)]
    score = {}
    for s in present:
        rows = [r for r in grid if r["method"] == "presence" and r["schedule"] == s]
        better = sum(r["heldout_loss_mean"] < base[_setting(r)]["heldout_loss_mean"] for r in rows)
        sig = sum(beats(r, base[_setting(r)]) for r in rows)
        worse = sum(beats(base[_setting(r)], r) for r in rows)
        score[s] = (sig, better, -worse, len(rows))
    best = max(present, key=lambda s: score[s][:3])
    sig, better, neg_worse, n = score[best]
    return (f"{best}: lower held-out loss than uniform in {better} of {n} data settings "
            f"({sig} by ≥ 2 std over seeds, significantly worse in {-neg_worse}); others: "
            + ", ".join(f"{s} {score[s][1]}/{score[s][3]} ({score[s][0]} ≥ 2 std, {-score[s][2]} worse)"
                        for s in present if s != best))

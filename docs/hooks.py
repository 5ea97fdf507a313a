"""MkDocs hook: result pages are generated from the JSON files the benchmarks write, so a number on
a page cannot disagree with its source. A page writes ``{{ results: NAME }}``; the hook replaces it
with the tables of ``docs/results/NAME.json`` (written by ``make bench-hub`` / ``bench-scale`` /
``bench`` / ``bench-presence``); a met / missed target is computed from the number, not written."""

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
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e7):
            return f"{v:.2e}"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits + 1}g}" if abs(v) < 1 else f"{v:.{digits}g}"
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
        f"GPT-2, {setup['n_pretrain']} sequences, {setup['n_loo']} removals; "
        f"{_vocab_note(d)}target ≥ 2× identity):", "", *fid, "", *_dense_vocab_line(d),
        "**Second derivatives**: HVP against float64 central differences of the gradient (target ≤ 1e-6):",
        "", *hvp, "", f"`quick` run: {d.get('quick')}."])


def _vocab_note(d: dict) -> str:
    tok = d.get("fidelity_tokenizer", "char")
    what = {"bpe": "a byte-level BPE of the embedded corpus", "char": "the embedded corpus' characters"}.get(tok, tok)
    return f"tokens: {what}, vocabulary {_fmt(d['fidelity_vocab'])}; " if "fidelity_vocab" in d else ""


def _dense_vocab_line(d: dict) -> list:
    v = d.get("fidelity_diagonal_vs_dense_vocab_spearman")
    if v is None:
        return []
    return [f"EK-FAC with the vocabulary side diagonal (the default) against the same with it dense (exact), over "
            f"every pretraining sequence: Spearman **{_fmt(v)}** (target ≥ 0.95: "
            f"**{'met' if v >= 0.95 else 'missed'}**).", ""]


def _table(d: dict, rows) -> str:
    """``rows``: ``(key, meaning)``; a key missing from ``d`` is an error (the page and the benchmark
    must agree on names)."""
    out = ["| measurement | value | what it is |", "|---|---|---|"]
    for key, meaning in rows:
        if key not in d:
            raise KeyError(f"benchmark results lack '{key}'")
        v = d[key]
        v = ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) if isinstance(v, dict) else (
            ", ".join(_fmt(x) for x in v) if isinstance(v, list) else _fmt(v))
        out.append(f"| `{key}` | {v} | {meaning} |")
    return "\n".join(out)


def _targets(d: dict, targets) -> str:
    """``targets``: ``(label, key, op, bound)``; met / missed is computed here from the number."""
    lines = []
    for label, key, op, bound in targets:
        v = d[key]
        met = v <= bound if op == "<=" else v >= bound
        lines.append(f"- {label}: `{key}` = {_fmt(v)} (target {op.replace('<=', '≤').replace('>=', '≥')} "
                     f"{_fmt(bound)}) — **{'met' if met else 'missed'}**")
    return "\n".join(lines)


def scale_tables(d: dict) -> str:
    """The EK-FAC-vs-CG scale benchmark (benchmarks/scale.py)."""
    return "\n\n".join([_table(d, [
        ("n_params", "parameters of the causal transformer LM"),
        ("n_pretrain_examples", "training sequences (32 tokens each)"),
        ("train_epoch_seconds_each", "the same `fit` epoch, twice"),
        ("ekfac_fit_seconds", "EK-FAC factors on every sequence (true Fisher, two passes)"),
        ("ekfac_ihvp_seconds", "one EK-FAC inverse-Hessian-vector product"),
        ("ekfac_scoring_seconds", "scoring every sequence"),
        ("ekfac_score_all_over_epoch", "factors + IHVP + every score, end to end, over the faster epoch"),
        ("ekfac_score_all_over_epoch_interleaved", "the same from per-batch medians measured round-robin"),
        ("per_256_sequences_median_seconds", "those medians per phase"),
        ("ekfac_quarter_factors_score_all_over_epoch", "with `fit_factors(max_examples=n/4)`, end to end"),
        ("ekfac_quarter_factors_score_all_over_epoch_interleaved", "the same from the per-batch medians"),
        ("ekfac_quarter_vs_full_factors_spearman", "quarter-factor scores against full-factor scores"),
        ("cg_seconds_per_iteration", f"CG ({d['cg_iterations_run']} iterations run, extrapolated to "
                                     f"{d['cg_budget_iterations']})"),
        ("cg_score_all_seconds", "CG's budget, extrapolated"),
        ("ekfac_over_cg_speedup", "EK-FAC end to end over CG's extrapolated budget"),
        ("ekfac_vs_cg_spearman", f"EK-FAC scores against {d['cg_iterations_run']} CG iterations' (agreement, "
                                 "not quality)"),
        ("si_over_batched_gradient", "ghost-norm self-influence over a batched gradient (throughput)"),
        ("peak_rss_mb", "peak resident memory"),
        ("wall_seconds", "the whole benchmark"),
    ]), _targets(d, [
        ("EK-FAC, everything, full factors", "ekfac_score_all_over_epoch_interleaved", "<=", 3),
        ("EK-FAC, everything, factors on a quarter", "ekfac_quarter_factors_score_all_over_epoch_interleaved",
         "<=", 3),
        ("EK-FAC over CG", "ekfac_over_cg_speedup", ">=", 10),
        ("self-influence over a batched gradient", "si_over_batched_gradient", ">=", 0.5)])])


def engine_tables(d: dict) -> str:
    """The engine benchmark (benchmarks/engine.py)."""
    keys = [(k, "") for k in d if isinstance(d[k], (int, float)) and not isinstance(d[k], bool)]
    return "\n\n".join([_table(d, keys), _targets(d, [
        ("HVP over gradient (forward-over-back)", "hvp_fob_over_grad", "<=", 3),
        ("vectorised per-example over a loop", "per_example_vectorized_over_loop", ">=", 10),
        ("self-influence over a batched gradient", "si_over_batched_gradient", ">=", 0.5)])])


def presence_tables(d: dict) -> str:
    """The PRESENCE step benchmark (benchmarks/presence.py)."""
    keys = [(k, "") for k in d if isinstance(d[k], (int, float)) and not isinstance(d[k], bool)]
    targets = [("PRESENCE step over a plain step, character LM", "presence_step_over_plain_step", "<=", 1.15)]
    if "transformer_presence_step_over_plain_step" in d:
        targets.append(("the same, transformer LM", "transformer_presence_step_over_plain_step", "<=", 1.15))
    return "\n\n".join([_table(d, keys), _targets(d, targets)])


def index_tables(d: dict) -> str:
    """The gradient index benchmark (benchmarks/index.py): one table and the targets per model."""
    parts = []
    for m in d["models"]:
        parts.append(f"**{m['model']}** ({_fmt(m['n_params'])} parameters, {_fmt(m['n_examples'])} examples, "
                     f"k = {m['k']}, {m['dim']} dimensions, {m['dtype']}):")
        parts.append(_table(m, [
            ("index_build_seconds", "projecting, encoding and writing every example (in process, tracing "
                                    "included; the faster of two builds"
                                    + (f", in calls of {m['index_batch_size']:,} examples)" if m.get("index_batch_size")
                                       else ")")),
            ("train_epoch_seconds", "one `fit` epoch over the same corpus and batch size (the faster of two, "
                                    "alternated with the builds)"),
            ("build_over_epoch", "index build over the epoch"),
            ("index_bytes_per_example", "shard bytes on disk per example"),
            ("n_queries", "queries (held-out loss gradients)"),
            ("recall_at_100", "overlap of the index's top 100 with the exact top 100 (mean of both sides"
                              + (f", over queries and {m['projection_seeds']} projection seeds)"
                                 if m.get("projection_seeds") else ")")),
            ("recall_at_100_min", "the worst query's"),
            *([("recall_at_100_by_seed", "each projection seed's mean (seeds 0, 1, …; the same model and budget)")]
              if m.get("projection_seeds") else []),
            ("spearman_vs_exact", "rank correlation with the exact scores over the corpus (mean over queries"
                                  + (" and seeds)" if m.get("projection_seeds") else ")")),
            ("spearman_vs_exact_min", "the worst query's"),
            *([("spearman_vs_exact_by_seed", "each projection seed's mean")] if m.get("projection_seeds") else []),
            ("seconds_per_query_index", "project, score every example, top-k both sides"),
            ("seconds_per_query_index_streamed", "the same, every shard read from disk for the batch"),
            ("seconds_per_query_exact", "one forward-mode pass over the corpus (no index)"),
            ("query_speedup", "exact over index, per query"),
            *([("rerank", "candidates per query and side re-scored exactly (`QueryArgs.rerank`)"),
               ("recall_at_100_rerank", "recall@100 of the re-scored top 100 (mean of both sides)"),
               ("recall_at_100_rerank_min", "the worst query's"),
               ("seconds_per_query_rerank", "one query with re-scoring (its candidates' exact gradients)"),
               ("query_speedup_rerank", "exact over re-scored index, per query")] if m.get("rerank") else []),
            ("peak_rss_mb", "peak resident memory of the benchmark process so far")]))
        parts.append(_targets(m, [("recall@100", "recall_at_100", ">=", 0.9),
                                  ("Spearman", "spearman_vs_exact", ">=", 0.9),
                                  ("build", "build_over_epoch", "<=", 2),
                                  ("query speed-up", "query_speedup", ">=", 100),
                                  ("size", "index_bytes_per_example", "<=", 8192)]))
    return "\n\n".join(parts)


def index_scale_tables(d: dict) -> str:
    """The scale part of the gradient index benchmark."""
    if "scale" not in d:
        return "(not measured: `python -m benchmarks.index --parts scale`)"
    sc = d["scale"]
    rows = ["| examples | shards | build s | build driver MB | largest worker MB | query s (10 queries) | "
            "query MB | bytes / example | keys once |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sc["runs"]:
        rows.append(f"| {_fmt(r['n_examples'])} | {r['shards']} | {_fmt(r['build_seconds'])} | "
                    f"{_fmt(r['build_driver_peak_rss_mb'])} | {_fmt(r['build_worker_peak_rss_mb'])} | "
                    f"{_fmt(r['query_seconds_10_queries'])} | {_fmt(r['query_peak_rss_mb'])} | "
                    f"{_fmt(r['index_bytes_per_example'])} | {r['keys_exactly_once']} |")
    ratios = [(k, v) for k, v in sc.items() if k.endswith("_largest_over_smallest")]
    lines = [f"- `{k}` = {_fmt(v)} (flat memory: ≤ 1.2) — **{'met' if v <= 1.2 else 'missed'}**" for k, v in ratios]
    return "\n".join(rows + [""] + lines)


def vocab_side_tables(d: dict) -> str:
    """The price of a diagonal vocabulary side (benchmarks/vocab_side.py)."""
    rows = ["| vocabulary side of the token table | factor fit (s) | plan of the factors (MB) |", "|---|---|---|"]
    for label in ("dense", "diagonal"):
        rows.append(f"| {label} | {_fmt(d[label]['fit_seconds'])} | {_fmt(d[label]['plan_mb'])} |")
    sp = d["spearman_diagonal_vs_dense"]
    return "\n".join(rows + [
        "", f"Scores with the diagonal side against the dense side's ({_fmt(d['n_params'])}-parameter GPT-2, vocabulary "
        f"{_fmt(d['vocab'])}, {d['sequences']} sequences): Pearson {_fmt(d['pearson_diagonal_vs_dense'])}, "
        f"Spearman **{_fmt(sp)}** (per test point: {', '.join(_fmt(v) for v in d['spearman_per_test_point'])}) — "
        f"target within 0.05 of the exact block's: **{'met' if sp >= 0.95 else 'missed'}**; the inverse-HVPs differ by "
        f"{_fmt(d['ihvp_relative_difference'])} (relative). For scale, the identity-Hessian baseline's Spearman against "
        f"the dense side's scores is {_fmt(d['spearman_identity_vs_dense'])}."])


def _measured(m: dict | None) -> str:
    """Which code measured a row (``benchmarks.common.code_version``, stored as ``measured``): its commit (``+ changes``
    where the library's files differed from it) and date; a run from before commits were stored names the results
    commit that first recorded it (``recorded_in``, filled from the file's git history); else "not recorded"."""
    if not m:
        return "not recorded"
    day = str(m.get("date", ""))[:10]
    if m.get("recorded_in"):
        return f"recorded in `{m['recorded_in']}` ({day})"
    if not m.get("commit"):
        return f"outside a git checkout ({day})"
    return f"code of `{m['commit']}`{' + changes' if m.get('changes') else ''} ({day})"


#: The targets of the sizes users bring (issue 31): training epochs per path, seconds per index query, peak RSS.
REAL_SIZE_TARGETS = {"influence": 4, "fit_factors": 2.5, "self_influence": 1, "index_build": 1.5}
REAL_SIZE_QUERY_SECONDS, REAL_SIZE_PEAK_MB = 1, 10_000
REAL_SIZE_NAMES = {"gpt2-small": "GPT-2 small", "bert-base": "BERT base", "llama-100m": "Llama 100 M"}


def real_size_summary(d: dict) -> str:
    """One row per real-size model (not ``gpt2-mid``): each target path as ``N.NN epochs at G.GG GB`` (the
    latest run's training epochs and peak RSS), the index query in seconds, and whether every target was met;
    the README quotes this table as it is (tests/test_docs.py)."""
    paths = list(REAL_SIZE_TARGETS) + ["index_query"]
    head = ["multi-stage influence", "`fit_factors`", "self-influence", "index build", "index query"]
    rows = ["| model | " + " | ".join(f"{h} (≤ {REAL_SIZE_TARGETS.get(p, REAL_SIZE_QUERY_SECONDS)}"
                                       f"{' s' if p == 'index_query' else ''})" for h, p in zip(head, paths)) + " |",
            "|---" * (len(paths) + 1) + "|"]
    for name, label in REAL_SIZE_NAMES.items():
        m = d["models"].get(name, {})
        if "paths" not in m:
            continue
        cells = []
        for p in paths:
            r = m["paths"].get(p)
            if not r:
                cells.append("not run")
            elif not r.get("ok"):
                cells.append("**failed**")
            elif p == "index_query":
                ok = r["seconds"] <= REAL_SIZE_QUERY_SECONDS
                cells.append(f"{r['seconds']:.2f} s{'' if ok else ' (**missed**)'}")
            else:
                ok = r["over_epoch"] <= REAL_SIZE_TARGETS[p] and r["peak_rss_mb"] <= REAL_SIZE_PEAK_MB
                cells.append(f"{r['over_epoch']:.2f} epochs at {r['peak_rss_mb'] / 1000:.2f} GB"
                             f"{'' if ok else ' (**missed**)'}")
        rows.append(f"| {label} ({m['n_params'] / 1e6:.0f} M, vocabulary {m['vocab']:,}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def real_size_tables(d: dict) -> str:
    """Every path at real sizes (benchmarks/real_size.py): one table per model."""
    limits = {**REAL_SIZE_TARGETS, "influence_updated": REAL_SIZE_TARGETS["influence"]}
    out = [real_size_summary(d), "", f"Machine: {d.get('machine', '?')}."]
    for key, note in d.get("notes", {}).items():
        out.append(f"\n- **{key}**: {note}.")
    for name, m in d["models"].items():
        if "paths" not in m:
            out += ["", f"### {name}", "", f"not measured: {m.get('error')}"]
            continue
        out += ["", f"### {name}", "",
                f"{_fmt(m['n_params'])} parameters, vocabulary {_fmt(m['vocab'])}, {m['layers']} × {m['width']}, "
                f"{_fmt(m['n_sequences'])} sequences of {m['length']} tokens, batch {m['batch']}; one training epoch "
                f"(`train_epoch_seconds`) {_fmt(m['train_epoch_seconds'])} s.", "",
                f"| path | ok | seconds | training epochs (target) | peak RSS MB (≤ {REAL_SIZE_PEAK_MB:,}) | at (library phase) | "
                "plan estimate MB (estimate / peak) | measured | error |", "|---|---|---|---|---|---|---|---|---|"]
        for path, r in m["paths"].items():
            over, peak, est = r.get("over_epoch"), r.get("peak_rss_mb"), r.get("estimated_mb")
            lim = limits.get(path)
            around = [e for e in r.get("paired_epoch_seconds") or [] if e]
            # benchmarks.real_size --paired-epochs: over the epochs timed around it
            paired = (f"over the epochs timed just before and after it ({' and '.join(_fmt(e) + ' s' for e in around)})"
                      if around and over is not None else "")
            target = ("" if lim is None or over is None else f"≤ {lim}: {'met' if over <= lim else 'missed'}")
            target = f" ({'; '.join(t for t in (target, paired) if t)})" if target or paired else ""
            if path == "index_query" and r.get("ok"):
                target = (f" ({_fmt(r['seconds'])} s per query; ≤ {REAL_SIZE_QUERY_SECONDS} s: "
                          f"{'met' if r['seconds'] <= REAL_SIZE_QUERY_SECONDS else 'missed'})")
            ratio = f" ({_fmt(est / peak)})" if est and peak else ""
            err = (str(r.get("error") or "")[:160]).replace("|", "/").replace("\n", " ")
            at = (r.get("timeline") or {}).get("peak_phase", "")
            out.append(f"| `{path}` | {r.get('ok')} | {_fmt(r.get('seconds'))} | {_fmt(over)}{target} | {_fmt(peak)} | "
                       f"{at} | {_fmt(est)}{ratio} | {_measured(r.get('measured'))} | {err} |")
    return "\n".join(out)


def _agreement_cells(fit: dict, dampings: list) -> list:
    """A fit's scores against the reference fit's, per damping: Spearman / Pearson / top-10 harmful and helpful
    examples shared, or "(reference)" for the reference itself (benchmarks/covariance_cap.py's ``scores_vs_full``)."""
    cells = []
    for dn in dampings:
        a = (fit.get("scores_vs_full") or {}).get(dn)
        cells.append("(reference)" if a is None else
                     f"{_fmt(a['spearman'])} / {_fmt(a['pearson'])} / "
                     f"{round(a['top10_harmful_overlap'] * 10)} and {round(a['top10_helpful_overlap'] * 10)}")
    return cells


def covariance_cap_tables(d: dict) -> str:
    """EK-FAC with its covariances on fewer examples against the full fit (benchmarks/covariance_cap.py)."""
    dampings = next((list(f["scores_vs_full"]) for f in d["fits"].values() if f.get("scores_vs_full")), [])
    rows = [f"{d['model']}, {_fmt(d['n_sequences'])} sequences. Each fit's time is over the training epochs timed in the "
            "same process before and after the fits of its run. Scores against the full fit's, as Spearman / Pearson / "
            "top-10 harmful and helpful examples shared:", "",
            "| factors | fit seconds | training epochs (`fit_factors` target ≤ 2.5) | "
            + " | ".join(dampings) + " |", "|---|---|---|" + "---|" * len(dampings)]
    for key, f in d["fits"].items():
        if key == "full":
            label = "covariances on every sequence (the default)"
        elif key.startswith("covariance_max_examples="):
            label = f"covariances on the first {key.split('=')[1]} (`{key}`)"
        else:
            label = f"every sequence, labels sampled with another seed ({key.split('seed ')[-1]}): the noise floor"
        cells = _agreement_cells(f, dampings)
        around = " and ".join(_fmt(e) + " s" for e in f.get("epoch_seconds", []))
        timed = (["—", "— (a yardstick for the scores, not timed for the target)"] if "seed" in key else
                 [_fmt(f["seconds"]), f"{_fmt(f['over_epoch'])} ({'met' if f['over_epoch'] <= 2.5 else 'missed'}; "
                  f"epochs {around})"])
        rows.append(f"| {label} | " + " | ".join(timed + cells) + " |")
    return "\n".join(rows)


def product_dtype_tables(d: dict) -> str:
    """The factors' product dtypes against the default fit's scores (benchmarks/covariance_cap.py --product-dtypes);
    no times: the fits ran beside other work, and benchmarks/products.py times the steps in turns."""
    dampings = next((list(f["scores_vs_full"]) for f in d["fits"].values() if f.get("scores_vs_full")), [])
    rows = [f"{d['model']}, {_fmt(d['n_sequences'])} sequences; this CPU multiplies bfloat16 "
            f"{'natively' if d.get('native_bfloat16') else 'by emulation'}. Scores against the default fit's, as "
            "Spearman / Pearson / top-10 harmful and helpful examples shared:", "",
            "| factors | products in bfloat16 | " + " | ".join(dampings) + " |", "|---|---|" + "---|" * len(dampings)]
    for key, f in d["fits"].items():
        if key == "full":
            label = f"the default (`product_dtype='{f.get('product_dtype', 'auto')}'`)"
        elif key.startswith("full, product_dtype="):
            label = f"`product_dtype='{key.split('=')[1]}'`"
        elif key.startswith("covariance_max_examples="):
            label = f"covariances on the first {key.split('=')[1]} (`{key}`)"
        else:
            label = f"the default, labels sampled with another seed ({key.split('seed ')[-1]}): the noise floor"
        cells = _agreement_cells(f, dampings)
        low = f.get("bfloat16_products")
        rows.append(f"| {label} | {'—' if low is None else low} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def products_table(d: dict) -> str:
    """The factor passes' covariance and rotation products, einsum against kfac.products (benchmarks/products.py)."""
    rows = [f"{_fmt(d['batch'])} × {_fmt(d['length'])} float32 tokens, {d['machine']['cpus']} cores; milliseconds per "
            "call (median of the rounds; the speed-up over `tf.einsum` in brackets) and the largest error against "
            "float64 NumPy, relative to the largest entry:", "",
            "| width | covariance: einsum | covariance: `token_gram` | rotation: einsum | rotation: `token_matmul` "
            "| largest error (einsum / ours) |", "|---|---|---|---|---|---|"]
    def ours(v, prefix):
        return next(k for k in v if k.startswith(prefix) and k.endswith("(token_gram)"))
    for r in d["rows"]:
        v = r["variants"]
        ce, cg = v["covariance: einsum"], v[ours(v, "covariance: tiles")]
        re_, rm = v["rotation: einsum"], v["rotation: one matmul (token_matmul)"]
        rows.append(f"| {_fmt(r['width'])} | {ce['median_seconds'] * 1e3:.1f} | {cg['median_seconds'] * 1e3:.1f} "
                    f"({cg['speedup_over_einsum']:.2f}×) | {re_['median_seconds'] * 1e3:.1f} | "
                    f"{rm['median_seconds'] * 1e3:.1f} ({rm['speedup_over_einsum']:.2f}×) | "
                    f"{max(ce['max_error'], re_['max_error']):.0e} / {max(cg['max_error'], rm['max_error']):.0e} |")
    tiles = [256, 384, 512]
    if all(any(k.startswith(f"covariance in bfloat16: tiles of {t}") for k in r["variants"])
           for r in d["rows"] for t in tiles):
        def ms(v, label):
            key = next(k for k in v if k == label or k == label + " (token_gram)")
            return f"{v[key]['median_seconds'] * 1e3:.1f}" + (" ⟵" if key.endswith("(token_gram)") else "")
        rows += ["", "The covariance's tile width, in the model's float32 and in bfloat16 (how `product_dtype=\"auto\"` "
                     "multiplies the sides of 1,024 columns or more on this machine), milliseconds per call; ⟵ marks "
                     "`token_gram`'s (`GRAM_BLOCK`):", "",
                 "| width | float32: tiles of 256 | 384 | 512 | bfloat16: one matmul | tiles of 256 | 384 | 512 |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            v = r["variants"]
            rows.append(f"| {_fmt(r['width'])} | " + " | ".join(
                [ms(v, f"covariance: tiles of {t}") for t in tiles] + [ms(v, "covariance in bfloat16: one matmul")]
                + [ms(v, f"covariance in bfloat16: tiles of {t}") for t in tiles]) + " |")
    if d.get("step"):
        st = d["step"]
        rows += ["", f"{st['model']}'s whole compiled factor steps, random weights, {_fmt(d['batch'])} × "
                     f"{_fmt(d['length'])} tokens, each variant in a process of its own: the operations in the step's "
                     "graph, the seconds to trace it, its first call (graph optimisation and the first run) and its "
                     "median call after that:", "",
                 "| step | products | operations | trace | first call | then |", "|---|---|---|---|---|---|"]
        for what in ("covariance", "correction"):
            for v in st["variants"]:
                r = v[what]
                rows.append(f"| {what} | {v['variant']} | {r['operations']:,} | {r['trace_seconds']:.1f} s | "
                            f"{r['first_call_seconds']:.1f} s | {r['median_call_seconds']:.2f} s |")
    if d.get("product_dtype"):
        pd = d["product_dtype"]
        base = pd["variants"]["model"]
        rows += ["", f"{pd['model']}'s two steps with each `product_dtype`, built in one process and called in turns "
                     f"(median of {len(base['covariance'])} rounds; this CPU multiplies bfloat16 "
                     f"{'natively' if pd['native_bfloat16'] else 'by emulation'}):", "",
                 "| `product_dtype` | products in bfloat16 | covariance step | correction step |", "|---|---|---|---|"]
        for name, v in pd["variants"].items():
            cells = [f"{v[f'median_{w}_seconds']:.2f} s" + ("" if name == "model" else
                     f" ({v[f'median_{w}_seconds'] / base[f'median_{w}_seconds'] - 1:+.0%})")
                     for w in ("covariance", "correction")]
            rows.append(f"| `{name}` | {v['bfloat16_products']} of {v['products']} | " + " | ".join(cells) + " |")
    if d.get("running_sums"):
        rs = d["running_sums"]
        base = rs["variants"]["whole matrices"]
        rows += ["", f"{rs['model']}'s covariance pass as `fit_factors` runs it in the graph — each dense side's running "
                     "sum kept as its upper tiles, which `take` completes once — against running sums of whole "
                     "matrices (every batch's mirrored `token_gram` added to a `[d, d]` variable, as before), built in "
                     f"one process and called in turns, batch by batch ({rs['sequences']} sequences, {rs['rounds']} "
                     f"rounds; the two sums differ by {rs['max_relative_difference']:.0e} of their largest entry):", "",
                 "| running sums | first call | then (median) | CPU-seconds (median) |", "|---|---|---|---|"]
        for name, v in rs["variants"].items():
            rel = lambda k: "" if v is base else f" ({v[k] / base[k] - 1:+.0%})"  # noqa: E731
            rows.append(f"| {name} | {v['first_call_seconds']:.1f} s | {v['median_wall_seconds']:.2f} s"
                        f"{rel('median_wall_seconds')} | {v['median_cpu_seconds']:.2f}{rel('median_cpu_seconds')} |")
    return "\n".join(rows)


def serve_table(d: dict) -> str:
    """The index page under load (``benchmarks/serve.py``)."""
    ix = d["index"]
    rows = [("indexed examples × dimension", f"{ix['count']:,} × {ix['dim']:,} ({ix['bytes'] / 2 ** 20:.0f} MB on disk)"),
            ("model", f"keras-hub GPT-2, {ix['n_params']:,} parameters"),
            ("queries, concurrent clients", f"{d['queries']}, {d['clients']}"),
            ("latency p50 / p99", f"**{d['p50_seconds']:.3f} s** / **{d['p99_seconds']:.3f} s** (targets 0.5 / 2 s)"),
            ("throughput", f"{d['throughput_per_second']:.1f} queries/s"),
            ("malformed requests answered 400", f"{d['malformed_answered_400']} of {d['malformed']}"),
            ("answering afterwards", "yes" if d["answers_after_malformed"] else "**no**"),
            ("server start-up (loading the corpus and the index)", f"{d['startup_seconds']:.0f} s")]
    return "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + f"\n\n{d['machine']}.\n"


GENERATORS = {"covariance_cap": covariance_cap_tables, "product_dtype": product_dtype_tables, "products": products_table, "serve": serve_table, "vocab_side": vocab_side_tables, "real_size": real_size_tables, "index": index_tables, "index-scale": index_scale_tables, "hub": hub_tables, "scale": scale_tables, "engine": engine_tables, "presence": presence_tables}


def render(name: str) -> str:
    path = os.path.join(HERE, "results", f"{name if name in ('vocab_side', 'real_size', 'covariance_cap', 'product_dtype') else name.split('-')[0]}.json")
    if name not in GENERATORS:
        raise KeyError(f"no generator for results '{name}' (known: {sorted(GENERATORS)})")
    with open(path) as fh:
        d = json.load(fh)
    text = GENERATORS[name](d)
    if name != "real_size":       # its rows say it one by one
        text += f"\n\n*Last written by a run of:* {_measured(d.get('measured'))}.\n"
    return text


def include(rel: str) -> str:
    path = os.path.normpath(os.path.join(HERE, os.pardir, rel))
    with open(path) as fh:
        text = fh.read()
    return text.replace("](docs/", "](")     # the README's links into docs/ (its screenshot), seen from the site


def on_page_markdown(markdown, page, config, files):
    markdown = INCLUDE.sub(lambda m: include(m.group(1)), markdown)
    return PLACEHOLDER.sub(lambda m: render(m.group(1)), markdown)

"""The docs: the site builds with warnings as errors, result pages come from their JSON files, the
README stays short and its benchmark numbers are the ones in the results file."""

import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(pathlib.Path(sys.executable).parent))
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: make install installs requirements-docs.txt")
    run = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    page = (tmp_path / "site" / "results" / "hub" / "index.html").read_text()
    data = json.loads((ROOT / "docs" / "results" / "hub.json").read_text())
    assert f"{data['n_params']:,}" in page and "{{" not in page       # rendered from the JSON, no placeholder left
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "Analyzer" in api and "InfluenceArgs" in api and "SolverConfig" in api


def test_result_tables_follow_the_json():
    data = json.loads((ROOT / "docs" / "results" / "hub.json").read_text())
    changed = dict(data, n_params=1234567, default_over_epoch=2.5)
    text = hooks().hub_tables(changed)
    assert "1,234,567" in text and "**2.5 epochs**" in text
    assert f"{data['n_params']:,}" not in text


def test_readme_is_short_and_quotes_the_results_file():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    data = json.loads((ROOT / "docs" / "results" / "hub.json").read_text())
    assert f"{data['n_params']:,}-parameter" in readme
    assert f"{data['default_over_epoch']:.2f} training epochs" in readme
    assert f"{data['default_over_epoch_2k']:.2f} epochs" in readme
    assert f"{data['fidelity_over_identity']['default']:.2f}×" in readme
    assert "../shared" not in readme
    index = {m["model"]: m for m in json.loads((ROOT / "docs" / "results" / "index.json").read_text())["models"]}
    for name, size in (("gpt2", "2,000 sequences"), ("gpt2-n10000", "10,000")):
        m = index[name]
        assert f"{m['spearman_vs_exact']:.3f}" in readme and f"{m['recall_at_100']:.3f}" in readme, name
    assert f"{index['gpt2-n10000']['build_over_epoch']:.2f}\ntraining epochs" in readme
    assert f"{index['gpt2-n10000']['query_speedup']:,.0f}×" in readme and f"{index['digits']['query_speedup']:.0f}×" in readme
    assert f"{index['digits']['spearman_vs_exact']:.3f} / {index['digits']['recall_at_100']:.3f}" in readme
    assert f"built in {index['digits']['build_over_epoch']:.2f} epochs" in readme
    scale = json.loads((ROOT / "docs" / "results" / "index.json").read_text())["scale"]["runs"][-1]
    assert scale["n_examples"] == 10**6 and f"indexed 10⁶ examples in {scale['build_seconds']:.0f} s" in readme
    n10k = index["gpt2-n10000"]
    assert f"`rerank={n10k['rerank']}`, lifts recall@100 to {n10k['recall_at_100_rerank']:.3f}" in readme
    assert f"{n10k['query_speedup_rerank']:.1f}× less than the corpus pass" in readme


def test_real_size_and_vocabulary_tables_follow_their_json():
    """The real-size page's tables and the vocabulary-side price come from their JSON files; met / missed
    is computed from the numbers, and a path that failed shows its error."""
    h = hooks()
    data = json.loads((ROOT / "docs" / "results" / "real_size.json").read_text())
    name, model = next((k, m) for k, m in data["models"].items() if "paths" in m)
    text = h.real_size_tables(data)
    assert f"### {name}" in text and f"{model['n_params']:,}" in text
    for path in model["paths"]:
        assert f"`{path}`" in text
    # every stored row says which code measured it (or which results commit recorded it)
    for m in data["models"].values():
        for path, r in (m.get("paths") or {}).items():
            assert r.get("measured", {}).get("date"), path
            assert r["measured"].get("commit") or r["measured"].get("recorded_in"), path
    assert "not recorded" not in text
    changed = json.loads(json.dumps(data))
    first = next(iter(changed["models"][name]["paths"]))
    changed["models"][name]["paths"]["fit_factors"] = {"ok": True, "seconds": 10.0, "over_epoch": 9.5,
                                                      "peak_rss_mb": 1000.0, "estimated_mb": 1100.0, "error": None}
    changed["models"][name]["paths"][first] = {"ok": False, "seconds": None, "over_epoch": None, "peak_rss_mb": None,
                                               "estimated_mb": None, "error": "MemoryBudgetError: too big"}
    changed["models"][name]["paths"]["index_build"] = {"ok": True, "seconds": 120.0, "over_epoch": 1.2,
                                                      "paired_epoch_seconds": [90.0, 110.0], "peak_rss_mb": 900.0}
    changed["models"][name]["paths"]["index_build"]["measured"] = {"commit": "abc1234", "changes": True,
                                                                   "date": "2026-12-06 15:51 UTC"}
    text = h.real_size_tables(changed)
    row = next(r for r in text.splitlines() if r.startswith("| `index_build`"))
    assert "code of `abc1234` + changes (2026-12-06)" in row
    assert "| not recorded |" in next(r for r in text.splitlines() if r.startswith("| `fit_factors`"))
    assert "1.2 (≤ 1.5: met; over the epochs timed just before and after it (90 s and 110 s))" in text
    assert "9.5 (≤ 2.5: missed)" in text and "(1.1)" in text and "MemoryBudgetError: too big" in text
    vs = json.loads((ROOT / "docs" / "results" / "vocab_side.json").read_text())
    text = h.vocab_side_tables(vs)
    assert f"Spearman **{h._fmt(vs['spearman_diagonal_vs_dense'])}**" in text
    assert h.vocab_side_tables(dict(vs, spearman_diagonal_vs_dense=0.9)).count("missed") == 1


def test_covariance_cap_table_follows_its_json():
    """The EK-FAC guide's covariance-cap table comes from ``docs/results/covariance_cap.json``: every fit is a row,
    met / missed against the 2.5-epoch target is computed from the numbers, and each damping's agreement is shown."""
    h = hooks()
    data = json.loads((ROOT / "docs" / "results" / "covariance_cap.json").read_text())
    text = h.covariance_cap_tables(data)
    for key, f in data["fits"].items():
        if "seed" not in key:          # a label-seed reference row is a yardstick for the scores, shown untimed
            assert h._fmt(f["seconds"]) in text and h._fmt(f["over_epoch"]) in text, key
        for a in (f.get("scores_vs_full") or {}).values():
            assert h._fmt(a["spearman"]) in text
    changed = json.loads(json.dumps(data))
    capped = next(k for k in changed["fits"] if k != "full")
    changed["fits"][capped]["over_epoch"] = 2.4
    changed["fits"]["full"]["over_epoch"] = 3.1
    damping = next(iter(changed["fits"][capped]["scores_vs_full"]))
    changed["fits"][capped]["scores_vs_full"][damping]["spearman"] = 0.12341
    text = h.covariance_cap_tables(changed)
    assert "| 2.4 (met;" in text and "| 3.1 (missed;" in text and "0.1234 /" in text


def test_product_dtype_table_follows_its_json():
    """The EK-FAC guide's product_dtype table comes from ``docs/results/product_dtype.json``: a row per fit with its
    count of bfloat16 products and each damping's agreement with the default fit (the default itself a bfloat16 fit
    on this machine), changed when the numbers change."""
    h = hooks()
    data = json.loads((ROOT / "docs" / "results" / "product_dtype.json").read_text())
    assert data["native_bfloat16"] and data["fits"]["full"]["product_dtype"] == "auto"
    assert data["fits"]["full"]["bfloat16_products"] > 0 and data["fits"]["full, product_dtype=model"]["bfloat16_products"] == 0
    text = h.product_dtype_tables(data)
    for key, f in data["fits"].items():
        for a in (f.get("scores_vs_full") or {}).values():
            assert f"{h._fmt(a['spearman'])} / {h._fmt(a['pearson'])} /" in text, key
    assert "| `product_dtype='model'` | 0 |" in text
    changed = json.loads(json.dumps(data))
    damping = next(iter(changed["fits"]["full, product_dtype=model"]["scores_vs_full"]))
    changed["fits"]["full, product_dtype=model"]["scores_vs_full"][damping]["spearman"] = 0.12341
    assert "0.1234 /" in h.product_dtype_tables(changed) and "0.1234 /" not in text


def test_products_table_follows_its_json():
    """The EK-FAC guide's products table comes from ``docs/results/products.json``: a row per width with each
    variant's time, its speed-up over einsum and the errors, and a row per whole factor step and variant, changed
    when the numbers change."""
    h = hooks()
    data = json.loads((ROOT / "docs" / "results" / "products.json").read_text())
    text = h.products_table(data)
    # the variant the benchmark labels as token_gram's is the library's GRAM_BLOCK (read from the source: no TF here)
    block = int(re.search(r"^GRAM_BLOCK = (\d+)$", (ROOT / "tf_influence" / "kfac" / "products.py").read_text(),
                          re.M).group(1))
    for r in data["rows"]:
        g = r["variants"][f"covariance: tiles of {block} (token_gram)"]
        b16 = r["variants"][f"covariance in bfloat16: tiles of {block} (token_gram)"]
        m = r["variants"]["rotation: one matmul (token_matmul)"]
        assert f"| {h._fmt(r['width'])} |" in text
        assert f"({g['speedup_over_einsum']:.2f}×)" in text and f"({m['speedup_over_einsum']:.2f}×)" in text
        assert f" {g['median_seconds'] * 1e3:.1f} ⟵ |" in text and f" {b16['median_seconds'] * 1e3:.1f} ⟵ |" in text
    changed = json.loads(json.dumps(data))
    changed["rows"][0]["variants"]["rotation: one matmul (token_matmul)"]["speedup_over_einsum"] = 7.77
    assert "(7.77×)" in h.products_table(changed) and "(7.77×)" not in text
    assert data.get("step"), "products.json has no whole-step timings (make bench-products)"
    for v in data["step"]["variants"]:
        for what in ("covariance", "correction"):
            r = v[what]
            assert (f"| {what} | {v['variant']} | {r['operations']:,} | {r['trace_seconds']:.1f} s | "
                    f"{r['first_call_seconds']:.1f} s | {r['median_call_seconds']:.2f} s |") in text
    changed["step"]["variants"][0]["covariance"]["operations"] = 123456
    assert "| 123,456 |" in h.products_table(changed) and "| 123,456 |" not in text
    # the product_dtype rows: each dtype's medians, and their change against the model's dtype
    assert data.get("product_dtype"), "products.json has no product_dtype timings (make bench-products)"
    pd = data["product_dtype"]
    for name, v in pd["variants"].items():
        cells = [f"{v[f'median_{w}_seconds']:.2f} s" for w in ("covariance", "correction")]
        assert f"| `{name}` | {v['bfloat16_products']} of {v['products']} | {cells[0]}" in text
    changed["product_dtype"]["variants"]["bfloat16"]["median_correction_seconds"] = \
        pd["variants"]["model"]["median_correction_seconds"] / 2
    assert "(-50%) |" in h.products_table(changed) and "(-50%) |" not in text


def test_benchmarks_store_the_code_they_measured(tmp_path, monkeypatch):
    """``benchmarks.common.code_version``: the checkout's commit, and whether the library's tracked files differ from
    it; ``benchmarks.real_size`` stores it with every path it runs (its worker processes stubbed here)."""
    from benchmarks import common, real_size
    repo = tmp_path / "repo"
    (repo / "tf_influence").mkdir(parents=True)
    (repo / "tf_influence" / "x.py").write_text("a = 1\n")
    (repo / "notes.txt").write_text("n\n")
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    v = common.code_version(str(repo))
    assert v["commit"] == git("rev-parse", "--short=7", "HEAD") and v["changes"] is False and v["date"].endswith("UTC")
    (repo / "notes.txt").write_text("changed\n")                 # not the library's code
    assert common.code_version(str(repo))["changes"] is False
    (repo / "tf_influence" / "x.py").write_text("a = 2\n")
    assert common.code_version(str(repo))["changes"] is True
    assert common.code_version(str(tmp_path / "not_a_checkout"))["commit"] is None

    monkeypatch.setattr(common, "code_version", lambda root=None: {"commit": "feed123", "changes": False,
                                                                   "date": "2026-12-06 16:00 UTC"})
    spawned = []

    def spawn(name, path, args):
        spawned.append(path)
        if path == "prepare":       # the worker trains the model into the run's folder
            pathlib.Path(real_size._paths_dir(args, name)).mkdir(parents=True, exist_ok=True)
            return {"ok": True, "n_params": 10, "train_epoch_seconds": 2.0, "peak_rss_mb_train": 1.0}
        return {"ok": True, "seconds": 1.0, "peak_rss_mb": 5.0, "estimated_mb": None}
    monkeypatch.setattr(real_size, "_spawn", spawn)
    out = tmp_path / "rs.json"
    real_size.main(["--models", "gpt2-mid", "--paths", "fit_factors", "--workdir", str(tmp_path / "w"),
                    "--out", str(out)])
    got = json.loads(out.read_text())["models"]["gpt2-mid"]["paths"]["fit_factors"]
    assert spawned == ["prepare", "fit_factors"] and got["measured"]["commit"] == "feed123"
    # the other benchmarks' files: stamped by the shared writer, replacing an earlier run's stamp
    common.write_json({"x": 1.0, "measured": {"recorded_in": "old1234"}}, str(tmp_path / "b.json"))
    assert json.loads((tmp_path / "b.json").read_text())["measured"]["commit"] == "feed123"
    assert "code of `feed123` (2026-12-06)" in hooks().real_size_tables(json.loads(out.read_text()))


def test_every_results_page_says_which_code_wrote_its_numbers():
    """Each rendered results file ends with the code that last wrote it (or the commit that recorded it, for files
    written before the benchmarks stored it); the real-size tables say it per row."""
    h = hooks()
    for name in h.GENERATORS:
        text = h.render(name)
        if name == "real_size":
            assert "*Last written by a run of:*" not in text
            continue
        line = text.strip().splitlines()[-1]
        assert line.startswith("*Last written by a run of:*") and ("code of `" in line or "recorded in `" in line), name


def test_readme_real_size_figures_are_the_stored_runs():
    """The README's Models line quotes multi-stage influence and ``fit_factors`` at each real size as
    ``docs/results/real_size.json`` holds them (epochs over the epochs timed around the run, peak in GB), so a
    rerun that changes them fails here until the README says so."""
    readme = (ROOT / "README.md").read_text()
    data = json.loads((ROOT / "docs" / "results" / "real_size.json").read_text())
    models = data["models"]
    for name in ("gpt2-small", "bert-base", "llama-100m"):
        for path in ("influence", "fit_factors"):
            r = models[name]["paths"][path]
            quoted = f"{r['over_epoch']:.2f} epochs"
            if path == "influence":
                quoted += f" at {r['peak_rss_mb'] / 1000:.2f} GB"
            assert quoted in readme, (name, path, quoted)
    # the summary table as the results page generates it, so every cell (and met / missed) follows the file
    table = hooks().real_size_summary(data)
    assert table in readme and table in hooks().real_size_tables(data)
    slower = json.loads(json.dumps(data))
    slower["models"]["gpt2-small"]["paths"]["fit_factors"]["over_epoch"] = 2.6
    peak = data["models"]["gpt2-small"]["paths"]["fit_factors"]["peak_rss_mb"] / 1000
    assert f"2.60 epochs at {peak:.2f} GB (**missed**)" in hooks().real_size_summary(slower)

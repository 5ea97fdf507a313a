"""The reduced reproduction (`make reproduce-quick`) runs every experiment end to end and writes
the documented results.json. It checks the harness works, not the paper's numbers."""

import json
import math

import pytest

from experiments import reproduce


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    reproduce.main(["--quick", "--out", str(out), "--data-dir", str(tmp_path_factory.mktemp("tfds")),
                    "--no-progress"])
    return out, json.load(open(out / "results.json"))


def test_every_experiment_reports_its_keys(quick_results):
    out, res = quick_results
    assert set(res) == set(reproduce.EXPERIMENTS)
    for name in ("case1_fixed", "case2_updated", "identity_baseline", "loss_baseline", "cross_task"):
        r = res[name]
        assert {"pearson", "spearman", "n_examples", "seconds"} <= set(r), name
        assert r["n_examples"] == 8 and -1 <= r["pearson"] <= 1 and not math.isnan(r["pearson"])
        assert (out / f"{name}.png").stat().st_size > 1000
    c = res["cleansing"]
    for key in ("acc_original", "acc_drop_top", "acc_drop_random"):
        assert 0 <= c[key] <= 1 and f"{key}_std" in c
    assert c["per_seed"][0]["n_dropped"] == round(0.1 * 576)
    assert res["task_similarity"]["mean_abs_same_task"] > 0 and res["task_similarity"]["mean_abs_different_task"] > 0
    assert res["finetune_size"]["n_finetune_3n"] == 3 * res["finetune_size"]["n_finetune_n"]
    assert (out / "report.md").read_text().count("| `") == len(reproduce.EXPERIMENTS)


def test_rerun_of_one_experiment_reuses_the_loo_cache(quick_results, tmp_path_factory):
    out, res = quick_results
    before = json.load(open(out / "loo_cache.json"))
    reproduce.main(["--quick", "--out", str(out), "--only", "case1_fixed", "--no-progress",
                    "--data-dir", str(tmp_path_factory.mktemp("tfds2"))])
    again = json.load(open(out / "results.json"))
    assert again["case1_fixed"]["pearson"] == pytest.approx(res["case1_fixed"]["pearson"])
    assert json.load(open(out / "loo_cache.json")) == before  # nothing new had to be computed
    assert set(again) == set(reproduce.EXPERIMENTS)  # the other experiments' results are kept


def test_config_overrides_from_the_command_line():
    import argparse
    ap = argparse.ArgumentParser()
    cfg = reproduce._apply_overrides(reproduce.ReproConfig(), ["case2_finetune_steps=1000", "seeds=0,1",
                                                                "alpha=0.1", "sensitivity=false"], ap)
    assert (cfg.case2_finetune_steps, cfg.seeds, cfg.alpha, cfg.sensitivity) == (1000, (0, 1), 0.1, False)
    with pytest.raises(SystemExit):
        reproduce._apply_overrides(reproduce.ReproConfig(), ["no_such_field=1"], ap)
    with pytest.raises(SystemExit):
        reproduce._apply_overrides(reproduce.ReproConfig(), ["alpha=abc"], ap)

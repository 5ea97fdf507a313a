"""The reduced reproduction (`make reproduce-quick`): the leave-one-out experiments of both cases and
the baselines run end to end and write the documented results.json; the other experiments' report
formatting is checked on their documented keys. This checks the harness, not the paper's numbers;
`make reproduce-quick` runs every experiment (about 1.5 min here). The tests that run experiments
are marked ``experiment``: ``make test-experiments`` runs them, ``make test`` the rest."""

import json
import math

import pytest

from experiments import reproduce

SUBSET = ("case1_fixed", "case2_updated", "case1_fixed_ekfac", "identity_baseline", "loss_baseline")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, tfds_dir):
    out = tmp_path_factory.mktemp("repro")
    reproduce.main(["--quick", "--out", str(out), "--data-dir", tfds_dir, "--no-progress", "--only", ",".join(SUBSET)])
    return out, json.load(open(out / "results.json"))


@pytest.mark.experiment
def test_loo_experiments_report_their_keys(quick_results):
    out, res = quick_results
    assert set(res) == set(SUBSET)
    for name in SUBSET:
        r = res[name]
        assert {"pearson", "spearman", "n_examples", "seconds"} <= set(r), name
        assert r["n_examples"] == 8 and -1 <= r["pearson"] <= 1 and not math.isnan(r["pearson"])
        assert (out / f"{name}.png").stat().st_size > 1000
    # the leave-one-out differences are real retraining results, not placeholders
    record = json.load(open(out / "case1_fixed.json"))
    assert len(set(record["actual"])) == 8 and any(abs(a) > 0 for a in record["actual"])
    for case in ("case1_fixed", "case2_updated"):
        solves = res[case]["solves"]
        assert solves["pretrain"]["method"] == "cg_squared" and solves["finetune"]["iterations"] > 0
        assert "lambda_max" in solves["pretrain"]["curvature"]  # diagnostics travel with every result
        floor = res[case]["noise_floor"]  # random removals, retrained by the same protocol
        assert floor["n_random"] == 2 and floor["loo_abs_mean_random"] > 0
        assert floor["random_over_top"] == pytest.approx(floor["loo_abs_mean_random"] / floor["loo_abs_mean_top"])
    # EK-FAC on the same leave-one-out examples: the conv embedding and dense heads all get Kronecker blocks
    ek = res["case1_fixed_ekfac"]
    assert ek["solves"]["pretrain"]["method"] == "ekfac" and ek["solves"]["pretrain"]["diagonal_variables"] == []
    assert set(ek["solves"]["pretrain"]["kronecker_blocks"]) == {"conv1", "conv2", "fc", "logits"}
    assert ek["cg_pearson_same_examples"] == pytest.approx(res["case1_fixed"]["pearson"])
    assert (out / "report.md").read_text().count("| `") == len(reproduce.EXPERIMENTS)  # "not run" rows too


@pytest.mark.experiment
def test_rerun_of_one_experiment_reuses_the_loo_cache(quick_results, tfds_dir):
    out, res = quick_results
    before = json.load(open(out / "loo_cache.json"))
    reproduce.main(["--quick", "--out", str(out), "--only", "case1_fixed", "--no-progress", "--data-dir", tfds_dir])
    again = json.load(open(out / "results.json"))
    assert again["case1_fixed"]["pearson"] == pytest.approx(res["case1_fixed"]["pearson"])
    assert json.load(open(out / "loo_cache.json")) == before  # nothing new had to be computed
    assert set(again) == set(SUBSET)  # the other experiments' results are kept


def test_report_rows_of_every_experiment(tmp_path):
    """Each experiment's documented keys format into its report row."""
    fake = {
        "case1_fixed": {"pearson": 0.8, "spearman": 0.7, "n_examples": 100, "seconds": 1.0},
        "cleansing": {"acc_original": 0.97, "acc_original_std": 0.01, "acc_drop_top": 0.98, "acc_drop_top_std": 0.01,
                      "acc_drop_random": 0.96, "acc_drop_random_std": 0.02, "loss_original": 0.09,
                      "loss_drop_top": 0.08, "loss_drop_random": 0.1, "n_seeds": 5},
        "task_similarity": {"mean_abs_same_task": 0.1, "mean_abs_different_task": 0.2},
        "finetune_size": {"mean_abs_n": 0.3, "n_finetune_n": 200, "mean_abs_3n": 0.1, "n_finetune_3n": 600},
        "figure3": {"shown": 6, "n_misclassified": 9},
        "cross_task": {"error": "ValueError: boom"},
        "text_multistage": {**{m: {"pearson": p} for m, p in (("cg", 0.5), ("ekfac", 0.4), ("identity", 0.1))},
                            "n_examples": 30, "finetune_test_accuracy": 0.9},
        "lds": {"methods": {"case1_cg": {"lds": 0.45, "ci95": [0.3, 0.6], "noise_floor": {"seed_to_seed_lds": 0.7}},
                            "case1_identity": {"lds": 0.1, "ci95": [0.0, 0.2]}},
                "num_subsets": 40, "num_seeds": 2, "subset_fraction": 0.5},
    }
    table = reproduce.write_report(fake, reproduce.ReproConfig(), str(tmp_path), 12.0)
    fake["case1_fixed"]["noise_floor"] = {"random_over_top": 0.12}
    table = reproduce.write_report(fake, reproduce.ReproConfig(), str(tmp_path), 12.0)
    assert "r = 0.80 (Spearman 0.70, n = 100); noise floor: random removals move the test loss 0.12× as much" in table and "97.00 ± 1.00 % → 98.00 ± 1.00 %" in table
    assert "0.1 (same task) vs 0.2" in table and "0.3 (n = 200) vs 0.1 (3n = 600)" in table
    assert "cg r = 0.50, ekfac r = 0.40, identity r = 0.10 (n = 30; finetune test accuracy 90 %)" in table
    assert "from scratch: case1_cg 0.45 [0.30, 0.60]; case1_identity 0.10 [0.00, 0.20] (noise floor: " \
        "seed-to-seed LDS 0.70) (40 subsets × 2 seeds, subset fraction 0.5, `lds.png`)" in table
    assert "FAILED: ValueError: boom" in table and "not run" in table  # case2_updated etc. absent


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

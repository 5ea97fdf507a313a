"""The embedded text corpus and the reduced PRESENCE text experiment (harness check, not numbers)."""

import json

import numpy as np
import pytest

from experiments import presence_text as presence_experiment
from model_zoo import text


def test_corpus_is_real_deterministic_english():
    prose, code = text.load_corpus()
    again, _ = text.load_corpus()
    assert prose == again and len(prose) > 1000
    joined = " ".join(prose)
    assert len(joined) > 150_000 and " the " in joined
    assert "def " in code and "return" in code
    w = text.windows(joined, 65)[3]
    j = text.jumble(w, np.random.default_rng(0))
    # the jumbled window: the same words (so the same characters), another order
    assert len(j) == len(w) == 65 and j != w
    assert sorted(j.split(" ")) == sorted(w.split(" ")) and j.split(" ") != w.split(" ")
    ids = text.encode([w])
    assert ids.shape == (1, 65) and ids.min() >= 1 and ids.max() < text.VOCAB_SIZE
    x, y = text.lm_pairs(ids)
    np.testing.assert_array_equal(x[0, 1:], y[0, :-1])
    model = text.build_lm()
    assert model(x).shape == (1, 64, text.VOCAB_SIZE)


@pytest.mark.experiment
def test_quick_experiment_writes_documented_keys(tmp_path):
    json.dump({"lm_grid": [{"method": "uniform"}], "chosen_default": "x"}, open(tmp_path / "results.json", "w"))
    presence_experiment.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    r = json.load(open(tmp_path / "results.json"))
    assert r["lm_grid"] == [{"method": "uniform"}] and r["chosen_default"] == "x"   # presence_lm's keys stay
    for key in ("mean_si_clean", "mean_si_jumbled", "mean_si_out_of_domain"):
        assert r[key] > 0
    for v in presence_experiment.VARIANTS:
        assert np.isfinite(r[v]["loss_mean"]) and "loss_std" in r[v]
    f = r["sequential_filter"]
    assert f["kept"] + f["dropped"] == f["pool"]
    assert r["presence_sequential"]["n_train"] == f["kept"]
    assert (tmp_path / "si_distribution.png").stat().st_size > 1000
    assert (tmp_path / "variants.png").stat().st_size > 1000


@pytest.mark.experiment
def test_lm_grid_quick_writes_documented_keys_and_resumes(tmp_path):
    """``presence_lm --quick``: the data (noise of each kind where it says, disjoint held-out and
    downstream streams), the documented ``lm_grid`` rows next to the earlier keys, and a rerun that
    trains nothing (every run cached)."""
    from experiments import presence_lm
    cfg = presence_lm.LMConfig.quick_config()
    corpus = presence_lm.corpus_for(cfg)
    clean, _ = corpus.pool("none", 0.0)
    for kind in presence_lm.NOISE_KINDS:
        w, is_noise = corpus.pool(kind, 0.3)
        assert is_noise.sum() == round(0.3 * cfg.n_train) and (w[~is_noise] == clean[~is_noise]).all()
        assert not (w[is_noise] == clean[is_noise]).all(axis=1).any()
        if kind == "jumbled":  # same tokens, another order
            assert (np.sort(w[is_noise], axis=1) == np.sort(clean[is_noise], axis=1)).all()
    xtr, ytr, xte, yte = corpus.downstream()
    assert xtr.shape[1] == xte.shape[1] == cfg.seq_len and len(xtr) == len(ytr) and len(xte) == len(yte)
    assert set(ytr) == set(yte) == set(range(len(corpus.domains))) == set(range(6))
    assert not {w.tobytes() for w in xtr} & {w.tobytes() for w in xte}   # disjoint paragraphs
    json.dump({"mean_si_clean": 1.0}, open(tmp_path / "results.json", "w"))   # the text experiment's keys stay
    presence_lm.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    r = json.load(open(tmp_path / "results.json"))
    assert r["mean_si_clean"] == 1.0 and r["chosen_default"]
    ref = r["lm_downstream_reference"]
    assert 0 < ref["majority_class_accuracy"] < 0.5 and 0 <= ref["random_init_accuracy_mean"] <= 1
    (diag,) = r["lm_weight_diagnostics"]   # the weights of a traced run: a distribution over the batch
    assert 1 <= diag["effective_microbatches_mean"] <= cfg.num_microbatches
    assert diag["weight_per_noisy_window"] > 0 and diag["weight_per_clean_window"] > 0
    keys = {"noise_kind", "noise_fraction", "method", "schedule", "heldout_loss_mean", "heldout_loss_std",
            "downstream_accuracy_mean", "downstream_accuracy_std", "n_seeds"}
    assert len(r["lm_grid"]) == 1 + 1 + 1 and all(keys <= set(row) for row in r["lm_grid"])
    assert all(np.isfinite(row["heldout_loss_mean"]) and 0 <= row["downstream_accuracy_mean"] <= 1
               for row in r["lm_grid"])
    seq = [row for row in r["lm_grid"] if row["method"] == "presence_sequential"]
    assert all(0 <= row["noise_dropped"] <= row["noise_in_pool"] for row in seq)
    runs = sorted((tmp_path / "lm_runs").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    presence_lm.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "lm_runs").glob("*.json"))] == stamps
    assert (tmp_path / "lm_grid.png").stat().st_size > 1000


def test_source_batched_order_keeps_each_microbatch_to_one_source():
    """``batching="by_source"``: every microbatch is all clean or all noise, sources appear in
    proportion, and each epoch visits a window at most once."""
    from experiments import presence_lm
    is_noise = np.zeros(200, bool)
    is_noise[np.random.default_rng(0).choice(200, 60, replace=False)] = True
    order = presence_lm.source_batched_order(is_noise, steps=30, batch_size=32, num_microbatches=4, seed=1)
    assert order.shape == (30 * 32,)
    micro = is_noise[order].reshape(-1, 8)
    assert (micro.all(axis=1) | ~micro.any(axis=1)).all()
    assert 0.2 < micro.all(axis=1).mean() < 0.4
    first_epoch = order[:(140 // 8 + 60 // 8) * 8]
    assert len(set(first_epoch.tolist())) == len(first_epoch)

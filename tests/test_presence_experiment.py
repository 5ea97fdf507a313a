"""The embedded text corpus and the reduced PRESENCE text experiment (harness check, not numbers)."""

import json

import numpy as np

from experiments import presence_text as presence_experiment, text


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


def test_quick_experiment_writes_documented_keys(tmp_path):
    presence_experiment.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    r = json.load(open(tmp_path / "results.json"))
    for key in ("mean_si_clean", "mean_si_jumbled", "mean_si_out_of_domain"):
        assert r[key] > 0
    for v in presence_experiment.VARIANTS:
        assert np.isfinite(r[v]["loss_mean"]) and "loss_std" in r[v]
    f = r["sequential_filter"]
    assert f["kept"] + f["dropped"] == f["pool"]
    assert r["presence_sequential"]["n_train"] == f["kept"]
    assert (tmp_path / "si_distribution.png").stat().st_size > 1000
    assert (tmp_path / "variants.png").stat().st_size > 1000

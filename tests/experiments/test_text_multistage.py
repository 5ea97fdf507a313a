"""The text multi-stage experiment (``experiments.text_multistage``) end to end at a tiny size:
tasks built from the corpus, a transformer through both stages, CG / EK-FAC / identity scores
correlated with real leave-one-out retraining. Checks the harness, not the numbers."""

import math

import numpy as np
import pytest

from experiments import text_multistage as tm


def test_tasks_are_disjoint_and_labelled():
    cfg = tm.TextConfig(n_pretrain=60, n_finetune=30, n_test=20)
    (xp, yp), (xf, yf), (xt, yt) = tm.make_tasks(cfg)
    assert xp.shape == (60, cfg.seq_len) and xf.shape == (30, cfg.seq_len) and xt.shape == (20, cfg.seq_len)
    assert yp.shape == xp.shape and np.array_equal(xp[:, 1:], yp[:, :-1])  # next-character targets
    assert set(yf) == {0, 1} and set(yt) <= {0, 1}
    assert xp.min() >= 0 and max(xp.max(), xf.max(), xt.max()) < len(tm.text.VOCAB)
    pre_rows = {r.tobytes() for r in xp}
    assert not any(r.tobytes() in pre_rows for r in np.concatenate([xf, xt]))
    code = set(tm.text.encode(["=()_:"])[0] - 1)  # code windows carry code punctuation far more often
    frac = lambda x: np.mean([len(code & set(r)) > 0 for r in x])  # noqa: E731
    assert frac(xf[yf == 1]) > frac(xf[yf == 0])


@pytest.mark.experiment
def test_run_reports_every_method_against_leave_one_out():
    cfg = tm.TextConfig(n_pretrain=60, n_finetune=30, n_test=20, init_steps=60, polish_steps=10, loo_steps=10, n_loo=4,
                        cg_iters=20)
    r = tm.run(cfg, progress=False)
    for m in ("cg", "ekfac", "identity"):
        assert {"pearson", "spearman", "n_examples", "seconds"} <= set(r[m]) and r[m]["n_examples"] == 4
        assert -1 <= r[m]["pearson"] <= 1 and not math.isnan(r[m]["pearson"])
    assert r["ekfac"]["solves"]["pretrain"]["method"] == "ekfac"
    blocks = set(r["ekfac"]["solves"]["pretrain"]["kronecker_blocks"])
    assert {"tok_emb", "query", "key", "value", "attention_output", "ffn", "pretrain_head"} <= blocks
    assert r["ekfac"]["solves"]["pretrain"]["diagonal_variables"] == ["norm/beta", "norm/gamma"]
    assert len(set(r["actual"])) == 4  # real retraining differences
    # the continuation step is 1/λ_max of each stage's Hessian (stable gradient descent)
    lam = r["cg"]["solves"]["pretrain"]["curvature"]["lambda_max"]
    assert abs(r["pretrain_step"] * lam - 1) < 0.05

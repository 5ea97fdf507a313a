"""The leave-one-out harness: weighted deterministic training, exact LOO on a convex two-stage
problem, caching, and the correlation report."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence.evaluation import loo
from tf_influence.evaluation.retraining import WeightedTrainer, restore, snapshot
from tests import helpers as h
from tests.tf_influence.test_convex_loo import D, TwoStageLinear, logistic_loss


def test_zero_weight_equals_training_without_the_example():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 3, 30)
    a, b = h.mlp(l2=0.01, seed=1), h.mlp(l2=0.01, seed=1)
    for opt in ("sgd", "adam"):
        b.set_weights(a.get_weights())
        start = snapshot(a)
        w = np.ones(30, np.float32)
        w[7] = 0.0
        WeightedTrainer(tfi.Objective(a, h.sce()), x, y, tfi.ParameterGroup.from_model(a, "a"), opt,
                        0.05).run(40, w)
        keep = np.arange(30) != 7
        WeightedTrainer(tfi.Objective(b, h.sce()), x[keep], y[keep],
                        tfi.ParameterGroup.from_model(b, "b"), opt, 0.05).run(40)
        for va, vb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_allclose(va, vb, rtol=1e-9, atol=1e-12)
        restore(a, start)


def test_minibatch_runs_are_deterministic_and_only_differ_by_the_removed_example():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    m = h.mlp(seed=2)
    start = snapshot(m)
    tr = WeightedTrainer(tfi.Objective(m, h.sce()), x, y, tfi.ParameterGroup.from_model(m, "a"),
                         "adam", 0.01, batch_size=8, seed=5)
    order = tr._order(10)
    assert order.shape == (10, 8) and sorted(order[:5].ravel().tolist()) == list(range(40))
    tr.run(10)
    first = m.get_weights()
    restore(m, start)
    tr.run(10)
    for u, v in zip(first, m.get_weights()):
        np.testing.assert_array_equal(u, v)
    restore(m, start)
    w = np.ones(40, np.float32)
    w[order[9]] = 0.0  # remove examples only seen in the last step...
    seen_before = set(order[:9].ravel().tolist())
    w[[i for i in order[9] if i in seen_before]] = 1.0
    tr.run(9, w)  # ...so the first 9 steps are unchanged
    nine_w = m.get_weights()
    restore(m, start)
    tr.run(9)
    for u, v in zip(nine_w, m.get_weights()):
        np.testing.assert_array_equal(u, v)


@pytest.fixture(scope="module")
def convex():
    ts = TwoStageLinear(m=40, n=30, k=15)
    pre, ft = ts.keras_models()
    return ts, pre, ft


def exact_loo_mean(ts, i):
    """Closed-form LOO with the remaining examples re-averaged (1/(m−1)), as the trainer does."""
    wts = np.ones(ts.m) / (ts.m - 1)
    wts[i] = 0.0
    K = ts.ridge(wts)
    theta = ts.finetune(K[:D], ts.theta)
    return ts.test_loss(K, theta) - ts.test_loss(ts.K, ts.theta)


def test_converge_mode_reproduces_exact_leave_one_out(convex):
    ts, pre, ft = convex
    mse = lambda y, p: 0.5 * tf.reduce_sum(tf.square(p - y), axis=-1)  # noqa: E731
    protocol = loo.RetrainProtocol(case="fixed", mode="converge", pretrain_lr=0.3, finetune_lr=1.0, optimizer="sgd",
                                   grad_tol=1e-10, check_every=200, max_steps=20000)
    rt = loo.TwoStageRetrainer(pre, ft, mse, ["embedding"], (ts.xp, ts.sp), ts.tp, ts.xf, ts.yf[:, None], ts.xt,
                               ts.yt[:, None], protocol, finetune_loss=logistic_loss)
    before = snapshot(pre)
    assert rt.reference() == pytest.approx(ts.test_loss(ts.K, ts.theta), abs=1e-8)
    for i in (0, 3, 17):
        assert rt.loss_difference(i) == pytest.approx(exact_loo_mean(ts, i), rel=1e-4, abs=1e-9)
    for u, v in zip(before, snapshot(pre)):  # the starting weights are restored after every run
        np.testing.assert_array_equal(u, v)


def test_cache_skips_finished_runs_and_keys_on_the_protocol(convex, tmp_path):
    ts, pre, ft = convex
    mse = lambda y, p: 0.5 * tf.reduce_sum(tf.square(p - y), axis=-1)  # noqa: E731
    args = (pre, ft, mse, ["embedding"], (ts.xp, ts.sp), ts.tp, ts.xf, ts.yf[:, None], ts.xt, ts.yt[:, None])
    cache = loo.LOOCache(str(tmp_path / "cache.json"))
    rt = loo.TwoStageRetrainer(*args, loo.RetrainProtocol(pretrain_steps=20, finetune_steps=20, pretrain_lr=0.1,
                                                          finetune_lr=0.1), finetune_loss=logistic_loss)
    first = rt.leave_one_out([1, 2, 3], cache, progress=False)
    runs = rt.runs
    again = loo.TwoStageRetrainer(*args, loo.RetrainProtocol(pretrain_steps=20, finetune_steps=20, pretrain_lr=0.1,
                                                             finetune_lr=0.1), finetune_loss=logistic_loss)
    np.testing.assert_array_equal(again.leave_one_out([1, 2, 3], loo.LOOCache(str(tmp_path / "cache.json")),
                                                      progress=False), first)
    assert again.runs == 0 and runs == 4  # 3 removals + the reference
    other = loo.TwoStageRetrainer(*args, loo.RetrainProtocol(pretrain_steps=21, finetune_steps=20, pretrain_lr=0.1,
                                                             finetune_lr=0.1), finetune_loss=logistic_loss)
    assert other.key != rt.key
    other.leave_one_out([1], cache, progress=False)
    assert other.runs == 2


def test_correlation_report(tmp_path):
    rng = np.random.default_rng(0)
    pred = rng.normal(size=50)
    actual = 2 * pred + 0.1 * rng.normal(size=50)
    out = loo.correlation_report(pred, actual, str(tmp_path), "demo", "demo")
    assert out["pearson"] > 0.99 and out["n_examples"] == 50
    rec = json.load(open(tmp_path / "demo.json"))
    assert rec["pearson"] == out["pearson"] and len(rec["actual"]) == 50
    assert os.path.getsize(tmp_path / "demo.png") > 1000
    assert list(loo.top_by_magnitude([0.1, -3, 2, 0], 2)) == [1, 2]


def test_bad_protocols():
    with pytest.raises(ValueError, match="case must be"):
        loo.RetrainProtocol(case="frozen")
    with pytest.raises(ValueError, match="mode must be"):
        loo.RetrainProtocol(mode="forever")

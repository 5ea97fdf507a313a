"""The linear datamodeling score: on L2 logistic regression (convex; every retrain solved exactly by
Newton's method) exact influence reaches a high LDS and a random score none; the statistics equal
scipy's; retrains are cached and an interrupted run resumes."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import tf_influence as tfi
from tf_influence.evaluation import LOOCache, lds as lds_mod

C = 0.05  # L2 coefficient: loss = mean BCE + C‖w‖² (kernel and bias)


def _data(n=160, n_test=24, d=4, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n + n_test, d))
    y = (rng.random(n + n_test) < 1 / (1 + np.exp(-(x @ w)))).astype(np.float64)
    return x[:n], y[:n], x[n:], y[n:]


def _newton(x, y, iters=30):
    """argmin_θ mean_i BCE(x_i θ) + C‖θ‖² with θ = (w, b)."""
    X = np.hstack([x, np.ones((len(x), 1))])
    th = np.zeros(X.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ th))
        g = X.T @ (p - y) / len(y) + 2 * C * th
        H = (X * (p * (1 - p))[:, None]).T @ X / len(y) + 2 * C * np.eye(len(th))
        th -= np.linalg.solve(H, g)
    return th


def _test_losses(th, x, y):
    z = np.hstack([x, np.ones((len(x), 1))]) @ th
    return np.logaddexp(0, z) - y * z


@pytest.fixture(scope="module")
def convex():
    x, y, xt, yt = _data()
    th = _newton(x, y)
    reg = keras.regularizers.L2(C)
    model = keras.Sequential([keras.Input((x.shape[1],), dtype="float64"),
                              keras.layers.Dense(1, dtype="float64", kernel_regularizer=reg, bias_regularizer=reg)])
    model.layers[0].kernel.assign(th[:-1, None])
    model.layers[0].bias.assign(th[-1:])
    obj = tfi.Objective(model, keras.losses.BinaryCrossentropy(from_logits=True))
    ds = lambda a, b: tf.data.Dataset.from_tensor_slices((a, b[:, None])).batch(64)  # noqa: E731
    res = tfi.single_stage_influence(obj, ds(x, y), ds(xt, yt), solver=tfi.SolverConfig("dense"),
                                     test_target="each")
    calls = []

    def retrain(mask, seed):
        calls.append(1)
        return _test_losses(_newton(x[mask], y[mask]), xt, yt)
    return res.scores, retrain, calls, len(x)


def test_exact_influence_has_a_high_lds_and_a_random_score_none(convex, tmp_path):
    scores, retrain, calls, n = convex
    assert scores.shape == (n, 24)
    cache = LOOCache(str(tmp_path / "cache.json"))
    exact = lds_mod.evaluate_lds(retrain, scores, num_subsets=60, subset_fraction=0.5, cache=cache, key="logreg",
                                  progress=False)
    assert exact.mean >= 0.8 and exact.ci_low < exact.mean < exact.ci_high
    assert exact.summary()["num_subsets"] == 60 and exact.summary()["subset_fraction"] == 0.5
    random = lds_mod.evaluate_lds(retrain, np.random.default_rng(5).normal(size=scores.shape), num_subsets=60, subset_fraction=0.5,
                         cache=cache, key="logreg", progress=False)
    assert abs(random.mean) <= 0.1
    # the opposite sign convention gives the opposite LDS (the score's meaning matters, documented)
    assert lds_mod.evaluate_lds(retrain, -scores, num_subsets=60, cache=cache, key="logreg", progress=False).mean <= -0.8
    assert len(calls) == 60  # the random and negated scores reused every cached retrain
    print(f"LDS exact {exact.mean:.3f} [{exact.ci_low:.3f}, {exact.ci_high:.3f}], random {random.mean:.3f}")
    # one summed score vector against the summed test loss
    total = lds_mod.evaluate_lds(retrain, scores.sum(axis=1), num_subsets=60, cache=cache, key="logreg", progress=False)
    assert total.per_test.shape == (1,) and total.mean > 0.8


def test_statistics_equal_scipy():
    rng = np.random.default_rng(0)
    scores, masks = rng.normal(size=(30, 5)), lds_mod.draw_subsets(30, 20, 0.3, seed=1)
    assert (masks.sum(axis=1) == 9).all()
    measured = masks.astype(float) @ scores + rng.normal(size=(20, 5))
    r = lds_mod.linear_datamodeling_score(scores, masks, measured)
    ref = [stats.spearmanr(masks.astype(float) @ scores[:, t], measured[:, t])[0] for t in range(5)]
    np.testing.assert_allclose(r.per_test, ref)
    lo, hi = stats.t.interval(0.95, 4, loc=np.mean(ref), scale=stats.sem(ref))
    assert (r.mean, r.ci_low, r.ci_high) == pytest.approx((np.mean(ref), lo, hi))
    with pytest.raises(ValueError, match="masks have shape"):
        lds_mod.linear_datamodeling_score(scores[:10], masks, measured)
    with pytest.raises(ValueError, match="NaN"):
        lds_mod.linear_datamodeling_score(np.full_like(scores, np.nan), masks, measured)
    with pytest.raises(ValueError, match="subset_fraction"):
        lds_mod.draw_subsets(30, 20, 1.5)


def test_an_interrupted_run_resumes_from_the_cache(tmp_path):
    masks = lds_mod.draw_subsets(12, 6, 0.5, seed=0)
    done = []

    def flaky(mask, seed):
        if len(done) == 4:
            raise KeyboardInterrupt
        done.append((mask.sum(), seed))
        return np.array([mask[:3].sum() + seed, 1.0])
    path = str(tmp_path / "c.json")
    with pytest.raises(KeyboardInterrupt):
        lds_mod.measure_subsets(flaky, masks, num_seeds=2, cache=LOOCache(path), key="k", progress=False)
    calls = []
    out = lds_mod.measure_subsets(lambda m, s: calls.append(1) or np.array([m[:3].sum() + s, 1.0]), masks,
                                  num_seeds=2, cache=LOOCache(path), key="k", progress=False)
    assert len(calls) == 12 - 4 and out.shape == (6, 2)  # the 4 retrains before the interruption are reused
    np.testing.assert_allclose(out[:, 0], masks[:, :3].sum(axis=1) + 0.5)  # mean over seeds 0 and 1
    calls.clear()
    again = lds_mod.measure_subsets(lambda m, s: calls.append(1), masks, num_seeds=2, cache=LOOCache(path),
                                    key="k", progress=False)
    assert calls == [] and np.array_equal(again, out)


def _logreg_retrain(mask, seed):
    """Module-level (picklable) retrain for the Beam test: Newton on the kept examples; ``seed``
    perturbs the measurement so seeds are distinguishable."""
    x, y, xt, yt = _data()
    return _test_losses(_newton(x[mask], y[mask]), xt[:5], yt[:5]) + 1e-3 * seed


def test_retrains_as_a_beam_job_equal_the_in_process_ones(tmp_path):
    """Each (subset, seed) is one element of a DirectRunner job with 2 worker processes; the workers'
    results land in the cache, and a rerun (in process) retrains nothing."""
    masks = lds_mod.draw_subsets(160, 5, 0.5, seed=3)
    cache = LOOCache(str(tmp_path / "beam.json"))
    beam = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    got = lds_mod.measure_subsets(_logreg_retrain, masks, num_seeds=2, cache=cache, key="b", progress=False,
                                  beam_options=beam, per_seed=True)
    want = np.stack([[_logreg_retrain(m, s) for m in masks] for s in range(2)])
    assert got.shape == (2, 5, 5)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    again = lds_mod.measure_subsets(lambda m, s: pytest.fail("retrained a cached subset"), masks, num_seeds=2,
                                    cache=LOOCache(cache.path), key="b", progress=False)
    np.testing.assert_allclose(again, want.mean(axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="needs a cache"):
        lds_mod.measure_subsets(_logreg_retrain, masks, beam_options=beam, progress=False)


def test_seed_noise_equals_scipy():
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(12, 4))
    m = np.stack([signal + 0.5 * rng.normal(size=signal.shape) for _ in range(3)])
    out = lds_mod.seed_noise(m)
    ref = [stats.spearmanr(m[0, :, t], m[1, :, t])[0] for t in range(4)]
    assert out["seed_to_seed_lds"] == pytest.approx(np.mean(ref)) and out["num_seeds"] == 3
    ratio = m.std(axis=0, ddof=1).mean(axis=0) / m.mean(axis=0).std(axis=0, ddof=1)
    assert out["seed_std_over_subset_std"] == pytest.approx(ratio.mean())
    with pytest.raises(ValueError, match="at least 2 seeds"):
        lds_mod.seed_noise(m[:1])


def test_calibration_picks_the_damping_that_predicts_retraining(convex):
    """Logistic regression (Hessian eigenvalues ≥ 2C = 0.1): an exact solve (damping 0) predicts the
    Newton retrains; a damping far above λ_max turns the scores into the identity baseline."""
    from tf_influence.evaluation import calibrate_damping
    _, retrain, _, n = convex
    x, y, xt, yt = _data()
    reg = keras.regularizers.L2(C)
    model = keras.Sequential([keras.Input((x.shape[1],), dtype="float64"),
                              keras.layers.Dense(1, dtype="float64", kernel_regularizer=reg, bias_regularizer=reg)])
    th = _newton(x, y)
    model.layers[0].kernel.assign(th[:-1, None])
    model.layers[0].bias.assign(th[-1:])
    obj = tfi.Objective(model, keras.losses.BinaryCrossentropy(from_logits=True))
    ds = lambda a, b: tf.data.Dataset.from_tensor_slices((a, b[:, None])).batch(64)  # noqa: E731

    def scores(lam):
        return tfi.single_stage_influence(obj, ds(x, y), ds(xt, yt), solver=tfi.SolverConfig(
            "dense", damping=lam, curvature_iterations=0), test_target="each").scores

    def noisy(mask, seed):  # a second "seed" that perturbs the measurement a little
        return retrain(mask, seed) + 1e-4 * np.random.default_rng(seed).normal(size=len(yt))
    result = calibrate_damping(scores, noisy, n, grid=[0.0, 100.0], num_subsets=12, progress=False)
    by = {r["damping"]: r["lds"] for r in result.rows}
    assert result.best_damping == 0.0 and by[0.0] > 0.8 and by[100.0] < by[0.0]
    assert result.num_retrains == 24 and result.noise_floor["seed_to_seed_lds"] > 0.9
    with pytest.raises(ValueError, match="num_seeds ≥ 2"):
        calibrate_damping(scores, noisy, n, num_seeds=1)


def test_alpha_is_a_deprecated_alias_of_subset_fraction():
    new = lds_mod.draw_subsets(20, 5, subset_fraction=0.3, seed=4)
    with pytest.warns(DeprecationWarning, match="use subset_fraction"):
        old = lds_mod.draw_subsets(20, 5, alpha=0.3, seed=4)
    np.testing.assert_array_equal(new, old)
    assert new.sum(axis=1).tolist() == [6] * 5
    with pytest.raises(TypeError, match="not both"):
        lds_mod.draw_subsets(20, 5, subset_fraction=0.3, alpha=0.3)
    with pytest.raises(ValueError, match="subset_fraction"):
        lds_mod.draw_subsets(20, 5, subset_fraction=1.0)
    scores, measured = np.arange(20.0), new.astype(float) @ np.arange(20.0)
    r = lds_mod.linear_datamodeling_score(scores, new, measured, 0.3)
    assert r.mean == pytest.approx(1.0) and r.subset_fraction == 0.3
    with pytest.warns(DeprecationWarning):
        assert r.alpha == 0.3

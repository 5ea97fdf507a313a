"""PRESENCE: eq. 7–9 against a hand computation, τ behaviour, schedules, callback, Keras fit,
TracIn self-influence and PRESENCE-Sequential."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence import presence, tracin
from tests import helpers as h


def toy(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,))
    hid = keras.layers.Dense(6, activation="tanh", name="first")(inp)
    return keras.Model(inp, keras.layers.Dense(3, name="last")(hid), name="toy")


def data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, n)


def test_weights_equal_hand_computation():
    si = np.array([1.0, 4.0, 2.0, 9.0])
    tau = 0.7
    s = (si - si.mean()) / np.sqrt(si.var() + 1e-6 * si.mean() ** 2)     # ε relative to μ² (default)
    expected = np.exp(tau * s) / np.exp(tau * s).sum()
    np.testing.assert_allclose(presence.presence_weights(tf.constant(si), tau).numpy(), expected, rtol=1e-12)
    s_abs = (si - si.mean()) / np.sqrt(si.var() + 1e-3)                    # the literal absolute ε
    np.testing.assert_allclose(presence.presence_weights(tf.constant(si), tau, eps=1e-3, relative_eps=False).numpy(),
                               np.exp(tau * s_abs) / np.exp(tau * s_abs).sum(), rtol=1e-10)
    assert np.argmax(expected) == 3
    w_neg = presence.presence_weights(tf.constant(si), -1.0).numpy()
    assert np.argmax(w_neg) == 0 and np.argmin(w_neg) == 3
    np.testing.assert_allclose(presence.presence_weights(tf.constant(si), 0.0).numpy(), 0.25)


def test_weights_do_not_depend_on_the_loss_scale():
    """Microbatch SI of a mean token loss can be ~1e-5 with σ ~ 1e-6 (measured on the transformer LM):
    with a literal ε = 1e-6 the weights collapse to uniform whatever τ is; the relative ε keeps
    normalize(c·s) = normalize(s) for every scale c. All-equal scores give uniform weights, not NaN."""
    si = np.array([3.1e-5, 2.6e-5, 3.4e-5, 2.9e-5])
    ref = presence.presence_weights(tf.constant(si / si.mean()), 1.0).numpy()
    for c in (1e-6, 1e-3, 1.0, 1e4):
        np.testing.assert_allclose(presence.presence_weights(tf.constant(si / si.mean() * c), 1.0).numpy(), ref,
                                   rtol=1e-9)
    assert ref.max() / ref.min() > 5
    flat = presence.presence_weights(tf.constant(si), 1.0, relative_eps=False).numpy()
    assert np.abs(flat - 0.25).max() < 2e-3 and ref.max() > 0.4             # the failure the default avoids
    np.testing.assert_allclose(presence.presence_weights(tf.constant([2.0, 2.0, 2.0]), -1.0).numpy(), 1 / 3)
    np.testing.assert_allclose(presence.presence_weights(tf.constant([0.0, 0.0]), 1.0).numpy(), 0.5)


def test_microbatch_gradients_and_si_equal_a_loop_over_microbatches():
    model = toy()
    x, y = data()
    obj = tfi.Objective(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses, grads = presence.microbatch_gradients(obj, x, y, model.trainable_variables, 4)
    K = tfi.group_from_layers(model, ["first"])
    mask = presence.layer_set_mask(model.trainable_variables, K.variables)
    si = presence.self_influence_from_gradients(grads, mask).numpy()
    for i in range(4):
        sl = slice(6 * i, 6 * (i + 1))
        with tf.GradientTape() as tape:
            l = tf.reduce_mean(obj.per_example_losses(x[sl], y[sl]))
        g = tape.gradient(l, [v.value for v in model.trainable_variables])
        for gi, ref in zip(grads, g):
            np.testing.assert_allclose(gi[i].numpy(), ref.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(losses[i].numpy(), l.numpy(), rtol=1e-6)
        ref_si = sum(float(tf.reduce_sum(gg * gg)) for gg, m in zip(g, mask) if m)
        np.testing.assert_allclose(si[i], ref_si, rtol=1e-5)
    np.testing.assert_allclose(tracin.microbatch_self_influence(obj, x, y, ["first"], 4), si, rtol=1e-6)


def one_step(tau, n=4, seed=0):
    model = toy(seed)
    x, y = data()
    pm = presence.PresenceModel(model, num_microbatches=n, si_layers=["first"], tau=tau)
    pm.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in model.trainable_variables]
    pm.fit(x, y, batch_size=24, epochs=1, verbose=0, shuffle=False)
    after = [v.numpy() for v in model.trainable_variables]
    return model, x, y, before, after, pm


def test_update_is_the_weighted_sum_of_microbatch_gradients():
    model, x, y, before, after, pm = one_step(tau=1.5)
    ref = toy(0)
    obj = tfi.Objective(ref, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _, grads = presence.microbatch_gradients(obj, x, y, ref.trainable_variables, 4)
    mask = presence.layer_set_mask(ref.trainable_variables, tfi.group_from_layers(ref, ["first"]).variables)
    si = presence.self_influence_from_gradients(grads, mask).numpy().astype(np.float64)
    s = (si - si.mean()) / np.sqrt(si.var() + 1e-6 * si.mean() ** 2)
    w = np.exp(1.5 * s) / np.exp(1.5 * s).sum()
    np.testing.assert_allclose(pm.presence_last_weights.numpy(), w, rtol=1e-4)
    for b, a, g in zip(before, after, grads):
        np.testing.assert_allclose(a, b - 0.1 * np.tensordot(w, g.numpy(), axes=1), rtol=1e-4, atol=1e-6)


def test_tau_zero_reproduces_the_unweighted_update():
    model, x, y, before, after, _ = one_step(tau=0.0)
    plain = toy(0)
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    plain.fit(x, y, batch_size=24, epochs=1, verbose=0, shuffle=False)
    for a, p in zip(after, plain.get_weights()):
        np.testing.assert_allclose(a, p, rtol=1e-5, atol=1e-7)


def test_positive_tau_upweights_high_si_and_negative_downweights():
    for tau in (1.0, -1.0):
        _, _, _, _, _, pm = one_step(tau=tau)
        w, si = pm.presence_last_weights.numpy(), pm.presence_last_si.numpy()
        hi, lo = np.argmax(si), np.argmin(si)
        assert (w[hi] > 0.25 > w[lo]) if tau > 0 else (w[hi] < 0.25 < w[lo])


def test_schedules():
    s = presence.two_stage(switch_step=10, tau1=1.0, tau2=-2.0)
    assert [s(1), s(10), s(11)] == [1.0, 1.0, -2.0]
    assert presence.direct()(5) == 1.0 and presence.inverse()(5) == -1.0
    idr = presence.inverse_then_direct(3)
    assert [idr(3), idr(4)] == [-1.0, 1.0]


def test_callback_switches_at_I_and_logs_what_it_claims(tmp_path):
    model = toy()
    x, y = data(48)
    pm = presence.PresenceModel(model, num_microbatches=4, si_layers=["first"])
    pm.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    cb = presence.PresenceCallback(presence.two_stage(switch_step=3), log_dir=str(tmp_path / "tb"))
    hist = pm.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    assert [r["step"] for r in cb.records] == [1, 2, 3, 4, 5, 6]
    assert [r["tau"] for r in cb.records] == [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
    for r in cb.records:
        assert len(r["weights"]) == 4 and abs(sum(r["weights"]) - 1) < 1e-5
        np.testing.assert_allclose(r["weights"], presence.presence_weights(tf.constant(r["si"]), r["tau"]).numpy(),
                                   rtol=1e-4)
    assert hist.history["presence_tau"] == [-1.0]
    assert {"si_mean", "si_std", "weight_max", "weight_min", "weight_entropy", "loss"} <= set(hist.history)
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())


def test_bad_input():
    model = toy()
    x, y = data(24)
    pm = presence.PresenceModel(model, num_microbatches=5, si_layers=["first"])
    pm.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="not divisible by num_microbatches=5"):
        pm.fit(x, y, batch_size=24, epochs=1, verbose=0)
    with pytest.raises(tfi.ParameterGroupError, match="layer set K is empty"):
        presence.PresenceModel(model, num_microbatches=4, si_layers=[])
    with pytest.raises(tfi.ParameterGroupError, match="no layer named 'encoder'"):
        presence.PresenceModel(model, num_microbatches=4, si_layers=["encoder"])
    bad = x.copy()
    bad[3, 0] = np.nan
    pm2 = presence.PresenceModel(model, num_microbatches=4, si_layers=["first"])
    pm2.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN/Inf in microbatch gradients"):
        pm2.fit(bad, y, batch_size=24, epochs=1, verbose=0)
    with pytest.raises(TypeError, match="PresenceModel"):
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, epochs=1, verbose=0, callbacks=[presence.PresenceCallback(presence.direct())])


def test_layer_set_by_object_or_path_frozen_refused_and_save_load_round_trip(tmp_path):
    model = toy()
    x, y = data(16)
    by_obj = presence.PresenceModel(model, num_microbatches=4, si_layers=model.get_layer("first"), tau=0.5)
    assert by_obj.si_layers == ["first"] and [v.path for v in by_obj._k_vars] == [
        v.path for v in model.get_layer("first").trainable_weights]
    model.get_layer("first").trainable = False
    with pytest.raises(tfi.ParameterGroupError, match="frozen variables"):
        presence.PresenceModel(model, num_microbatches=4, si_layers=["first"])
    model.get_layer("first").trainable = True
    by_obj.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    by_obj.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "presence.keras")
    by_obj.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, presence.PresenceModel)
    assert (loaded.num_microbatches, loaded.si_layers, loaded.eps, loaded.relative_eps) == (4, ["first"], by_obj.eps, True)
    assert float(loaded.presence_tau.numpy()) == 0.5 and loaded.memory_budget is None
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), by_obj.predict(x, verbose=0))


def test_a_step_that_cannot_fit_is_refused_before_training():
    """``PresenceModel.fit`` checks one step's plan first: the ``M`` microbatch gradients over the 57 trained
    parameters (twice: results and stacked copy), the weighted gradient, Adam's two slots (none for plain SGD)
    and the batch's forward / backward (each block's input and output, twice, and the widest output three
    times) — counted by hand here. Over ``memory_budget`` it raises naming the plan and its largest item, and
    nothing has trained; the budget survives ``save`` / ``load_model``."""
    from tf_influence.memory import MemoryBudgetError
    model = toy()
    x, y = data(16)
    pm = presence.PresenceModel(model, num_microbatches=4, si_layers=["first"], memory_budget=2000)
    pm.compile(optimizer=keras.optimizers.Adam(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    item = {i.name: i.nbytes for i in pm.memory_plan(tf.data.Dataset.from_tensor_slices((x, y)).batch(8)).items}
    p = 5 * 6 + 6 + 6 * 3 + 3
    assert item == {"microbatch gradients": 2 * 4 * p * 4, "weighted gradient": p * 4, "optimizer slots": 2 * p * 4,
                    "forward / backward of the batch": 8 * ((6 + 6) + (7 + 3)) * 4 * 2 + 3 * 8 * 6 * 4}
    assert {i.name: i.nbytes for i in pm.memory_plan(x, y, batch_size=8).items} == item      # arrays: batch_size
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(MemoryBudgetError, match=r"a PRESENCE step need 4\.5 KB, over the memory budget of 2\.0 KB: "
                                                r"forward / backward of the batch 2\.0 KB.*microbatch gradients 1\.8 KB"
                                                r".*Options: fewer microbatches"):
        pm.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(pm.optimizer.iterations.numpy()) == 0
    for b, a in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    sgd = presence.PresenceModel(toy(), num_microbatches=4, memory_budget="1GB")
    sgd.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    assert "optimizer slots" not in {i.name for i in sgd.memory_plan(x, y, batch_size=8).items}
    sgd.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(sgd.optimizer.iterations.numpy()) == 2
    with pytest.raises(ValueError, match="memory"):
        presence.PresenceModel(toy(), memory_budget="lots")


def test_default_layer_set_is_every_layer_and_decomposes_by_layer():
    """``si_layers=None`` is every layer with parameters; ‖∇l‖² over all of them is the sum of the
    per-layer squared norms (an identity the per-layer scores must satisfy)."""
    model = toy()
    x, y = data(24)
    obj = tfi.Objective(model, keras.losses.SparseCategoricalCrossentropy())
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    every = tracin.self_influence(obj, ds)
    by_layer = sum(tracin.self_influence(obj, ds, [layer.name]) for layer in model.layers if layer.weights)
    np.testing.assert_allclose(every, by_layer, rtol=1e-5)
    one_at_a_time = []                                   # independent of ghost norms: one tape per example
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = obj.loss(y[i:i + 1], model(x[i:i + 1]))
        one_at_a_time.append(sum(float(tf.reduce_sum(g ** 2)) for g in tape.gradient(loss, model.trainable_variables)))
    np.testing.assert_allclose(every, one_at_a_time, rtol=1e-4)
    assert tracin.layer_set(model, None).variables == tuple(tfi.ParameterGroup.from_model(model).variables)
    pm = presence.PresenceModel(model, num_microbatches=4)
    assert pm.si_layers is None and len(pm._k_vars) == len(model.trainable_variables)


def test_tracin_self_influence_and_sequential_filter():
    model = toy()
    x, y = data(30)
    obj = tfi.Objective(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    K = tfi.group_from_layers(model, ["first"])
    ref = (h.one_at_a_time_gradients(obj, x, y, K) ** 2).sum(axis=1)
    si = tracin.self_influence(obj, ds, ["first"])
    np.testing.assert_allclose(si, ref, rtol=1e-5)
    # two checkpoints with learning rates: Σ η_c ‖g_c‖²
    ck2 = [w * 0.5 for w in model.get_weights()]
    before = model.get_weights()
    si2 = tracin.self_influence(obj, ds, ["first"], checkpoints=[model.get_weights(), ck2], learning_rates=[0.1, 0.2])
    model.set_weights(ck2)
    ref2 = (h.one_at_a_time_gradients(obj, x, y, K) ** 2).sum(axis=1)
    model.set_weights(before)
    np.testing.assert_allclose(si2, 0.1 * ref + 0.2 * ref2, rtol=1e-5)
    # influence matrix diagonal = self-influence
    np.testing.assert_allclose(np.diag(tracin.tracin(obj, ds, ds, ["first"])), si, rtol=1e-5)
    res = presence.presence_sequential(obj, ds, ["first"], keep=20)
    assert len(res.kept) == 20 and len(res.dropped) == 10
    assert si[res.kept].max() <= si[res.dropped].min()
    rev = presence.presence_sequential(obj, ds, ["first"], keep=20, reverse=True)
    assert si[rev.kept].min() >= si[rev.dropped].max()
    kept = np.concatenate([b[0].numpy() for b in res.take(ds, "kept", batch_size=8)])
    dropped = np.concatenate([b[0].numpy() for b in res.take(ds, "dropped", batch_size=8)])
    np.testing.assert_array_equal(np.concatenate([kept, dropped])[np.argsort(np.r_[res.kept, res.dropped])], x)
    with pytest.raises(ValueError, match="keep=40"):
        presence.presence_sequential(obj, ds, ["first"], keep=40)
    with pytest.raises(tfi.ParameterGroupError, match="layer set K is empty"):
        tracin.self_influence(obj, ds, [])

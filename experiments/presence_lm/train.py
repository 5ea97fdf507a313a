"""One run: uniform or PRESENCE training of the LM (or PRESENCE-Sequential filtering first), its
held-out loss and downstream accuracy, weight diagnostics, and the run cache."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

from .config import EARLY, SCORER_SEED, LMConfig
from .data import Corpus


def _loss():
    import keras
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def source_batched_order(is_noise, steps: int, batch_size: int, num_microbatches: int, seed: int):
    """Example indices for ``steps`` batches whose microbatches each hold one source only (clean or
    noise): per epoch, each source's shuffled indices are cut into microbatch-sized chunks, the
    chunks are shuffled together and concatenated (a partial chunk is dropped for that epoch)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    mb = batch_size // num_microbatches
    need, out = steps * batch_size, []
    while sum(len(o) for o in out) < need:
        chunks = []
        for src in (np.flatnonzero(~is_noise), np.flatnonzero(is_noise)):
            src = rng.permutation(src)
            chunks += [src[i:i + mb] for i in range(0, len(src) - mb + 1, mb)]
        out += [chunks[i] for i in rng.permutation(len(chunks))]
    return np.concatenate(out)[:need]


def train(cfg: LMConfig, corpus: Corpus, windows, seed: int, schedule: str = "uniform", is_noise=None,
          order=None, records: list | None = None):
    """Train a fresh LM on ``windows`` for ``cfg.steps`` steps; ``schedule``: ``uniform`` or a τ schedule.
    ``cfg.batching``: ``shuffled`` (windows shuffled over the pool) or ``by_source`` (each microbatch
    of ``batch_size / num_microbatches`` windows from one source, clean or noise, per ``is_noise``).
    ``order``: explicit window indices (``steps × batch_size``) instead; ``records``: a list that
    receives the :class:`PresenceCallback` records (τ, SI and weights of every step)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from model_zoo import text
    from tf_influence import presence
    x, y = windows[:, :-1], windows[:, 1:].astype("int64")
    if order is not None:
        ds = tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(cfg.batch_size, drop_remainder=True)
    elif cfg.batching == "by_source":
        noise = np.zeros(len(x), bool) if is_noise is None else np.asarray(is_noise, bool)
        order = source_batched_order(noise, cfg.steps, cfg.batch_size, cfg.num_microbatches, seed)
        ds = tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(cfg.batch_size, drop_remainder=True)
    elif cfg.batching == "shuffled":
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).repeat().batch(
            cfg.batch_size, drop_remainder=True)
    else:
        raise ValueError(f"batching must be 'shuffled' or 'by_source', got {cfg.batching!r}")
    model = text.build_transformer_lm(corpus.vocab_size, cfg.seq_len, cfg.width, cfg.heads, cfg.blocks, cfg.ffn,
                                      seed=seed)
    if schedule == "uniform":
        model.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss=_loss())
        model.fit(ds, steps_per_epoch=cfg.steps, epochs=1, verbose=0, shuffle=False)
        return model
    sched = {"two_stage": lambda: presence.two_stage(int(cfg.switch * cfg.steps)),
             "negative": lambda: presence.inverse(1.0), "positive": lambda: presence.direct(1.0),
             "zero": lambda: presence.ConstantSchedule(0.0)}[schedule]()
    pm = presence.PresenceModel(model, num_microbatches=cfg.num_microbatches, si_layers=list(cfg.si_layers),
                                relative_eps=cfg.relative_eps)
    pm.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss=_loss())
    cb = presence.PresenceCallback(sched, keep_weights=records is not None)
    pm.fit(ds, steps_per_epoch=cfg.steps, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    if records is not None:
        records.extend(cb.records)
    return model


def weight_diagnostics(cfg: LMConfig, corpus: Corpus, kind: str, frac: float, schedule: str, seed: int = 0) -> dict:
    """Where do the microbatch weights go? One run with a known window order (``cfg.batching``;
    ``shuffled`` = a seeded permutation per epoch): the mean weight per noisy and per clean window
    (each window gets its microbatch's weight / microbatch size, so uniform = 1 / batch size), the
    correlation between a microbatch's weight and its number of noisy windows, and the effective
    number of microbatches ``1 / Σ w²`` (out of ``num_microbatches``)."""
    import numpy as np
    windows, is_noise = corpus.pool(kind, frac)
    if cfg.batching == "by_source":
        order = source_batched_order(is_noise, cfg.steps, cfg.batch_size, cfg.num_microbatches, seed)
    else:
        rng = np.random.default_rng(seed)
        reps = -(-cfg.steps * cfg.batch_size // len(windows))
        order = np.concatenate([rng.permutation(len(windows)) for _ in range(reps)])[:cfg.steps * cfg.batch_size]
    records: list = []
    train(cfg, corpus, windows, seed, schedule, is_noise, order=order, records=records)
    mb = cfg.batch_size // cfg.num_microbatches
    w = np.array([r["weights"] for r in records])                          # [steps, n]
    si = np.array([r["si"] for r in records])
    early = slice(min(EARLY[0], cfg.steps - 1), min(EARLY[1], cfg.steps))
    noisy = is_noise[order].reshape(cfg.steps, cfg.num_microbatches, mb)  # [steps, n, mb]
    per_window = np.repeat(w[:, :, None] / mb, mb, axis=2)
    counts = noisy.sum(axis=2).ravel()
    corr = float(np.corrcoef(w.ravel(), counts)[0, 1]) if counts.std() > 0 else None   # None: no noise
    return {"noise_kind": kind, "noise_fraction": frac, "batching": cfg.batching, "schedule": schedule,
            "num_microbatches": cfg.num_microbatches, "uniform_weight_per_window": 1.0 / cfg.batch_size,
            "weight_per_noisy_window": float(per_window[noisy].mean()) if noisy.any() else None,
            "weight_per_clean_window": float(per_window[~noisy].mean()),
            "corr_weight_noisy_count": corr, "relative_eps": cfg.relative_eps,
            "effective_microbatches_mean": float((1.0 / (w ** 2).sum(axis=1)).mean()),
            # steps 20–120 (where a literal ε = 1e-6 flattened every weight): SI scale and weights
            "early_steps": list(EARLY), "early_si_mean": float(si[early].mean()),
            "early_si_std_within_step": float(si[early].std(axis=1).mean()),
            "early_max_abs_weight_minus_uniform": float(np.abs(w[early] - 1.0 / cfg.num_microbatches).max())}


def evaluate(cfg: LMConfig, corpus: Corpus, model, seed: int = 0) -> dict:
    """Held-out clean loss of a trained LM, then its downstream accuracy (finetunes ``model``'s
    encoder in place: call last)."""
    import numpy as np
    h = corpus.heldout
    logits = model.predict(h[:, :-1], batch_size=256, verbose=0)
    loss = float(np.mean(_loss()(h[:, 1:], logits)))
    return {"heldout_loss": loss, "downstream_accuracy": finetune_accuracy(cfg, corpus, model, seed)}


def finetune_accuracy(cfg: LMConfig, corpus: Corpus, model, seed: int) -> float:
    """Finetune ``model``'s encoder (up to the last block's ``norm<i>b``) with a mean-pooled linear
    head on the downstream training windows; accuracy on the test windows."""
    import keras
    import tensorflow as tf
    xtr, ytr, xte, yte = corpus.downstream()
    encoder = keras.Model(model.input, model.get_layer(f"norm{cfg.blocks - 1}b").output)
    inp = keras.Input((cfg.seq_len,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(encoder(inp))
    head = keras.layers.Dense(len(corpus.domains), kernel_initializer=keras.initializers.GlorotUniform(seed))
    clf = keras.Model(inp, head(pooled))
    clf.compile(keras.optimizers.Adam(cfg.finetune_lr),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    ds = tf.data.Dataset.from_tensor_slices((xtr, ytr)).shuffle(len(xtr), seed=seed).repeat().batch(32)
    clf.fit(ds, steps_per_epoch=cfg.finetune_steps, epochs=1, verbose=0, shuffle=False)  # ds is shuffled
    return float(clf.evaluate(xte, yte, batch_size=256, verbose=0, return_dict=True)["accuracy"])


def sequential_kept(cfg: LMConfig, corpus: Corpus, windows, keep: float, cache_dir: str, setting: str):
    """Indices PRESENCE-Sequential keeps: the ``keep`` fraction with the lowest self-influence
    under a model trained on the pool (scores cached per pool)."""
    import numpy as np
    import tensorflow as tf

    import tf_influence as tfi
    from tf_influence import tracin
    path = os.path.join(cache_dir, f"si-{setting}-{_digest(_training(cfg), 'scorer')}.npy")
    if os.path.exists(path):
        si = np.load(path)
    else:
        scorer = train(cfg, corpus, windows, SCORER_SEED)
        ds = tf.data.Dataset.from_tensor_slices((windows[:, :-1], windows[:, 1:].astype("int64"))).batch(256)
        si = np.asarray(tracin.self_influence(tfi.Objective(scorer, _loss()), ds, list(cfg.si_layers)))
        np.save(path, si)
    n_keep = int(round(keep * len(windows)))
    return np.sort(np.argsort(si, kind="stable")[:n_keep])


def _training(c: LMConfig) -> dict:
    """The fields that change a run's result (not the grid's seeds / fractions / keeps)."""
    out = {k: v for k, v in asdict(c).items()
           if k not in ("seeds", "fractions", "kinds", "schedules", "keeps", "quick", "corner_steps", "corner_seeds")}
    for k, default in _KEY_DEFAULTS.items():   # fields added later stay out of the key at their default,
        if out.get(k) == default:              # so the runs cached before them stay valid
            del out[k]
    return out


_KEY_DEFAULTS = {"batching": "shuffled"}


def _cached(path: str, compute) -> dict:
    """The JSON record at ``path``, or ``compute()`` written there first (the run cache)."""
    if not os.path.exists(path):
        rec = compute()
        with open(path, "w") as fh:
            json.dump(rec, fh)
        return rec
    with open(path) as fh:
        return json.load(fh)


def _digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]

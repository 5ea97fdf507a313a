"""PRESENCE on a token-level transformer language model: where does reweighting help?

    python -m experiments.presence_lm [--quick] [--out reports/presence] [--seeds 3] [--parts main,side,corner]

Model: a causal word-level transformer LM (:func:`model_zoo.text.build_transformer_lm`; one
block, width 64, 2 heads) over a Keras ``TextVectorization`` vocabulary (1,000 words, fitted here
on the embedded English corpus — standard-library docstrings; nothing downloaded). Causal rather
than masked: held-out perplexity is then the model's own objective, exactly comparable across
variants, and PRESENCE's microbatch self-influence is computed from the same loss.

Data: the docstring paragraphs are split (fixed seed) into a pretraining stream (70 %), a
held-out stream (15 %: clean perplexity) and a downstream stream (15 %). The pretraining pool is
``n_train`` windows of ``seq_len + 1`` tokens (stride 8) of which ``noise_fraction`` are replaced
by noise of one kind:

* ``jumbled`` — a clean window with its words permuted (the paper's Figure 1 noise);
* ``code`` — windows of the same modules' source code (out of domain, many unknown words);
* ``duplicates`` — copies of 20 pool windows, repeated (exact duplicates);
* ``none`` — no injected noise.

Measured for every variant, over seeds (mean ± std): **held-out clean loss** (mean token
cross-entropy; perplexity = exp) and a **downstream task**: the pretrained LM's encoder (token
embedding + transformer blocks) with a mean-pooled linear head is finetuned (every weight,
``finetune_steps`` Adam steps) to tell which part of the standard library a window of the
downstream stream documents — six domains (:data:`model_zoo.text.DOMAINS`: text/CLI, network,
files, concurrency, language, numbers/time) — trained on one half of the downstream paragraphs,
accuracy on the other half. The same finetuning from a randomly initialised LM is the reference
(``lm_downstream_reference``): the task measures pretraining only as far as pretrained beats it.
(Two order-based tasks were tried first and dropped: original vs words-permuted windows and
"is the second half the continuation of the first" stayed at chance even for the uniformly
pretrained LM, finetuned or probed, so they could not rank variants.)

Variants (same number of optimizer steps each): ``uniform`` (plain ``fit``), ``presence`` with a τ
schedule — ``two_stage`` (the paper: τ = +1 for the first ``switch`` of the steps, then −1),
``negative`` (τ = −1 throughout: down-weight high self-influence), ``positive`` (τ = +1), and
the control ``zero`` (τ = 0: the reweighted training step with uniform weights) —
``num_microbatches`` microbatches, layer set K = ``si_layers``; and ``presence_sequential``
(drop the highest self-influence windows of the pool, scored by a model trained on the pool, keep
``keep`` of them, then uniform training). A side grid on 30 % jumbled noise varies the switch
point, the microbatch count and K, and trains on source-clustered microbatches (``batching =
"by_source"``: each microbatch all clean or all noise; 30 % jumbled and code). The corner
(:data:`CORNER`) trains ``corner_steps`` steps with ``corner_seeds``. :func:`weight_diagnostics`
traces where the microbatch weights go in the :data:`DIAGNOSED` settings.

Every run is cached (``<out>/lm_runs/<key>.json``): an interrupted command resumes, and
``--parts main,side,corner`` runs a subset into the cache (e.g. two processes). Writes
``lm_grid`` (rows of ``noise_kind``, ``noise_fraction``, ``method``, ``schedule``,
``heldout_loss_mean/std``, ``downstream_accuracy_mean/std``, ``n_seeds``, …), ``lm_side_grid``,
``lm_corner``, ``lm_weight_diagnostics``, ``lm_downstream_reference``, ``lm_config`` and
``chosen_default`` into ``<out>/results.json`` (other keys are kept), a
``lm_report.md`` table and ``lm_grid.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace

from tf_influence import console

NOISE_KINDS = ("jumbled", "code", "duplicates")
SCHEDULES = ("two_stage", "negative", "positive")
CORPUS_SEED = 4321
SCORER_SEED = 300


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 1000
    seq_len: int = 32
    width: int = 64
    heads: int = 2
    blocks: int = 1
    ffn: int = 128
    n_train: int = 2000
    batch_size: int = 32
    steps: int = 300
    lr: float = 2e-3
    num_microbatches: int = 4
    switch: float = 0.3
    si_layers: tuple = ("tok_emb",)
    relative_eps: bool = True
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    seeds: tuple = (0, 1, 2)
    fractions: tuple = (0.1, 0.3)
    kinds: tuple = NOISE_KINDS
    schedules: tuple = SCHEDULES
    keeps: tuple = (0.7, 0.9)
    batching: str = "shuffled"
    corner_steps: int = 1000
    corner_seeds: tuple = (0, 1, 2, 3)
    quick: bool = False

    @classmethod
    def quick_config(cls):
        return cls(n_train=128, steps=4, seeds=(0,), fractions=(0.3,), kinds=("jumbled",), schedules=("two_stage",),
                   keeps=(0.7,), finetune_steps=4, quick=True)


# -- data ------------------------------------------------------------------------------------------
_CORPORA: dict = {}


def corpus_for(cfg: LMConfig) -> "Corpus":
    """The :class:`Corpus` of ``cfg`` (built once per process: fitting the vocabulary takes seconds)."""
    key = (cfg.vocab, cfg.seq_len, cfg.n_train)
    if key not in _CORPORA:
        _CORPORA[key] = Corpus(cfg)
    return _CORPORA[key]


class Corpus:
    """Token windows of the embedded corpus (see the module docstring)."""

    def __init__(self, cfg: LMConfig):
        import keras
        import numpy as np
        import tensorflow as tf

        from model_zoo import text
        self.cfg = cfg
        prose, code, domains = text.load_corpus(with_domains=True)
        rng = np.random.default_rng(CORPUS_SEED)
        order = rng.permutation(len(prose))
        n = len(prose)
        parts = {"pretrain": order[:int(0.7 * n)], "heldout": order[int(0.7 * n):int(0.85 * n)],
                 "downstream": order[int(0.85 * n):]}
        self.tv = keras.layers.TextVectorization(max_tokens=cfg.vocab, standardize="lower_and_strip_punctuation",
                                                 split="whitespace", output_mode="int")
        self.tv.adapt(tf.data.Dataset.from_tensor_slices([prose[i] for i in parts["pretrain"]]).batch(256))
        self.vocab_size = len(self.tv.get_vocabulary())
        L = cfg.seq_len + 1

        def stream(idx):
            return np.concatenate([np.asarray(self.tv(prose[i])) for i in idx]).astype(np.int32)

        def wins(ids, stride):
            return np.stack([ids[s:s + L] for s in range(0, len(ids) - L + 1, stride)])
        pre = wins(stream(parts["pretrain"]), 8)
        self.pretrain = pre[rng.permutation(len(pre))]
        self.heldout = wins(stream(parts["heldout"]), 16)
        half = len(parts["downstream"]) // 2
        self.down = {}
        for name, idx in (("train", parts["downstream"][:half]), ("test", parts["downstream"][half:])):
            xs, ys = [], []
            for d in range(len(text.DOMAINS)):   # windows of one domain's paragraphs (never across domains)
                ids = [i for i in idx if domains[i] == d]
                if ids and sum(len(self.tv(prose[i])) for i in ids) >= cfg.seq_len:
                    w = wins(stream(ids), 4)[:, :cfg.seq_len]
                    xs.append(w)
                    ys.append(np.full(len(w), d, np.int64))
            self.down[name] = (np.concatenate(xs), np.concatenate(ys))
        self.domains = tuple(text.DOMAINS)
        code_ids = np.asarray(self.tv(code)).astype(np.int32)
        cw = wins(code_ids, L)
        self.code = cw[rng.permutation(len(cw))]
        if len(self.pretrain) < cfg.n_train:
            raise ValueError(f"the corpus gives {len(self.pretrain)} pretraining windows, n_train={cfg.n_train}")

    @staticmethod
    def jumble(windows, rng):
        out = windows.copy()
        for row in out:
            rng.shuffle(row)
        return out

    def pool(self, kind: str, fraction: float):
        """``(windows [n_train, L], is_noise [n_train])`` for a noise kind and fraction (fixed seed)."""
        import numpy as np
        rng = np.random.default_rng(CORPUS_SEED + 1)
        n = self.cfg.n_train
        base = self.pretrain[:n].copy()
        k = int(round(fraction * n)) if kind != "none" else 0
        noisy = rng.choice(n, size=k, replace=False)
        if kind == "jumbled":
            base[noisy] = self.jumble(base[noisy], rng)
        elif kind == "code":
            base[noisy] = self.code[:k]
        elif kind == "duplicates":
            originals = self.pretrain[n:n + 20]
            base[noisy] = originals[np.arange(k) % len(originals)]
        elif kind != "none":
            raise ValueError(f"unknown noise kind '{kind}'; choose one of {NOISE_KINDS + ('none',)}")
        is_noise = np.zeros(n, bool)
        is_noise[noisy] = True
        return base, is_noise

    def downstream(self):
        """``(x_train, y_train, x_test, y_test)``: ``seq_len``-token windows and their domain index."""
        return (*self.down["train"], *self.down["test"])


# -- one run ------------------------------------------------------------------------------------------
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


# -- the grid -----------------------------------------------------------------------------------------------
#: the informative corner: 30 % jumbled text (the noise self-influence detects) and no noise,
#: trained ``corner_steps`` steps with ``corner_seeds``
CORNER = (("none", 0.0), ("jumbled", 0.3))


def _variants(cfg: LMConfig):
    """``(setting, method, schedule, keep, cfg)`` of the main grid, the side grid and the longer-training
    corner."""
    settings = ([] if cfg.quick else [("none", 0.0)]) + [(k, f) for k in cfg.kinds for f in cfg.fractions]
    main = []
    for kind, frac in settings:
        main.append((kind, frac, "uniform", "uniform", None, cfg))
        for s in cfg.schedules:
            main.append((kind, frac, "presence", s, None, cfg))
        for keep in cfg.keeps:
            main.append((kind, frac, "presence_sequential", f"keep={keep:g}", keep, cfg))
    side = []
    if not cfg.quick:
        # control: the PRESENCE training path with τ = 0 (uniform weights) — separates the effect of
        # the reweighting from any difference of the reweighted step itself
        for kind, frac in (("none", 0.0), ("jumbled", 0.3), ("duplicates", 0.3)):
            side.append((kind, frac, "presence", "zero", None, cfg))
        for sw in (0.1, 0.6):
            side.append(("jumbled", 0.3, "presence", "two_stage", None, replace(cfg, switch=sw)))
        for s in ("two_stage", "negative"):
            for m in (2, 8):
                side.append(("jumbled", 0.3, "presence", s, None, replace(cfg, num_microbatches=m)))
            side.append(("jumbled", 0.3, "presence", s, None, replace(
                cfg, si_layers=("tok_emb", "attention0", "ffn0_in", "ffn0_out", "logits"))))
        # source-clustered microbatches (each microbatch all clean or all noise, as when a loader packs
        # a microbatch from one shard / document): can microbatch SI separate noise when it is concentrated?
        for kind in ("jumbled", "code"):
            by_source = replace(cfg, batching="by_source")
            side.append((kind, 0.3, "uniform", "uniform", None, by_source))
            for s in ("two_stage", "negative"):
                side.append((kind, 0.3, "presence", s, None, by_source))
    corner = []
    if not cfg.quick and cfg.corner_steps:
        long = replace(cfg, steps=cfg.corner_steps, seeds=cfg.corner_seeds)
        for kind, frac in CORNER:
            corner += [(kind, frac, "uniform", "uniform", None, long),
                       (kind, frac, "presence", "two_stage", None, long),
                       (kind, frac, "presence", "negative", None, long),
                       (kind, frac, "presence_sequential", "keep=0.9", 0.9, long)]
    return main, side, corner


PARTS = ("main", "side", "corner")
#: settings whose microbatch weights are traced (τ = −1, seed 0): see :func:`weight_diagnostics`
#: ``(noise, fraction, batching, relative_eps)``; the last one is eq. 7's literal ε, for comparison
DIAGNOSED = (("none", 0.0, "shuffled", True), ("jumbled", 0.3, "shuffled", True), ("jumbled", 0.3, "by_source", True),
             ("code", 0.3, "by_source", True), ("jumbled", 0.3, "shuffled", False))
EARLY = (20, 120)


def run(cfg: LMConfig, out_dir: str, progress: bool = True, parts=PARTS) -> dict:
    """Run (or load from the cache) every run of ``parts`` and, when all parts are asked for, write
    the results; a subset only fills the cache (e.g. to run parts in separate processes)."""
    import numpy as np
    t0 = time.perf_counter()
    cache = os.path.join(out_dir, "lm_runs")
    os.makedirs(cache, exist_ok=True)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    corpus = corpus_for(cfg)
    main, side, corner = _variants(cfg)
    chosen = [v for name, vs in zip(PARTS, (main, side, corner)) if name in parts for v in vs]
    jobs = [(v, seed) for v in chosen for seed in v[-1].seeds]
    it = jobs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc="PRESENCE LM grid", leave=False)
    runs, compute = {}, 0.0
    for (kind, frac, method, schedule, keep, c), seed in it:
        setting = f"{kind}-{frac:g}"

        def one_run(kind=kind, frac=frac, method=method, schedule=schedule, keep=keep, c=c, seed=seed,
                    setting=setting):
            t = time.perf_counter()
            windows, is_noise = corpus.pool(kind, frac)
            extra = {}
            if method == "presence_sequential":
                kept = sequential_kept(c, corpus, windows, keep, cache, setting)
                extra = {"noise_dropped": int(is_noise.sum() - is_noise[kept].sum()), "noise_in_pool": int(is_noise.sum())}
                windows, is_noise = windows[kept], is_noise[kept]
            model = train(c, corpus, windows, seed, "uniform" if method != "presence" else schedule, is_noise)
            return {**evaluate(c, corpus, model, seed), **extra, "seconds": time.perf_counter() - t}
        rec = _cached(os.path.join(cache, f"{_digest(_training(c), setting, method, schedule, seed)}.json"), one_run)
        runs.setdefault((kind, frac, method, schedule, _digest(_training(c))), []).append(rec)
        compute += rec.get("seconds", 0.0)
    if set(parts) != set(PARTS):
        return {"runs": len(jobs), "parts": list(parts)}

    def rows(variants):
        out, seen = [], set()
        for kind, frac, method, schedule, keep, c in variants:
            k = (kind, frac, method, schedule, _digest(_training(c)))
            if k in seen:
                continue
            seen.add(k)
            recs = runs[k]
            loss = np.array([r["heldout_loss"] for r in recs])
            acc = np.array([r["downstream_accuracy"] for r in recs])
            row = {"noise_kind": kind, "noise_fraction": frac, "method": method, "schedule": schedule,
                   "heldout_loss_mean": float(loss.mean()), "heldout_loss_std": float(loss.std(ddof=1)) if len(loss) > 1 else 0.0,
                   "heldout_perplexity_mean": float(np.exp(loss).mean()),
                   "downstream_accuracy_mean": float(acc.mean()),
                   "downstream_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                   "n_seeds": len(recs), "steps": c.steps, "batching": c.batching,
                   "num_microbatches": c.num_microbatches, "switch": c.switch,
                   "si_layers": list(c.si_layers)}
            if method == "presence_sequential":
                row["noise_dropped"] = recs[0]["noise_dropped"]
                row["noise_in_pool"] = recs[0]["noise_in_pool"]
            out.append(row)
        return out
    grid, side_rows, corner_rows = rows(main), rows(side), rows(corner)
    reference = downstream_reference(cfg, corpus, cache, grid)
    diagnostics = []
    for kind, frac, batching, rel in ((("jumbled", 0.3, "shuffled", True),) if cfg.quick else DIAGNOSED):
        c = replace(cfg, batching=batching, relative_eps=rel)
        diagnostics.append(_cached(os.path.join(cache, f"diag-{_digest(_training(c), kind, frac, 'negative', 0)}.json"),
                                   lambda c=c, kind=kind, frac=frac: weight_diagnostics(c, corpus, kind, frac, "negative")))
    default = choose_default(grid + corner_rows)
    res_path = os.path.join(out_dir, "results.json")
    results = {}
    if os.path.exists(res_path):
        with open(res_path) as fh:
            results = json.load(fh)
    results.update(lm_grid=grid, lm_side_grid=side_rows, lm_corner=corner_rows, chosen_default=default,
                   lm_config={**asdict(cfg), "vocabulary": corpus.vocab_size,
                              "pretrain_windows_available": int(len(corpus.pretrain)),
                              "heldout_windows": int(len(corpus.heldout)),
                              "downstream_train": int(len(corpus.down["train"][1])),
                              "downstream_test": int(len(corpus.down["test"][1])),
                              "downstream_domains": list(corpus.domains)},
                   lm_downstream_reference=reference, lm_weight_diagnostics=diagnostics,
                   lm_seconds=time.perf_counter() - t0, lm_compute_seconds=compute, lm_runs=len(jobs))
    with open(res_path, "w") as fh:
        json.dump(results, fh, indent=1)
    _report(grid, side_rows, corner_rows, default, cfg, out_dir, compute, reference, len(jobs), diagnostics)
    _plot(grid, os.path.join(out_dir, "lm_grid.png"), reference)
    return results


def downstream_reference(cfg: LMConfig, corpus: Corpus, cache: str, grid) -> dict:
    """The downstream task's yardsticks: the same finetuning from a randomly initialised LM (per seed,
    cached), the majority class, and the uniformly pretrained LM without noise."""
    import numpy as np

    from model_zoo import text
    def random_init(seed):
        model = text.build_transformer_lm(corpus.vocab_size, cfg.seq_len, cfg.width, cfg.heads, cfg.blocks, cfg.ffn,
                                          seed=seed)
        return {"downstream_accuracy": finetune_accuracy(cfg, corpus, model, seed)}
    accs = np.array([_cached(os.path.join(cache, f"{_digest(_training(cfg), 'random_init', seed)}.json"),
                             lambda seed=seed: random_init(seed))["downstream_accuracy"] for seed in cfg.seeds])
    yte = corpus.down["test"][1]
    out = {"random_init_accuracy_mean": float(accs.mean()),
           "random_init_accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
           "majority_class_accuracy": float(np.bincount(yte).max() / len(yte)), "n_seeds": len(accs)}
    clean = [r for r in grid if r["method"] == "uniform" and r["noise_kind"] == "none"]
    if clean:
        out["uniform_no_noise_accuracy_mean"] = clean[0]["downstream_accuracy_mean"]
        out["uniform_no_noise_accuracy_std"] = clean[0]["downstream_accuracy_std"]
    return out


def beats(row, base, key="heldout_loss", sds: float = 2.0) -> bool:
    """``row`` better than ``base`` by ≥ ``sds`` standard deviations over seeds (the larger std)."""
    sd = max(row[f"{key}_std"], base[f"{key}_std"])
    diff = (base[f"{key}_mean"] - row[f"{key}_mean"]) if key == "heldout_loss" else (
        row[f"{key}_mean"] - base[f"{key}_mean"])
    return diff > 0 and diff >= sds * sd


def choose_default(grid) -> str:
    """The τ schedule with the most settings better than uniform on held-out loss (ties: fewer
    settings worse), with the evidence in one line."""
    base = _base(grid)
    present = [s for s in SCHEDULES if any(r["schedule"] == s for r in grid)]
    score = {}
    for s in present:
        rows = [r for r in grid if r["method"] == "presence" and r["schedule"] == s]
        better = sum(r["heldout_loss_mean"] < base[_setting(r)]["heldout_loss_mean"] for r in rows)
        sig = sum(beats(r, base[_setting(r)]) for r in rows)
        worse = sum(beats(base[_setting(r)], r) for r in rows)
        score[s] = (sig, better, -worse, len(rows))
    best = max(present, key=lambda s: score[s][:3])
    sig, better, neg_worse, n = score[best]
    return (f"{best}: lower held-out loss than uniform in {better} of {n} data settings "
            f"({sig} by ≥ 2 std over seeds, significantly worse in {-neg_worse}); others: "
            + ", ".join(f"{s} {score[s][1]}/{score[s][3]} ({score[s][0]} ≥ 2 std, {-score[s][2]} worse)"
                        for s in present if s != best))


def _fmt(r):
    return (f"{r['heldout_loss_mean']:.3f} ± {r['heldout_loss_std']:.3f}",
            f"{100 * r['downstream_accuracy_mean']:.1f} ± {100 * r['downstream_accuracy_std']:.1f}")


def _base(rows) -> dict:
    """Each data setting's uniform row, keyed by ``(noise_kind, noise_fraction, steps)``."""
    return {_setting(r): r for r in rows if r["method"] == "uniform"}


def _setting(r) -> tuple:
    return r["noise_kind"], r["noise_fraction"], r.get("steps")


def _report(grid, side, corner, default, cfg, out_dir, seconds, reference, n_runs, diagnostics=()):
    base = _base(grid + corner)
    lines = [f"# PRESENCE on a token-level transformer LM{' (quick)' if cfg.quick else ''}", "",
             f"Command: `python -m experiments.presence_lm{' --quick' if cfg.quick else ''}` ({n_runs} runs, "
             f"{seconds / 60:.0f} min of training and evaluation; "
             f"{len(cfg.seeds)} seed(s)). Held-out clean loss (nats/token, lower is better) and downstream accuracy "
             "(%, which of 6 standard-library domains a window documents, encoder finetuned), mean ± std over "
             "seeds; ✓ / ✗ after a number = better / worse than uniform (same data, same steps) by ≥ 2 std on "
             "that metric.", "",
             f"Downstream yardsticks: the same finetuning from a random initialisation "
             f"{100 * reference['random_init_accuracy_mean']:.1f} ± {100 * reference['random_init_accuracy_std']:.1f} %, "
             f"majority class {100 * reference['majority_class_accuracy']:.1f} %.", "",
             "| noise | method | schedule | held-out loss | downstream acc. |", "|---|---|---|---|---|"]

    def mark(r, b, key):
        return "" if r is b else (" ✓" if beats(r, b, key) else (" ✗" if beats(b, r, key) else ""))

    def table(rows):
        for r in rows:
            b = base[_setting(r)]
            loss, acc = _fmt(r)
            lines.append(f"| {r['noise_kind']} {100 * r['noise_fraction']:.0f} % | {r['method']} | {r['schedule']} | "
                         f"{loss}{mark(r, b, 'heldout_loss')} | {acc}{mark(r, b, 'downstream_accuracy')} |")
    table(grid)
    if corner:
        lines += ["", f"Longer training ({cfg.corner_steps} steps, {len(cfg.corner_seeds)} seeds):", "",
                  "| noise | method | schedule | held-out loss | downstream acc. |", "|---|---|---|---|---|"]
        table(corner)
    if side:
        lines += ["", "Side grid (τ = 0 control; switch point, microbatch count and K on 30 % jumbled; "
                  "source-clustered microbatches):", "",
                  "| noise | schedule | batching | microbatches | switch | K | held-out loss | downstream acc. |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in side:
            loss, acc = _fmt(r)
            lines.append(f"| {r['noise_kind']} {100 * r['noise_fraction']:.0f} % | {r['schedule']} | {r['batching']} | "
                         f"{r['num_microbatches']} | {r['switch']:g} | {'+'.join(r['si_layers'])} | {loss} | {acc} |")
    if diagnostics:
        lines += ["", "Where the weights go (τ = −1, one run each; per-window weight = microbatch weight / microbatch "
                  "size, uniform = 1 / batch):", "",
                  "| noise | batching | ε | weight per noisy window | per clean window | corr(weight, noisy count) | "
                  "effective microbatches | steps 20–120: SI mean, σ within a step, max abs(w − 1/n) |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in diagnostics:
            u = d["uniform_weight_per_window"]
            noisy = "—" if d["weight_per_noisy_window"] is None else f"{d['weight_per_noisy_window'] / u:.2f}× uniform"
            corr = "—" if d["corr_weight_noisy_count"] is None else f"{d['corr_weight_noisy_count']:+.2f}"
            lines.append(f"| {d['noise_kind']} {100 * d['noise_fraction']:.0f} % | {d['batching']} | "
                         f"{'relative' if d['relative_eps'] else 'literal 1e-6'} | {noisy} | "
                         f"{d['weight_per_clean_window'] / u:.2f}× | {corr} | {d['effective_microbatches_mean']:.2f} of "
                         f"{d['num_microbatches']} | {d['early_si_mean']:.2g}, {d['early_si_std_within_step']:.2g}, "
                         f"{d['early_max_abs_weight_minus_uniform']:.3f} |")
    lines += ["", f"Chosen default: {default}", ""]
    with open(os.path.join(out_dir, "lm_report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _plot(grid, path, reference=None):
    """Held-out loss (top) and downstream accuracy (bottom) of every variant in every data setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    settings = sorted({(r["noise_kind"], r["noise_fraction"]) for r in grid}, key=lambda s: (s[0] != "none", s))
    variants = []
    for r in grid:
        v = (r["method"], r["schedule"])
        if v not in variants:
            variants.append(v)
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.3 * len(settings)), 6.4), sharex=True)
    w = 0.8 / len(variants)
    for ax, key, label, margin in ((axes[0], "heldout_loss", "held-out clean loss (nats/token)", 0.1),
                                   (axes[1], "downstream_accuracy", "downstream accuracy", 0.05)):
        for j, v in enumerate(variants):
            means, stds = [], []
            for s in settings:
                r = next(r for r in grid if (r["noise_kind"], r["noise_fraction"]) == s
                         and (r["method"], r["schedule"]) == v)
                means.append(r[f"{key}_mean"])
                stds.append(r[f"{key}_std"])
            ax.bar(np.arange(len(settings)) + j * w, means, w, yerr=stds, capsize=2,
                   label=v[1] if v[0] == "presence" else ("uniform" if v[0] == "uniform" else f"sequential {v[1]}"))
        allm = [r[f"{key}_mean"] for r in grid]
        ax.set_ylim(min(allm) - margin, max(allm) + margin)
        ax.set_ylabel(label, fontsize=8)
        if key == "downstream_accuracy" and reference:
            ax.axhline(reference["random_init_accuracy_mean"], color="k", ls="--", lw=0.8,
                       label="random init (finetuned)")
    axes[1].set_xticks(np.arange(len(settings)) + 0.4 - w / 2)
    axes[1].set_xticklabels([f"{k} {100 * f:.0f}%" for k, f in settings], fontsize=8)
    axes[0].legend(fontsize=6, ncol=3)
    axes[1].legend(fontsize=6, ncol=4)
    axes[0].set_title("PRESENCE on a token-level transformer LM", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="reports/presence")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated subset of main,side,corner to run; a subset only fills the run cache "
                         "(results are written when all parts are run)")
    console.add_verbose_flag(ap)
    args = ap.parse_args(argv)
    console.quiet(args.verbose)
    cfg = LMConfig.quick_config() if args.quick else LMConfig()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    parts = tuple(p for p in args.parts.split(",") if p)
    out = run(cfg, args.out, progress=not args.no_progress, parts=parts)
    if set(parts) != set(PARTS):
        print(f"cached {out['runs']} runs of {', '.join(parts)} in {args.out}/lm_runs")
        return
    print(open(os.path.join(args.out, "lm_report.md")).read())


if __name__ == "__main__":
    main()

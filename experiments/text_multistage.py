"""The multi-stage paper's setting in miniature on text: a small Keras transformer pretrained on
the embedded English corpus, a classifier finetuned on a *different* task built from the corpus,
and leave-one-out correlation of multi-stage influence with CG, EK-FAC and the identity baseline.

Tasks (character tokens of :mod:`experiments.text`, windows of ``seq_len`` characters):

* pretraining (3 classes): is a window English prose, Python code, or prose with its words
  jumbled — a pretext task that needs character and word-order features;
* finetuning (2 classes, prose windows disjoint from the pretraining ones): is a window clean prose
  or prose with the letters of every word reversed — a new task whose labels the pretext never saw,
  solvable with the features the pretext taught (as the paper's digits 0–3 → 4–9).

Model: the shared ``embedding`` (token ``Embedding`` + fixed sinusoidal positions →
``MultiHeadAttention`` (its ``EinsumDense`` projections) + residual → ``LayerNormalization`` → ``Dense``
FFN → mean pool) with a ``Dense`` head per task; float64, L2 on every kernel so an optimum exists.
Case 1 (embedding fixed during finetuning). Both models are trained to convergence with full-batch
Adam; the leave-one-out ground truth is :class:`tf_influence.evaluation.loo.TwoStageRetrainer`
with gradient-descent continuation (the digits protocol, see ``experiments.reproduce``).

Scores: CG (``cg_squared``, the library defaults), EK-FAC for the pretraining Hessian with CG for
the head (as the digits ``case1_fixed_ekfac`` row), and the identity-Hessian baseline, all on the
same leave-one-out examples (the top ``n_loo`` by CG |score|).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

import tf_influence as tfi
from experiments import text
from tf_influence.evaluation import loo, retraining

F64 = "float64"


@dataclass
class TextConfig:
    seq_len: int = 24
    width: int = 16
    heads: int = 2
    ffn: int = 32
    n_pretrain: int = 450        # 150 per class
    n_finetune: int = 200
    n_test: int = 100
    l2: float = 1e-3
    init_steps: int = 3000
    init_lr: float = 1e-2
    loo_steps: int = 300
    loo_lr: float = 0.03
    n_loo: int = 30
    cg_iters: int = 300
    seed: int = 0

    @classmethod
    def quick(cls):
        return cls(n_pretrain=150, n_finetune=80, n_test=40, init_steps=300, loo_steps=40, n_loo=6, cg_iters=50)


def reverse_words(sample: str) -> str:
    """Reverse the letters of every word (keeps length, spaces and the character set)."""
    return " ".join(w[::-1] for w in sample.split(" "))


def make_tasks(cfg: TextConfig):
    """``(x_pre, y_pre), (x_ft, y_ft), (x_test, y_test)`` as int32 token windows and int64 labels."""
    rng = np.random.default_rng(cfg.seed)
    L = cfg.seq_len
    prose_all, code = text.load_corpus()
    prose = text.windows(" ".join(prose_all), L)
    code_w = text.windows(code, L)
    order = rng.permutation(len(prose))
    per = cfg.n_pretrain // 3
    n_ft = cfg.n_finetune + cfg.n_test
    if len(prose) < 2 * per + n_ft:
        raise ValueError(f"the corpus has {len(prose)} prose windows of {L} characters, fewer than the "
                         f"{2 * per + n_ft} needed")
    pre_prose = [prose[i] for i in order[:2 * per]]
    ft_prose = [prose[i] for i in order[2 * per:2 * per + n_ft]]
    code_pick = [code_w[i] for i in rng.choice(len(code_w), per, replace=False)]
    samples = pre_prose[:per] + code_pick + [text.jumble(s, rng) for s in pre_prose[per:]]
    labels = np.repeat(np.arange(3), per)
    perm = rng.permutation(len(samples))
    x_pre = text.encode([samples[i] for i in perm])
    y_pre = labels[perm].astype(np.int64)
    flip = rng.random(n_ft) < 0.5
    ft_samples = [reverse_words(s) if f else s for s, f in zip(ft_prose, flip)]
    x = text.encode(ft_samples)
    y = flip.astype(np.int64)
    n = cfg.n_finetune
    # token ids: printable ASCII 1..95 → 0..94 (the embedding has no padding row)
    return (x_pre - 1, y_pre), (x[:n] - 1, y[:n]), (x[n:] - 1, y[n:])


def _positions(seq_len, width):
    pos = np.arange(seq_len)[:, None] / np.power(10000.0, (2 * (np.arange(width)[None, :] // 2)) / width)
    return np.where(np.arange(width)[None, :] % 2 == 0, np.sin(pos), np.cos(pos))[None].astype(np.float64)


def build_models(cfg: TextConfig, n_pre: int = 3, n_ft: int = 2):
    """``(pretrain_model, finetune_model, embedding)`` sharing the transformer ``embedding``."""
    keras.utils.set_random_seed(cfg.seed)
    reg = keras.regularizers.L2(cfg.l2)
    vocab = len(text.VOCAB)
    tokens = keras.Input((cfg.seq_len,), dtype="int32")
    h = keras.layers.Embedding(vocab, cfg.width, dtype=F64, name="tok_emb", embeddings_regularizer=reg)(tokens)
    h = h + _positions(cfg.seq_len, cfg.width)
    a = keras.layers.MultiHeadAttention(cfg.heads, key_dim=cfg.width // cfg.heads, dtype=F64, name="attention",
                                        kernel_regularizer=reg)(h, h)
    h = keras.layers.LayerNormalization(dtype=F64, name="norm")(h + a)
    h = keras.layers.Dense(cfg.ffn, activation="tanh", dtype=F64, name="ffn", kernel_regularizer=reg)(h)
    out = keras.layers.GlobalAveragePooling1D(dtype=F64, name="pool")(h)
    emb = keras.Model(tokens, out, name="embedding")

    def attach(n, head, name):
        inp = keras.Input((cfg.seq_len,), dtype="int32")
        logits = keras.layers.Dense(n, dtype=F64, name=head, kernel_regularizer=reg)(emb(inp))
        return keras.Model(inp, logits, name=name)
    return attach(n_pre, "pretrain_head", "pretrain"), attach(n_ft, "finetune_head", "finetune"), emb


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _ds(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(512)


def run(cfg: TextConfig, cache=None, progress: bool = True) -> dict:
    """Train both stages, score with CG / EK-FAC / identity, and correlate with leave-one-out."""
    t0 = time.perf_counter()
    (xp, yp), (xf, yf), (xt, yt) = make_tasks(cfg)
    pre, ft, emb = build_models(cfg)
    WU = tfi.ParameterGroup.from_model(pre, "(W,U)")
    retraining.WeightedTrainer(tfi.Objective(pre, _loss()), xp, yp, WU, "adam", cfg.init_lr).run(cfg.init_steps)
    W = tfi.group_from_layers(ft, ["embedding"])
    retraining.WeightedTrainer(tfi.Objective(ft, _loss()), xf, yf, tfi.complement_group(ft, W), "adam",
                               cfg.init_lr).run(cfg.init_steps)
    acc = lambda m, x, y: float(np.mean(np.argmax(m.predict(x, verbose=0), -1) == y))  # noqa: E731
    out = {"n_params": int(WU.size), "n_pretrain": int(len(yp)), "n_finetune": int(len(yf)), "n_test": int(len(yt)),
           "pretrain_train_accuracy": acc(pre, xp, yp), "finetune_test_accuracy": acc(ft, xt, yt)}
    train_seconds = time.perf_counter() - t0

    def score(method, head="cg_squared"):
        mk = lambda m, lam: tfi.SolverConfig(m, damping=lam, max_iter=cfg.cg_iters, dtype=tf.float64,  # noqa: E731
                                             tol=1e-5)
        kw = dict(embedding=["embedding"], case="fixed", hessian_samples=None, progress=progress,
                  pretrain_solver=mk(method, tfi.DEFAULT_PRETRAIN_DAMPING),
                  finetune_solver=mk(head, tfi.DEFAULT_FINETUNE_DAMPING))
        args = (tfi.Objective(pre, _loss()), _ds(xp, yp), tfi.Objective(ft, _loss()), _ds(xf, yf), _ds(xt, yt))
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tfi.SolverNotConvergedWarning)
            res = (tfi.identity_hessian_influence(*args, **kw) if method == "identity"
                   else tfi.multi_stage_influence(*args, **kw))
        return res, time.perf_counter() - t

    results = {m: score(m) for m in ("cg_squared", "ekfac", "identity")}
    idx = loo.top_by_magnitude(results["cg_squared"][0].scores, cfg.n_loo)
    protocol = loo.RetrainProtocol(case="fixed", pretrain_steps=cfg.loo_steps, finetune_steps=cfg.loo_steps,
                                   pretrain_lr=cfg.loo_lr, finetune_lr=cfg.loo_lr, optimizer="sgd")
    rt = loo.TwoStageRetrainer(pre, ft, _loss(), ["embedding"], xp, yp, xf, yf, xt, yt, protocol)
    t = time.perf_counter()
    actual = rt.leave_one_out(idx, cache, progress=progress)
    loo_seconds = time.perf_counter() - t
    names = {"cg_squared": "cg", "ekfac": "ekfac", "identity": "identity"}
    for method, (res, secs) in results.items():
        c = loo.correlation(res.predicted_loss_change_on_removal()[idx], actual)
        out[names[method]] = {"pearson": c["pearson"], "spearman": c["spearman"], "n_examples": int(len(idx)),
                              "seconds": secs, "solves": res.solves}
    out.update(n_examples=int(len(idx)), train_seconds=train_seconds, loo_seconds=loo_seconds,
               loo_abs_mean=float(np.mean(np.abs(actual))), indices=idx.tolist(),
               actual=actual.tolist(), config=cfg.__dict__.copy())
    base = abs(out["identity"]["pearson"]) or 1e-12
    out["ratio_to_identity"] = {m: out[m]["pearson"] / base for m in ("cg", "ekfac")}
    return out

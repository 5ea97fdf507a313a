"""The multi-stage paper's setting in miniature on text — its ELMo experiment: a small Keras
transformer **language model** pretrained on the embedded English corpus, a classifier finetuned on
a different task from its frozen features, and leave-one-out correlation of multi-stage influence
with CG, EK-FAC and the identity baseline.

Tasks (character tokens of :mod:`model_zoo.text`, windows of ``seq_len`` (+1) characters):

* pretraining: next-character prediction (causal LM, loss = mean over the window's positions) on
  windows of English prose and Python code;
* finetuning (2 classes, windows disjoint from the pretraining ones): is a window prose or code —
  labels the pretext never saw, solvable with the features the LM learned.

Model: the shared ``embedding`` (token ``Embedding`` + fixed sinusoidal positions → causal
``MultiHeadAttention`` (its ``EinsumDense`` projections) + residual → ``LayerNormalization`` →
``Dense`` FFN; one vector per position) with a ``Dense`` next-character head (pretraining, per
position) or mean pooling + ``Dense`` (finetuning); float64, L2 on every kernel so an optimum exists.
Case 1 (embedding fixed during finetuning).

Convergence and the leave-one-out ground truth: both models are trained with full-batch Adam and
then **polished by gradient descent** with step ``1 / λ_max`` (the largest Hessian eigenvalue from
:func:`tf_influence.lanczos_extremes`), the step the leave-one-out continuation
(:class:`tf_influence.evaluation.loo.TwoStageRetrainer`) also takes. A first version continued
with a fixed step of 0.03 from the Adam solution: that step was above ``2 / λ_max``, gradient descent
oscillated (the gradient norm *grew* from 0.14 to 1.5), and leave-one-out differences were noise
(every removal raised the test loss by ≈ 3 of 69; CG r = −0.18). A step below ``2 / λ_max`` from a
polished optimum makes the continuation a smooth function of the example weights.

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
from model_zoo import text
from tf_influence.evaluation import loo, retraining

F64 = "float64"


@dataclass
class TextConfig:
    seq_len: int = 24
    width: int = 16
    heads: int = 2
    ffn: int = 32
    n_pretrain: int = 400        # half prose, half code windows
    n_finetune: int = 200
    n_test: int = 100
    l2: float = 1e-3
    init_steps: int = 1500       # full-batch Adam …
    init_lr: float = 1e-2
    polish_steps: int = 1500     # … then gradient descent with step 1/λ_max
    loo_steps: int = 300         # leave-one-out continuation (gradient descent, step 1/λ_max)
    n_loo: int = 30
    cg_iters: int = 300
    seed: int = 0

    @classmethod
    def quick(cls):
        return cls(n_pretrain=120, n_finetune=60, n_test=40, init_steps=200, polish_steps=50, loo_steps=30, n_loo=6,
                   cg_iters=50)


def make_tasks(cfg: TextConfig):
    """``(x_pre, y_pre), (x_ft, y_ft), (x_test, y_test)``: LM windows (inputs and next characters,
    int32 / int64 ``[n, seq_len]``) and prose-vs-code windows (int32 tokens, int64 labels 0 = prose)."""
    rng = np.random.default_rng(cfg.seed)
    L = cfg.seq_len
    prose_all, code = text.load_corpus()
    prose = text.windows(" ".join(prose_all), L + 1)
    code_w = text.windows(code, L + 1)
    half = cfg.n_pretrain // 2
    n_ft = cfg.n_finetune + cfg.n_test
    need = half + (n_ft + 1) // 2
    if min(len(prose), len(code_w)) < need:
        raise ValueError(f"the corpus has {len(prose)} prose and {len(code_w)} code windows of {L + 1} characters; "
                         f"{need} of each are needed")
    po, co = rng.permutation(len(prose)), rng.permutation(len(code_w))
    pre = [prose[i] for i in po[:half]] + [code_w[i] for i in co[:half]]
    ids = text.encode([pre[i] for i in rng.permutation(len(pre))]) - 1   # printable ASCII 1..95 → 0..94
    x_pre, y_pre = ids[:, :-1], ids[:, 1:].astype(np.int64)
    n_code = n_ft // 2
    ft = [prose[i][:L] for i in po[half:half + n_ft - n_code]] + [code_w[i][:L] for i in co[half:half + n_code]]
    labels = np.r_[np.zeros(n_ft - n_code), np.ones(n_code)].astype(np.int64)
    perm = rng.permutation(n_ft)
    x = text.encode([ft[i] for i in perm]) - 1
    y = labels[perm]
    n = cfg.n_finetune
    return (x_pre, y_pre), (x[:n], y[:n]), (x[n:], y[n:])


def _positions(seq_len, width):
    pos = np.arange(seq_len)[:, None] / np.power(10000.0, (2 * (np.arange(width)[None, :] // 2)) / width)
    return np.where(np.arange(width)[None, :] % 2 == 0, np.sin(pos), np.cos(pos))[None].astype(np.float64)


def build_models(cfg: TextConfig, n_ft: int = 2):
    """``(pretrain_model, finetune_model, embedding)`` sharing the transformer ``embedding``."""
    keras.utils.set_random_seed(cfg.seed)
    reg = keras.regularizers.L2(cfg.l2)
    vocab = len(text.VOCAB)
    tokens = keras.Input((cfg.seq_len,), dtype="int32")
    h = keras.layers.Embedding(vocab, cfg.width, dtype=F64, name="tok_emb", embeddings_regularizer=reg)(tokens)
    h = h + _positions(cfg.seq_len, cfg.width)
    a = keras.layers.MultiHeadAttention(cfg.heads, key_dim=cfg.width // cfg.heads, dtype=F64, name="attention",
                                        kernel_regularizer=reg)(h, h, use_causal_mask=True)
    h = keras.layers.LayerNormalization(dtype=F64, name="norm")(h + a)
    out = keras.layers.Dense(cfg.ffn, activation="tanh", dtype=F64, name="ffn", kernel_regularizer=reg)(h)
    emb = keras.Model(tokens, out, name="embedding")
    inp = keras.Input((cfg.seq_len,), dtype="int32")
    pre = keras.Model(inp, keras.layers.Dense(vocab, dtype=F64, name="pretrain_head", kernel_regularizer=reg)(emb(inp)),
                      name="pretrain")
    inp2 = keras.Input((cfg.seq_len,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D(dtype=F64, name="pool")(emb(inp2))
    ft = keras.Model(inp2, keras.layers.Dense(n_ft, dtype=F64, name="finetune_head", kernel_regularizer=reg)(pooled),
                     name="finetune")
    return pre, ft, emb


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _ds(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(512)


def _lm_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)  # [B, T] → mean per window


def step_size(objective, x, y, group) -> float:
    """``1 / λ_max`` of the training Hessian (Lanczos, 20 steps): a gradient-descent step below the
    ``2 / λ_max`` stability limit."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(512)
    _, lam_max, _ = tfi.lanczos_extremes(tfi.HessianOperator(objective, ds, group), num_iterations=20)
    return 1.0 / lam_max


def run(cfg: TextConfig, cache=None, progress: bool = True) -> dict:
    """Train both stages, score with CG / EK-FAC / identity, and correlate with leave-one-out."""
    t0 = time.perf_counter()
    (xp, yp), (xf, yf), (xt, yt) = make_tasks(cfg)
    pre, ft, emb = build_models(cfg)
    pre_obj, ft_obj = tfi.Objective(pre, _lm_loss()), tfi.Objective(ft, _loss())
    WU = tfi.ParameterGroup.from_model(pre, "(W,U)")
    W = tfi.group_from_layers(ft, ["embedding"])
    Theta = tfi.complement_group(ft, W)
    retraining.WeightedTrainer(pre_obj, xp, yp, WU, "adam", cfg.init_lr).run(cfg.init_steps)
    lr_pre = step_size(pre_obj, xp, yp, WU)
    pre_gd = retraining.WeightedTrainer(pre_obj, xp, yp, WU, "sgd", lr_pre)
    pre_gd.run(cfg.polish_steps)
    retraining.WeightedTrainer(ft_obj, xf, yf, Theta, "adam", cfg.init_lr).run(cfg.init_steps)
    lr_ft = step_size(ft_obj, xf, yf, Theta)
    ft_gd = retraining.WeightedTrainer(ft_obj, xf, yf, Theta, "sgd", lr_ft)
    ft_gd.run(cfg.polish_steps)
    acc = lambda m, x, y: float(np.mean(np.argmax(m.predict(x, verbose=0), -1) == y))  # noqa: E731
    out = {"n_params": int(WU.size), "n_pretrain": int(len(yp)), "n_finetune": int(len(yf)), "n_test": int(len(yt)),
           "pretrain_next_char_accuracy": acc(pre, xp, yp), "finetune_test_accuracy": acc(ft, xt, yt),
           "pretrain_gradient_norm": pre_gd.gradient_norm(), "finetune_gradient_norm": ft_gd.gradient_norm(),
           "pretrain_step": lr_pre, "finetune_step": lr_ft}
    train_seconds = time.perf_counter() - t0

    def score(method, head="cg_squared"):
        mk = lambda m, lam: tfi.SolverConfig(m, damping=lam,  # noqa: E731
                                             tol=1e-5,
                                             iterative=tfi.IterativeOptions(max_iter=cfg.cg_iters, dtype=tf.float64))
        kw = dict(embedding=["embedding"], progress=progress, args=tfi.InfluenceArgs(
            case="fixed", hessian_samples=None, pretrain_solver=mk(method, tfi.DEFAULT_PRETRAIN_DAMPING),
            finetune_solver=mk(head, tfi.DEFAULT_FINETUNE_DAMPING)))
        args = (pre_obj, _ds(xp, yp), ft_obj, _ds(xf, yf), _ds(xt, yt))
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tfi.SolverNotConvergedWarning)
            warnings.simplefilter("ignore", tfi.CurvatureWarning)  # reported in the result's solves
            res = (tfi.identity_hessian_influence(*args, **kw) if method == "identity"
                   else tfi.multi_stage_influence(*args, **kw))
        return res, time.perf_counter() - t

    results = {m: score(m) for m in ("cg_squared", "ekfac", "identity")}
    idx = loo.top_by_magnitude(results["cg_squared"][0].scores, cfg.n_loo)
    protocol = loo.RetrainProtocol(case="fixed", pretrain_steps=cfg.loo_steps, finetune_steps=cfg.loo_steps,
                                   pretrain_lr=lr_pre, finetune_lr=lr_ft, optimizer="sgd")
    rt = loo.TwoStageRetrainer(pre, ft, _lm_loss(), ["embedding"], xp, yp, xf, yf, xt, yt, protocol,
                               finetune_loss=_loss())
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

"""keras-hub benchmark: multi-stage influence with the package defaults on a GPT-2-style causal LM.

``python -m benchmarks.hub --out docs/results/hub.json`` (``make bench-hub``; the docs page renders that file) measures:

* **speed** — a ``keras_hub.models.GPT2CausalLM`` (≥ 1 M parameters, tied ``ReversibleEmbedding``)
  pretrained on character windows of the embedded corpus, its backbone frozen under a 6-way domain
  classifier (case 1). ``default_over_epoch``: wall time of ``multi_stage_influence`` with every
  argument at its default (tracing, both solves, scoring every pretraining sequence) over one
  training epoch of the LM on the same sequences (``train_epoch_seconds``, a timed second epoch of
  ``fit``); ``default_over_epoch_2k`` the same on the first 2,000 sequences;
* **fidelity** — a small GPT-2 LM where leave-one-out retraining is affordable: Pearson / Spearman of
  the predicted loss change on removal against the warm-started leave-one-out protocol of the
  reproduction (:mod:`tf_influence.evaluation.loo`), for the default (``auto``), ``cg_squared``, EK-FAC
  and the identity-Hessian baseline on the same removed examples;
* **second derivatives** — ``hvp_fd_rel_error``: HVP vs float64 central differences per layer type
  (:mod:`tf_influence.evaluation.derivative_check`).

``--quick`` shrinks everything (a smoke run, not the reported numbers).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from tf_influence.console import quiet

quiet()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_influence as tfi  # noqa: E402
from benchmarks.common import parse_args, write_report  # noqa: E402
from model_zoo import text  # noqa: E402
from tf_influence.evaluation import derivative_check, loo  # noqa: E402
from tf_influence.lm import CausalLMLoss, causal_lm_examples  # noqa: E402

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class CharTokens:
    """The embedded corpus' character vocabulary (:mod:`model_zoo.text`)."""

    name = "char"
    vocab_size = text.VOCAB_SIZE

    def encode(self, s: str) -> np.ndarray:
        return text.encode([s])[0]


class BPETokens:
    """A byte-level BPE of ``vocab_size`` tokens trained offline on the embedded corpus with the ``tokenizers``
    package (installed with keras-hub): a subword vocabulary of a realistic size, id 0 the padding."""

    name = "bpe"

    def __init__(self, vocab_size: int = 8192):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        prose, code = text.load_corpus()
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(list(prose) + code.split("\n"), trainers.BpeTrainer(
            vocab_size=int(vocab_size), special_tokens=["[PAD]"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        self.tok, self.vocab_size = tok, int(tok.get_vocab_size())

    def encode(self, s: str) -> np.ndarray:
        return np.asarray(self.tok.encode(s).ids, np.int32)


TOKENS = CharTokens()      # main() sets the benchmark's tokenizer


def corpus_windows(n: int, length: int, seed: int = 0) -> np.ndarray:
    """``[n, length]`` token ids of windows of the embedded corpus (prose + code, stride length/2)."""
    prose, code = text.load_corpus()
    stream = TOKENS.encode(" ".join(prose) + " " + code)
    stride = max(1, length // 2)
    starts = np.arange(0, len(stream) - length, stride)
    if len(starts) < n:
        raise ValueError(f"the embedded corpus gives {len(starts)} windows of {length}, asked for {n}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(starts, size=n, replace=False))
    return np.stack([stream[s:s + length] for s in chosen]).astype(np.int32)


def domain_task(n: int, length: int, seed: int = 1):
    """Windows of ``length`` tokens of the prose paragraphs with their :data:`model_zoo.text.DOMAINS` label."""
    prose, _, domains = text.load_corpus(with_domains=True)
    xs, ys = [], []
    for para, d in zip(prose, domains):
        ids = TOKENS.encode(para)
        for i in range(0, len(ids) - length + 1, length):
            xs.append(ids[i:i + length])
            ys.append(d)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(xs))[:n]
    return np.stack([xs[i] for i in idx]).astype(np.int32), np.array([ys[i] for i in idx], np.int32)


def build(width: int, layers: int, length: int, seed: int = 0):
    import keras_hub
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=TOKENS.vocab_size, num_layers=layers, num_heads=4,
                                             hidden_dim=width, intermediate_dim=4 * width,
                                             max_sequence_length=length, name="backbone")
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in ("token_ids", "padding_mask")}
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(backbone(inputs))
    clf = keras.Model(inputs, keras.layers.Dense(len(text.DOMAINS), name="classifier")(pooled), name="classifier")
    return backbone, lm, clf


def lm_data(ids, batch):
    x, y = causal_lm_examples(ids)
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def clf_data(ids, labels, batch):
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    return x, labels, tf.data.Dataset.from_tensor_slices((x, labels)).batch(batch)


def timed_epoch(model, ds) -> float:
    model.fit(ds, epochs=1, verbose=0)            # the first epoch traces
    t0 = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    return time.perf_counter() - t0


def speed(n: int, width: int, layers: int, length: int, batch: int) -> dict:
    backbone, lm, clf = build(width, layers, length)
    ids = corpus_windows(n, length)
    _, _, pre_ds = lm_data(ids, batch)
    lm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=CausalLMLoss())
    epoch = timed_epoch(lm, pre_ds)
    fx, fy = domain_task(600, length)
    _, _, ft_ds = clf_data(fx[:500], fy[:500], batch)
    _, _, te_ds = clf_data(fx[500:510], fy[500:510], batch)
    backbone.trainable = False
    clf.compile(optimizer=keras.optimizers.Adam(3e-3), loss=SCE)
    clf.fit(ft_ds, epochs=3, verbose=0)
    g, f = tfi.Objective(lm, CausalLMLoss()), tfi.Objective(clf, SCE)
    out = {"n_params": int(tfi.ParameterGroup.from_model(lm).size), "n_pretrain_examples": int(n),
           "train_epoch_seconds": epoch}
    t0 = time.perf_counter()
    res = tfi.multi_stage_influence(g, pre_ds, f, ft_ds, te_ds, embedding=backbone)
    out["default_seconds"] = time.perf_counter() - t0
    out["default_over_epoch"] = out["default_seconds"] / epoch
    out["default_solver"] = {k: v.get("auto", {}).get("chose", v["method"]) for k, v in res.solves.items()}
    out["default_seconds_by_phase"] = res.seconds
    # the same model on its first 2,000 sequences (a fresh objective: nothing compiled is reused)
    small = min(2000, n)
    _, _, small_ds = lm_data(ids[:small], batch)
    epoch_small = timed_epoch(lm, small_ds)
    g2 = tfi.Objective(lm, CausalLMLoss(per_example="mean", name="causal_lm_loss_2k"))
    t0 = time.perf_counter()
    tfi.multi_stage_influence(g2, small_ds, tfi.Objective(clf, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, name="sce_2k")), ft_ds, te_ds, embedding=backbone)
    out["default_seconds_2k"] = time.perf_counter() - t0
    out["train_epoch_seconds_2k"] = epoch_small
    out["default_over_epoch_2k"] = out["default_seconds_2k"] / epoch_small
    return out


def fidelity(n_pre: int, n_loo: int, width: int, length: int, steps: int) -> dict:
    backbone, lm, clf = build(width, 1, length, seed=3)
    ids = corpus_windows(n_pre, length, seed=3)
    xp, yp, pre_ds = lm_data(ids, 64)
    lm.compile(optimizer=keras.optimizers.Adam(3e-3), loss=CausalLMLoss())
    lm.fit(pre_ds, epochs=30, verbose=0)
    fx, fy = domain_task(160, length, seed=4)
    xf, yf, ft_ds = clf_data(fx[:120], fy[:120], 40)
    xt, yt, te_ds = clf_data(fx[120:130], fy[120:130], 10)
    backbone.trainable = False
    clf.compile(optimizer=keras.optimizers.Adam(1e-2), loss=SCE)
    clf.fit(ft_ds, epochs=60, verbose=0)
    g, f = tfi.Objective(lm, CausalLMLoss()), tfi.Objective(clf, SCE)
    methods = {"default": {},
               "cg": dict(pretrain_solver=tfi.SolverConfig("cg_squared", damping=tfi.DEFAULT_PRETRAIN_DAMPING,
                                                           iterative=tfi.IterativeOptions(max_iter=300))),
               "ekfac": dict(pretrain_solver=tfi.SolverConfig("ekfac", damping=tfi.DEFAULT_PRETRAIN_DAMPING)),
               "identity": dict(pretrain_solver=tfi.SolverConfig("identity"))}
    from tf_influence.kfac import DENSE_FACTOR_MAX
    if TOKENS.vocab_size > DENSE_FACTOR_MAX:   # the exact (dense) vocabulary side, where it still fits
        methods["ekfac_dense_vocab"] = dict(pretrain_solver=tfi.SolverConfig(
            "ekfac", damping=tfi.DEFAULT_PRETRAIN_DAMPING, kronecker=tfi.KroneckerOptions(dense_factor_max=10 ** 9)))
    predicted, solver = {}, {}
    for name, kw in methods.items():
        res = tfi.multi_stage_influence(g, pre_ds, f, ft_ds, te_ds, embedding=backbone,
                                        args=tfi.InfluenceArgs(hessian_samples=None, **kw))
        predicted[name] = res.predicted_loss_change_on_removal()
        solver[name] = {k: v.get("auto", {}).get("chose", v["method"]) for k, v in res.solves.items()}
    protocol = loo.RetrainProtocol(case="fixed", pretrain_steps=steps, finetune_steps=steps, optimizer="sgd",
                                   pretrain_lr=0.05, finetune_lr=0.05)
    retrainer = loo.TwoStageRetrainer(lm, clf, CausalLMLoss(), ["backbone"], xp, yp, xf, yf, xt, yt, protocol,
                                      finetune_loss=SCE)
    chosen = np.sort(np.random.default_rng(5).choice(n_pre, size=n_loo, replace=False))
    actual = retrainer.leave_one_out(chosen)
    out = {name: loo.correlation(p[chosen], actual) for name, p in predicted.items()}
    for v in out.values():
        v["n"] = v.pop("n_examples")
    extra = {}
    if "ekfac_dense_vocab" in predicted:   # bounded (diagonal) against exact (dense) vocabulary side, every example
        from scipy import stats
        extra["fidelity_diagonal_vs_dense_vocab_spearman"] = float(
            stats.spearmanr(predicted["ekfac"], predicted["ekfac_dense_vocab"])[0])
    return {"fidelity": out, "fidelity_solvers": solver, "fidelity_tokenizer": TOKENS.name,
            "fidelity_vocab": int(TOKENS.vocab_size), **extra,
            "fidelity_setup": {"n_params": int(tfi.ParameterGroup.from_model(lm).size), "n_pretrain": n_pre,
                               "n_loo": n_loo, "protocol": {"steps": steps, "optimizer": "sgd", "lr": 0.05}},
            "fidelity_over_identity": {name: (abs(out[name]["pearson"]) / max(abs(out["identity"]["pearson"]), 1e-12))
                                       for name in out if name != "identity"}}


PARTS = ("derivatives", "fidelity", "speed")


@dataclass
class HubBenchArgs:
    """The keras-hub benchmark's options."""

    out: str = field(default="docs/results/hub.json", metadata={"help": "JSON report path (the docs render it)"})
    quick: bool = field(default=False, metadata={"help": "tiny sizes: a smoke run, not the reported numbers"})
    examples: int = field(default=20_000, metadata={"help": "pretraining sequences of the speed run"})
    width: int = field(default=168, metadata={"help": "GPT-2 hidden width of the speed run (1.04 M parameters)"})
    layers: int = field(default=3, metadata={"help": "GPT-2 layers of the speed run"})
    length: int = field(default=32, metadata={"help": "sequence length (characters)"})
    parts: list[str] = field(default_factory=lambda: list(PARTS), metadata={"choices": PARTS, "help": "what to run"})
    tokenizer: str = field(default="bpe", metadata={
        "choices": ("bpe", "char"), "help": "fidelity: a byte-level BPE trained on the embedded corpus (a vocabulary "
                                           "of --bpe-vocab, which has the large-vocabulary problem) or its characters"})
    bpe_vocab: int = field(default=8192, metadata={"help": "fidelity: BPE vocabulary size"})


def main(argv=None):
    args = parse_args(HubBenchArgs, argv, __doc__.split("\n\n")[0])
    if args.quick:
        args.examples, args.width, args.layers = 600, 32, 1
    out = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            out = json.load(fh)
    if "derivatives" in args.parts:
        print("second derivatives vs float64 central differences …", flush=True)
        out["hvp_fd_rel_error"] = derivative_check.check_all()
    if "fidelity" in args.parts:
        global TOKENS
        TOKENS = BPETokens(args.bpe_vocab) if args.tokenizer == "bpe" else CharTokens()
        print(f"fidelity on a small GPT-2 LM, {TOKENS.name} vocabulary of {TOKENS.vocab_size:,} "
              "(leave-one-out retraining) …", flush=True)
        out.update(fidelity(n_pre=80 if args.quick else 240, n_loo=12 if args.quick else 40, width=16,
                            length=16, steps=10 if args.quick else 30))
    if "speed" in args.parts:
        TOKENS = CharTokens()      # the speed run's figures are on the character corpus (20,000 sequences)
        print(f"speed: GPT-2 LM, {args.examples} sequences …", flush=True)
        out.update(speed(args.examples, args.width, args.layers, args.length, batch=64))
    out["quick"] = bool(args.quick)
    write_report(out, args.out)


if __name__ == "__main__":
    main()

"""PRESENCE benchmark: reweighted step time vs a plain step, and self-influence throughput.

    python -m benchmarks.presence --out reports/benchmarks/presence.json [--batch 256] [--microbatches 4]

Measured in one run on the same model (the character LM of ``model_zoo.text``) and the same
batch: ``presence_step_over_plain_step`` is the median time of ``PresenceModel.train_on_batch``
(microbatch gradients in one vectorised pass, SI over K = embedding, softmax weights, weighted
update) over the median time of a plain ``model.train_on_batch``; ``si_examples_per_second`` is
the TracIn self-influence scoring rate (``tracin.self_influence``). ``transformer_*``: the same
step ratio on the token-level transformer LM of :mod:`experiments.presence_lm` at that
experiment's batch size and microbatch count.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from benchmarks.common import median_seconds, parse_args, write_report
from tf_influence.console import VERBOSE_HELP


@dataclass
class PresenceBenchArgs:
    """The PRESENCE benchmark's options."""

    out: str = field(default="reports/benchmarks/presence.json", metadata={"help": "JSON report path"})
    batch: int = field(default=256, metadata={"help": "examples per training step"})
    microbatches: int = field(default=4, metadata={"help": "PRESENCE microbatches per step"})
    repeats: int = field(default=30, metadata={"help": "timed repetitions (median)"})
    si_examples: int = field(default=2048, metadata={"help": "examples scored for self-influence throughput"})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})


def main(argv=None):
    args = parse_args(PresenceBenchArgs, argv, __doc__)
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_influence as tfi
    from model_zoo import text
    from tf_influence import presence, tracin

    prose, _ = text.load_corpus()
    wins = text.windows(" ".join(prose), 65)
    x, y = text.lm_pairs(text.encode(wins[:max(args.batch, args.si_examples)]))
    xb, yb = x[:args.batch], y[:args.batch]

    def timed(fn):
        return median_seconds(fn, args.repeats, warmup=3)

    def step_times(build, loss, num_microbatches, si_layers, xb, yb):
        """Best-of-5 medians of a plain and a PRESENCE ``train_on_batch`` on the same model and
        batch, measured interleaved to share any machine-load drift."""
        plain = build()
        plain.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        pm = presence.PresenceModel(build(), num_microbatches=num_microbatches, si_layers=si_layers, tau=1.0)
        pm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        t_plain, t_pres = [], []
        for _ in range(5):
            t_plain.append(timed(lambda: plain.train_on_batch(xb, yb)))
            t_pres.append(timed(lambda: pm.train_on_batch(xb, yb)))
        return plain, min(t_plain), min(t_pres)

    plain, tp, tr = step_times(lambda: text.build_lm(seed=0), text.lm_loss(), args.microbatches, ["embedding"], xb, yb)
    # the same on the token-level transformer LM of experiments.presence_lm, at its batch size
    from experiments import presence_lm
    cfg = presence_lm.LMConfig()
    corpus = presence_lm.corpus_for(cfg)
    w = corpus.pretrain[:cfg.batch_size]
    plain_t, ttp, ttr = step_times(
        lambda: text.build_transformer_lm(corpus.vocab_size, cfg.seq_len, cfg.width, cfg.heads, cfg.blocks, cfg.ffn),
        presence_lm._loss(), cfg.num_microbatches, list(cfg.si_layers), w[:, :-1], w[:, 1:].astype("int64"))

    ds = tf.data.Dataset.from_tensor_slices((x[:args.si_examples], y[:args.si_examples])).batch(512)
    obj = tfi.Objective(plain, text.lm_loss())
    si_rates = {}
    for method in ("ghost", "per_example"):  # the default (ghost norms) and materialised per-example gradients
        tracin.self_influence(obj, ds.take(1), ["embedding"], method=method)  # trace
        times = []
        for _ in range(3):
            t = time.perf_counter()
            tracin.self_influence(obj, ds, ["embedding"], method=method)
            times.append(time.perf_counter() - t)
        si_rates[method] = args.si_examples / statistics.median(times)
    si_rate = si_rates["ghost"]

    out = {"presence_step_over_plain_step": tr / tp, "si_examples_per_second": si_rate,
           "si_per_example_examples_per_second": si_rates["per_example"],
           "plain_step_seconds": tp, "presence_step_seconds": tr, "batch_size": args.batch,
           "num_microbatches": args.microbatches, "n_params": int(sum(np.prod(v.shape) for v in
                                                                     plain.trainable_variables)),
           "si_layer_set": ["embedding"],
           "transformer_presence_step_over_plain_step": ttr / ttp, "transformer_plain_step_seconds": ttp,
           "transformer_presence_step_seconds": ttr, "transformer_batch_size": cfg.batch_size,
           "transformer_num_microbatches": cfg.num_microbatches,
           "transformer_n_params": int(sum(np.prod(v.shape) for v in plain_t.trainable_variables)),
           "tensorflow": tf.__version__}
    write_report(out, args.out, width=35)
    print(f"target: PRESENCE step ≤ 1.15× plain step: character LM "
          f"({'met' if out['presence_step_over_plain_step'] <= 1.15 else 'MISSED'}), transformer LM "
          f"({'met' if out['transformer_presence_step_over_plain_step'] <= 1.15 else 'MISSED'})")


if __name__ == "__main__":
    main()

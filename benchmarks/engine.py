"""Engine benchmark: HVP vs gradient cost, per-example gradient throughput, full scoring time.

    python -m benchmarks.engine --out reports/benchmarks/engine.json [--batch 512] [--repeats 20]

All numbers are measured in this one run on the same model (the digits CNN pretraining
model of ``tf_influence.models``, float32) and the same batch, so the ratios compare like
with like:

* ``hvp_fob_over_grad`` / ``hvp_rr_over_grad``: one Hessian-vector product of the batch mean
  loss (forward-over-back / reverse-over-reverse) over one gradient of the same loss.
* ``per_example_vectorized_over_loop``: examples/s of the vectorised per-example gradients
  (jacobian with pfor) over a Python loop of one-example gradients (each a compiled call).
* ``per_example_vectorized_over_batched``: the same over one ordinary batch gradient
  (examples/s; the batch gradient does not give per-example values — it is the floor cost).
* ``score_all_seconds``: wall time of a complete case-1 multi-stage influence run (both
  IHVP chains with ``--cg-iters`` CG iterations each, then scoring every pretraining example).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from benchmarks.common import median_seconds, parse_args, write_report
from tf_influence.console import VERBOSE_HELP


@dataclass
class EngineBenchArgs:
    """The engine benchmark's options."""

    out: str = field(default="reports/benchmarks/engine.json", metadata={"help": "JSON report path"})
    batch: int = field(default=512, metadata={"help": "examples per batch"})
    repeats: int = field(default=20, metadata={"help": "timed repetitions (median)"})
    loop_examples: int = field(default=64, metadata={"help": "examples of the one-at-a-time loop it is compared with"})
    cg_iters: int = field(default=50, metadata={"help": "CG iterations of the timed solve"})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})


def main(argv=None):
    args = parse_args(EngineBenchArgs, argv, __doc__)
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_influence as tfi
    from model_zoo import digits as data_mod
    from model_zoo import cnn as models
    from tf_influence.evaluation import WeightedTrainer
    from tf_influence.gradients import GradientKernels
    from tf_influence.hessian import HvpKernels
    from tf_influence.ghost_norms import GhostNorms

    data = data_mod.load_two_stage(n_finetune=400)
    pre, ft, emb = models.build_two_stage_models(data.x_pre.shape[1:], 4, 6, l2=1e-4)
    WeightedTrainer(tfi.Objective(pre, models.sparse_ce()), data.x_pre, data.y_pre,
                    tfi.ParameterGroup.from_model(pre, "all"), "adam", 1e-2).run(300)
    WeightedTrainer(tfi.Objective(ft, models.sparse_ce()), data.x_ft, data.y_ft,
                    tfi.complement_group(ft, tfi.group_from_layers(ft, ["embedding"])), "adam", 1e-2).run(300)
    obj = tfi.Objective(pre, models.sparse_ce())
    g = tfi.ParameterGroup.from_model(pre, "all")
    x, y = tf.constant(data.x_pre[:args.batch]), tf.constant(data.y_pre[:args.batch])
    B = int(x.shape[0])
    v = tf.random.stateless_normal([g.size], seed=[1, 2])
    fns = GradientKernels.get(obj, g)
    total = tf.constant(float(B))

    t_grad = median_seconds(lambda: fns.sum_grad(x, y), args.repeats)
    kern = {m: HvpKernels.get(obj, g, g, m) for m in ("fob", "rr")}
    t_hvp = {m: median_seconds(lambda m=m: kern[m].batch(x, y, v, total), args.repeats) for m in kern}
    t_vec = median_seconds(lambda: fns.jacobian(x, y), max(3, args.repeats // 4))
    ghost = GhostNorms.get(obj, g)  # self-influence over every layer without per-example gradients
    t_ghost = median_seconds(lambda: ghost.fn(x, y), max(3, args.repeats // 4))
    n_loop = min(args.loop_examples, B)

    def loop():
        out = None
        for i in range(n_loop):
            out = fns.sum_grad(x[i:i + 1], y[i:i + 1])
        return out

    t_loop = median_seconds(loop, 3)
    vec_rate, loop_rate, batched_rate = B / t_vec, n_loop / t_loop, B / t_grad

    pre_ds, ft_ds, test_ds = data.datasets()
    cfg = lambda lam: tfi.SolverConfig("cg_squared", damping=lam, tol=0.0,  # noqa: E731
                                       on_nonconvergence="ignore",
                                       iterative=tfi.IterativeOptions(max_iter=args.cg_iters, dtype=tf.float64))
    t = time.perf_counter()
    res = tfi.multi_stage_influence(obj, pre_ds, tfi.Objective(ft, models.sparse_ce()), ft_ds, test_ds,
                                    embedding=["embedding"],
                                    args=tfi.InfluenceArgs(pretrain_solver=cfg(tfi.DEFAULT_PRETRAIN_DAMPING),
                                                           finetune_solver=cfg(tfi.DEFAULT_FINETUNE_DAMPING)))
    score_all = time.perf_counter() - t

    # the dense solver's explicit Hessian: 650-parameter logistic regression on every digit (64 pixels
    # → 10 classes), built by vectorised column blocks (to_dense) vs one Hessian-vector product per column
    xd, yd, _ = data_mod.load_split_arrays("sklearn_digits", "train")
    xd = xd.reshape(len(xd), -1)
    keras.utils.set_random_seed(0)
    logreg = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(1e-3))])
    lr_obj = tfi.Objective(logreg, models.sparse_ce())
    lr_ds = tf.data.Dataset.from_tensor_slices((xd, yd)).batch(256)
    H = tfi.HessianOperator(lr_obj, lr_ds, tfi.ParameterGroup.from_model(logreg))
    t = time.perf_counter()
    dense_block = H.to_dense()
    t_dense_block = time.perf_counter() - t
    eye = tf.eye(H.shape[1])
    t = time.perf_counter()
    dense_cols = np.stack([H.matvec(eye[:, j]).numpy() for j in range(H.shape[1])], axis=1)
    t_dense_cols = time.perf_counter() - t
    assert np.allclose(dense_block, dense_cols, rtol=1e-4, atol=1e-6)

    out = {
        "hvp_fob_over_grad": t_hvp["fob"] / t_grad,
        "hvp_rr_over_grad": t_hvp["rr"] / t_grad,
        "per_example_vectorized_over_loop": vec_rate / loop_rate,
        "per_example_vectorized_over_batched": vec_rate / batched_rate,
        "si_over_batched_gradient": (B / t_ghost) / batched_rate,
        "si_ghost_examples_per_second": B / t_ghost,
        "score_all_seconds": score_all,
        "n_pretrain_examples": int(len(data.x_pre)),
        "n_params": int(g.size),
        "batch_size": B,
        "grad_seconds": t_grad,
        "hvp_fob_seconds": t_hvp["fob"],
        "hvp_rr_seconds": t_hvp["rr"],
        "per_example_vectorized_examples_per_second": vec_rate,
        "per_example_loop_examples_per_second": loop_rate,
        "batched_gradient_examples_per_second": batched_rate,
        "score_all_cg_iterations": args.cg_iters,
        "score_all_breakdown_seconds": res.seconds,
        "dense_hessian_params": int(H.shape[0]),
        "dense_hessian_block_seconds": t_dense_block,
        "dense_hessian_columnwise_seconds": t_dense_cols,
        "dense_hessian_columnwise_over_block": t_dense_cols / t_dense_block,
        "tensorflow": tf.__version__,
    }
    write_report(out, args.out, width=45)
    print(f"targets: HVP ≤ 3× gradient ({'met' if out['hvp_fob_over_grad'] <= 3 else 'MISSED'}), "
          f"vectorised per-example ≥ 10× loop ({'met' if out['per_example_vectorized_over_loop'] >= 10 else 'MISSED'}), "
          f"self-influence ≥ 0.5× batched gradient ({'met' if out['si_over_batched_gradient'] >= 0.5 else 'MISSED'})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Demo: multi-stage influence of pretraining digits (0–3) on a finetuned classifier (4–9).

    python -m experiments.demo [--case fixed|updated] [--top 5] [--out reports/demo]

Trains the pretraining model, finetunes the head on the fixed embedding (case 1, or the whole
model for ``--case updated``), computes every pretraining example's influence on the sum of
the finetuning test losses (eq. 8) and prints the most harmful / helpful pretraining examples.
Writes ``scores.json`` and ``top_examples.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from tf_influence import console


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["fixed", "updated"], default="fixed")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--finetune-steps", type=int, default=1500)
    ap.add_argument("--n-finetune", type=int, default=400)
    ap.add_argument("--cg-iters", type=int, default=200)
    ap.add_argument("--out", default="reports/demo")
    ap.add_argument("--seed", type=int, default=0)
    console.add_verbose_flag(ap)
    args = ap.parse_args(argv)
    console.quiet(args.verbose)

    import keras
    import numpy as np
    import tensorflow as tf

    import tf_influence as tfi
    from model_zoo import digits as data_mod
    from model_zoo import cnn as models
    from tf_influence.evaluation import WeightedTrainer

    t0 = time.perf_counter()
    data = data_mod.load_two_stage(n_finetune=args.n_finetune, seed=args.seed)
    print(data.summary())
    pre, ft, emb = models.build_two_stage_models(data.x_pre.shape[1:], len(data.pretrain_classes),
                                                 len(data.finetune_classes), seed=args.seed, l2=1e-4)

    def train(model, x, y, group, steps):  # full-batch Adam, deterministic
        WeightedTrainer(tfi.Objective(model, models.sparse_ce()), x, y, group, "adam", 1e-2).run(steps)

    everything = lambda m: tfi.ParameterGroup.from_model(m, "all")  # noqa: E731
    train(pre, data.x_pre, data.y_pre, everything(pre), args.pretrain_steps)
    if args.case == "fixed":  # finetune the head Θ on the fixed embedding
        train(ft, data.x_ft, data.y_ft, tfi.complement_group(ft, tfi.group_from_layers(ft, ["embedding"])),
              args.finetune_steps)
        pretrain_model = pre
    else:  # keep the pretrained model (W̄, Ū) and finetune a copy of everything
        pretrain_model = keras.models.clone_model(pre)
        pretrain_model.set_weights(pre.get_weights())
        train(ft, data.x_ft, data.y_ft, everything(ft), args.finetune_steps // 5)
    acc = lambda m, x, y: float(np.mean(np.argmax(m.predict(x, verbose=0), 1) == y))  # noqa: E731
    print(f"pretrain accuracy {acc(pretrain_model, data.x_pre, data.y_pre):.3f}, "
          f"finetune test accuracy {acc(ft, data.x_test, data.y_test):.3f} ({time.perf_counter() - t0:.1f}s)")

    pre_ds, ft_ds, test_ds = data.datasets()
    pre_solver, ft_solver = tfi.default_solvers(args.case)  # cg_squared with the documented dampings
    for cfg in (pre_solver, ft_solver):
        cfg.max_iter, cfg.dtype = args.cg_iters, tf.float64
    result = tfi.multi_stage_influence(
        tfi.Objective(pretrain_model, models.sparse_ce()), pre_ds, tfi.Objective(ft, models.sparse_ce()), ft_ds, test_ds,
        embedding=["embedding"], case=args.case, alpha=args.alpha, pretrain_solver=pre_solver,
        finetune_solver=ft_solver, hessian_samples=1000, progress=True)
    scores = result.scores
    print(f"influence of {len(scores)} pretraining examples on the sum of {len(data.x_test)} test losses "
          f"(test side {result.seconds['test_side']:.1f}s, scoring {result.seconds['scoring']:.1f}s)")
    for name, s in result.solves.items():
        print(f"  {name} IHVP: {s['method']} {s['iterations']} iterations, residual {s['max_relative_residual']:.2e}")
    delta = result.predicted_loss_change_on_removal()
    cls = np.array(data.pretrain_classes)
    for title, idx in (("most HARMFUL (positive score: removing lowers the test loss)", result.top_harmful(args.top)),
                       ("most HELPFUL (negative score: removing raises the test loss)", result.top_helpful(args.top))):
        print(title)
        for i in idx:
            print(f"  pretraining example {i:4d}  digit {cls[data.y_pre[i]]}  score {scores[i]:+.4f}  "
                  f"predicted Δ test loss on removal {delta[i]:+.2e}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scores.json"), "w") as fh:
        json.dump({"case": args.case, "scores": scores.tolist(), "solves": result.solves,
                   "top_harmful": result.top_harmful(args.top).tolist(),
                   "top_helpful": result.top_helpful(args.top).tolist(), "seconds": result.seconds}, fh, indent=1)
    _plot(data, scores, result.top_harmful(args.top), result.top_helpful(args.top), cls,
          os.path.join(args.out, "top_examples.png"))
    print(f"wrote {args.out}/scores.json and {args.out}/top_examples.png ({time.perf_counter() - t0:.1f}s total)")


def _plot(data, scores, harmful, helpful, cls, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(harmful)
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.8))
    for row, (idx, title) in enumerate(((harmful, "harmful"), (helpful, "helpful"))):
        for j, i in enumerate(idx):
            ax = axes[row, j]
            ax.imshow(data.x_pre[i, :, :, 0], cmap="gray_r")
            ax.set_title(f"{title}\n'{cls[data.y_pre[i]]}' {scores[i]:+.2f}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

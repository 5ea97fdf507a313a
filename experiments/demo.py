"""Demo: multi-stage influence of pretraining digits (0–3) on a finetuned classifier (4–9).

    python -m experiments.demo [--case fixed|updated] [--top 5] [--out reports/demo]
                               [--pretrain-solver '{"method": "cg_squared"}'] [--hessian-samples 1000] ...

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
import warnings
from dataclasses import dataclass, field

from tf_influence import console


@dataclass
class DemoArgs:
    """The demo's own options (the influence options are :class:`tf_influence.InfluenceArgs`' flags)."""

    top: int = field(default=5, metadata={"help": "examples shown per side (harmful / helpful)"})
    pretrain_steps: int = field(default=1500, metadata={"help": "full-batch Adam steps of pretraining"})
    finetune_steps: int = field(default=1500, metadata={
        "help": "full-batch Adam steps of finetuning (case 'updated': a fifth of them, on every layer)"})
    n_finetune: int = field(default=400, metadata={"help": "finetuning examples"})
    out: str = field(default="reports/demo", metadata={"help": "folder for scores.json and top_examples.png"})
    seed: int = field(default=0, metadata={
        "help": "seed of the data split, the models and the Hessian subsample (InfluenceArgs.seed)"})
    report_test_points: int = field(default=3, metadata={
        "help": "test points shown one by one in report.html (each its own column of scores; 0: the summed "
                "test loss only)"})
    verbose: bool = field(default=False, metadata={"help": console.VERBOSE_HELP})


def parse(argv=None):
    """``(DemoArgs, InfluenceArgs)`` from the command line; both sets of flags are generated from
    the dataclasses. ``--cg-iters N`` (0.2) is deprecated: both solvers' ``max_iter``."""
    from dataclasses import replace

    import tf_influence as tfi
    from tf_influence import cli
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_arguments(ap, DemoArgs)
    cli.add_arguments(ap, tfi.InfluenceArgs, exclude=("seed",))    # one --seed: the demo's
    ap.add_argument("--cg-iters", type=int, default=None, help=argparse.SUPPRESS)   # deprecated
    ns = ap.parse_args(argv)
    demo = cli.from_args(DemoArgs, ns, parser=ap)
    args = cli.from_args(tfi.InfluenceArgs, ns, parser=ap, seed=demo.seed)
    if args.test_target != "sum":
        ap.error("the demo ranks pretraining examples by their influence on the summed test loss: "
                 "--test-target sum")
    if ns.cg_iters is not None:
        from tf_influence.deprecation import warn
        warn("--cg-iters", "--pretrain-solver / --finetune-solver '{\"iterative\": {\"max_iter\": N}}'")
        args = replace(args, pretrain_solver=args.pretrain_solver.replace(max_iter=ns.cg_iters),
                       finetune_solver=args.finetune_solver.replace(max_iter=ns.cg_iters))
    return demo, args


def main(argv=None):
    console.quiet_for_cli(argv)                           # before the configuration classes import TensorFlow
    demo, influence_args = parse(argv)
    console.quiet(demo.verbose)
    case = influence_args.case

    import keras
    import numpy as np

    import tf_influence as tfi
    from model_zoo import digits as data_mod
    from model_zoo import cnn as models
    from tf_influence.evaluation import WeightedTrainer

    t0 = time.perf_counter()
    data = data_mod.load_two_stage(n_finetune=demo.n_finetune, seed=demo.seed)
    print(data.summary())
    pre, ft, emb = models.build_two_stage_models(data.x_pre.shape[1:], len(data.pretrain_classes),
                                                 len(data.finetune_classes), seed=demo.seed, l2=1e-4)

    def train(model, x, y, group, steps):  # full-batch Adam, deterministic
        WeightedTrainer(tfi.Objective(model, models.sparse_ce()), x, y, group, "adam", 1e-2).run(steps)

    everything = lambda m: tfi.ParameterGroup.from_model(m, "all")  # noqa: E731
    train(pre, data.x_pre, data.y_pre, everything(pre), demo.pretrain_steps)
    if case == "fixed":  # finetune the head Θ on the fixed embedding
        train(ft, data.x_ft, data.y_ft, tfi.complement_group(ft, tfi.group_from_layers(ft, ["embedding"])),
              demo.finetune_steps)
        pretrain_model = pre
    else:  # keep the pretrained model (W̄, Ū) and finetune a copy of everything
        pretrain_model = keras.models.clone_model(pre)
        pretrain_model.set_weights(pre.get_weights())
        train(ft, data.x_ft, data.y_ft, everything(ft), demo.finetune_steps // 5)
    acc = lambda m, x, y: float(np.mean(np.argmax(m.predict(x, verbose=0), 1) == y))  # noqa: E731
    print(f"pretrain accuracy {acc(pretrain_model, data.x_pre, data.y_pre):.3f}, "
          f"finetune test accuracy {acc(ft, data.x_test, data.y_test):.3f} ({time.perf_counter() - t0:.1f}s)")

    pre_ds, ft_ds, test_ds = data.datasets()
    ms = tfi.MultiStageInfluence(
        tfi.Objective(pretrain_model, models.sparse_ce()), pre_ds, tfi.Objective(ft, models.sparse_ce()), ft_ds,
        embedding=["embedding"], args=influence_args, progress=True)   # every option from the one InfluenceArgs
    result = ms(test_ds, influence_args.test_target)
    scores = result.scores
    print(f"influence of {len(scores)} pretraining examples on the sum of {len(data.x_test)} test losses "
          f"(test side {result.seconds['test_side']:.1f}s, scoring {result.seconds['scoring']:.1f}s)")
    for name, s in result.solves.items():
        print(f"  {name} IHVP: {s['method']} {s['iterations']} iterations, residual {s['max_relative_residual']:.2e}")
    delta = result.predicted_loss_change_on_removal()
    cls = np.array(data.pretrain_classes)
    for title, idx in (("most HARMFUL (positive score: removing lowers the test loss)", result.top_harmful(demo.top)),
                       ("most HELPFUL (negative score: removing raises the test loss)", result.top_helpful(demo.top))):
        print(title)
        for i in idx:
            print(f"  pretraining example {i:4d}  digit {cls[data.y_pre[i]]}  score {scores[i]:+.4f}  "
                  f"predicted Δ test loss on removal {delta[i]:+.2e}")
    os.makedirs(demo.out, exist_ok=True)
    with open(os.path.join(demo.out, "scores.json"), "w") as fh:
        json.dump({"case": case, "influence_args": influence_args.to_dict(), "scores": scores.tolist(),
                   "solves": result.solves, "top_harmful": result.top_harmful(demo.top).tolist(),
                   "top_helpful": result.top_helpful(demo.top).tolist(), "seconds": result.seconds}, fh, indent=1)
    _plot(data, scores, result.top_harmful(demo.top), result.top_helpful(demo.top), cls,
          os.path.join(demo.out, "top_examples.png"))
    page = write_report(demo, ms, result, data, ft, pre_ds, test_ds)
    print(f"wrote {demo.out}/scores.json and {demo.out}/top_examples.png ({time.perf_counter() - t0:.1f}s total)")
    print(f"report: {page}")


def write_report(demo, ms, result, data, ft, pre_ds, test_ds) -> str:
    """``report.html``: the summed test loss's ranking, then each of the first ``report_test_points`` test
    points with its own top examples (multi-stage scores with ``test_target="each"``)."""
    from tf_influence.report import ImageRenderer, Report
    pre_names = [str(c) for c in data.pretrain_classes]
    ft_names = [str(c) for c in data.finetune_classes]
    rep = Report(f"Multi-stage influence on the digits (case '{ms.args.case}')",
                 renderer=ImageRenderer(class_names=pre_names), test_renderer=ImageRenderer(class_names=ft_names),
                 subtitle=f"pretraining on digits {', '.join(pre_names)}; finetuning on {', '.join(ft_names)}")
    rep.add_influence(result, pre_ds, top_k=demo.top, title="The summed test loss")
    if demo.report_test_points:
        k = int(demo.report_test_points)
        first = test_ds.unbatch().take(k).batch(k)
        each = ms(first, "each")
        from model_zoo import cnn
        rep.add_influence(each, pre_ds, test=first, model=ft, loss=cnn.sparse_ce(), top_k=demo.top,
                          title=f"The first {k} test points, one by one")
    return rep.write(os.path.join(demo.out, "report.html"))


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

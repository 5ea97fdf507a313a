"""The paper's experiments (one function each, over a run's :class:`~.config.Context`): the
leave-one-out correlations of both cases and the baselines, cleansing, task similarity, finetuning
size, cross-task, Figure 3 and the text setting."""

from __future__ import annotations

import os

import numpy as np

import tf_influence as tfi
from model_zoo import cnn as models, digits
from tf_influence.evaluation import loo

from .config import RANDOM_DROP_SEED_OFFSET
from .train import (accuracy, data, finetune_fixed, finetune_updated, influence, main_case, retrainer, second_head,
                    train_pretrain)


def correlation_experiment(ctx, case, name, title):
    m = main_case(ctx, case)
    d = m["data"]
    res = influence(ctx, m["pre"], m["ft"], d, case)
    idx = loo.top_by_magnitude(res.scores, ctx.cfg.n_loo)
    rt = retrainer(ctx, m["pre"], m["ft"], d, case, m["theta0"])
    actual = rt.leave_one_out(idx, ctx.cache, progress=ctx.progress)
    pred = res.predicted_loss_change_on_removal()[idx]
    out = loo.correlation_report(
        pred,
        actual,
        ctx.out,
        name,
        title,
        extra={
            "indices": idx.tolist(),
            "solves": res.solves,
            "test_accuracy": accuracy(ctx, m["ft"], d.x_test, d.y_test),
        },
    )
    m[f"loo_{case}"] = (idx, actual)
    m[f"scores_{case}"] = res.scores
    out = {**out, "solves": res.solves, "test_accuracy": accuracy(ctx, m["ft"], d.x_test, d.y_test),
           "noise_floor": noise_floor(ctx, rt, idx, actual)}
    if ctx.cfg.sensitivity:
        out["sensitivity"] = sensitivity(ctx, m, case, idx, actual)
    return out


#: Seed of the random examples whose leave-one-out differences make the noise floor of a row.
NOISE_FLOOR_SEED_OFFSET = 77


def noise_floor(ctx, rt, idx, actual) -> dict:
    """What the leave-one-out ground truth looks like without a signal: the protocol is
    deterministic (full-batch gradient descent from fixed weights), so retraining with another seed
    changes nothing; the floor is what removing *random* pretraining examples does. When random
    removals move the test loss as much as the top-scored ones (ratio near 1), the correlation is
    measured on noise."""
    n_random = max(2, ctx.cfg.n_loo // 4)
    rng = np.random.default_rng(ctx.cfg.seed + NOISE_FLOOR_SEED_OFFSET)
    pool = np.setdiff1d(np.arange(rt.n_pre), idx)
    rand = rng.choice(pool, size=min(n_random, len(pool)), replace=False)
    delta = rt.leave_one_out(rand, ctx.cache, progress=ctx.progress)
    top, other = float(np.mean(np.abs(actual))), float(np.mean(np.abs(delta)))
    return {"deterministic_protocol": True, "loo_abs_mean_top": top, "loo_abs_mean_random": other,
            "random_over_top": other / top if top > 0 else float("nan"), "n_random": int(len(rand))}


def sensitivity(ctx, m, case, idx, actual):
    """Pearson r on the same leave-one-out examples for other solver settings (the LOO ground
    truth does not depend on them): dampings for case 1, α × finetuning damping for case 2."""
    rows = []
    if case == "fixed":
        grid = [dict(damping_pretrain=a, damping_finetune=b) for a in (1e-2, 1e-3, 1e-4) for b in (1e-6, 1e-3)]
    else:
        grid = [dict(alpha=a, damping_finetune=b) for a in (1e-3, 1e-2, 1e-1) for b in (1e-6, 1e-3)]
    for kw in grid:
        res = influence(ctx, m["pre"], m["ft"], m["data"], case, **kw)
        rows.append({**kw, **loo.correlation(res.predicted_loss_change_on_removal()[idx], actual)})
    if case == "fixed":
        # the same scores against a different ground truth: the paper's Adam continuation
        # (100 steps per stage, lr 1e-3) instead of gradient descent, on the top 40 examples
        d = m["data"]
        sub = idx[:40]
        adam = retrainer(ctx, m["pre"], m["ft"], d, "fixed", protocol=loo.RetrainProtocol(
            case="fixed", optimizer="adam", pretrain_steps=100, finetune_steps=100, pretrain_lr=1e-3,
            finetune_lr=1e-3))
        truth = adam.leave_one_out(sub, ctx.cache, progress=ctx.progress)
        pred = influence(ctx, m["pre"], m["ft"], d, case).predicted_loss_change_on_removal()[sub]
        rows.append({"ground_truth": "adam_continuation_100_steps", **loo.correlation(pred, truth)})
        rows.append({"ground_truth": "gradient_descent_same_40", **loo.correlation(pred, actual[:40])})
    return rows


def case1_fixed(ctx):
    return correlation_experiment(ctx, "fixed", "case1_fixed", "Case 1: embedding fixed")


def case2_updated(ctx):
    return correlation_experiment(ctx, "updated", "case2_updated", f"Case 2: embedding updated (α = {ctx.cfg.alpha})")


def _ekfac_row(ctx, case, name):
    """The case's leave-one-out examples and ground truth, scored with EK-FAC instead of CG.

    Case 1: EK-FAC for the pretraining Hessian (the large solve), CG for the finetuning head
    ``(∂²F/∂Θ²)⁻¹``: ``v_W = b_W − F_WΘ F_ΘΘ⁻¹ b_Θ`` is a near-cancellation that needs an accurate
    head inverse, and the head is small. The all-EK-FAC variant is reported next to it
    (``all_ekfac``). Case 2: EK-FAC for both (the eq. 15 block spans the whole finetuned model)."""
    m = main_case(ctx, case)
    if f"loo_{case}" not in m:
        (case1_fixed if case == "fixed" else case2_updated)(ctx)
    idx, actual = m[f"loo_{case}"]
    d = m["data"]
    head = "cg_squared" if case == "fixed" else "ekfac"
    res = influence(ctx, m["pre"], m["ft"], d, case, solver="ekfac", finetune_solver=head)
    title = f"EK-FAC ({'pretraining Hessian; CG head' if case == 'fixed' else 'both inverses'}), case {case}"
    out = loo.correlation_report(res.predicted_loss_change_on_removal()[idx], actual, ctx.out, name, title)
    cg = loo.correlation(-m[f"scores_{case}"][idx] / len(d.x_pre), actual)
    out = {
        **out,
        "finetune_solver": head,
        "cg_pearson_same_examples": cg["pearson"],
        "ratio_to_cg": out["pearson"] / cg["pearson"],
        "solves": res.solves,
    }
    if case == "fixed":
        both = influence(ctx, m["pre"], m["ft"], d, case, solver="ekfac")
        out["all_ekfac"] = loo.correlation(both.predicted_loss_change_on_removal()[idx], actual)
    return out


def case1_fixed_ekfac(ctx):
    return _ekfac_row(ctx, "fixed", "case1_fixed_ekfac")


def case2_updated_ekfac(ctx):
    return _ekfac_row(ctx, "updated", "case2_updated_ekfac")


def _case1_loo(ctx):
    m = main_case(ctx, "fixed")
    if "loo_fixed" not in m:
        case1_fixed(ctx)
    return m


def identity_baseline(ctx):
    m = _case1_loo(ctx)
    idx, actual = m["loo_fixed"]
    res = influence(ctx, m["pre"], m["ft"], m["data"], "fixed", identity=True)
    pred = res.predicted_loss_change_on_removal()[idx]
    return loo.correlation_report(
        pred, actual, ctx.out, "identity_baseline", "Identity-Hessian baseline (case 1 examples)"
    )


def loss_baseline(ctx):
    m = _case1_loo(ctx)
    idx, actual = m["loo_fixed"]
    d = m["data"]
    losses = tfi.pretraining_loss_scores(tfi.Objective(m["pre"], models.sparse_ce()), d.datasets()[0])
    # larger pretraining loss read as more harmful: predicted Δ on removal ∝ −loss
    return loo.correlation_report(
        -losses[idx],
        actual,
        ctx.out,
        "loss_baseline",
        "Pretraining-loss baseline (case 1 examples)",
        xlabel="−pretraining loss (larger loss = predicted more harmful)",
    )


def cleansing(ctx):
    rows = []
    it = ctx.cfg.seeds
    for seed in it:
        d = data(ctx, seed=seed)
        pre, ft, _ = train_pretrain(ctx, d, seed)
        finetune_fixed(ctx, ft, d)
        res = influence(ctx, pre, ft, d, "fixed")
        m = len(d.x_pre)
        k = int(round(0.1 * m))
        top = np.argsort(-res.scores)[:k]
        rand = np.random.default_rng(seed + RANDOM_DROP_SEED_OFFSET).choice(m, size=k, replace=False)
        row = {
            "seed": seed,
            "n_dropped": k,
            "n_positive_dropped": int(np.sum(res.scores[top] > 0)),
            "acc_original": accuracy(ctx, ft, d.x_test, d.y_test),
            "loss_original": _test_loss_mean(ctx, ft, d),
        }
        for label, drop in (("drop_top", top), ("drop_random", rand)):
            w = np.ones(m, np.float32)
            w[drop] = 0.0
            p2, f2, _ = train_pretrain(ctx, d, seed, weights=w)
            finetune_fixed(ctx, f2, d)
            row[f"acc_{label}"] = accuracy(ctx, f2, d.x_test, d.y_test)
            row[f"loss_{label}"] = _test_loss_mean(ctx, f2, d)
        rows.append(row)
    out = {"per_seed": rows, "n_seeds": len(rows)}
    for key in (
        "acc_original",
        "acc_drop_top",
        "acc_drop_random",
        "loss_original",
        "loss_drop_top",
        "loss_drop_random",
    ):
        vals = np.array([r[key] for r in rows])
        out[key] = float(vals.mean())
        out[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    return out


def _test_loss_mean(ctx, model, d):
    obj = tfi.Objective(model, models.sparse_ce())
    return float(np.mean(obj.per_example_losses(d.x_test, d.y_test).numpy()))


def task_similarity(ctx):
    """Same pretraining model (classes 0–3, half of their examples); finetune task A = the same
    classes (the other half), task B = digits 4–9 with as many train / test examples."""
    same = data(ctx, finetune_classes=digits.PRETRAIN_CLASSES, n_finetune=None)
    n_ft = min(len(same.x_ft), ctx.cfg.n_finetune)
    rng = np.random.default_rng(ctx.cfg.seed)
    pick = np.sort(rng.choice(len(same.x_ft), n_ft, replace=False))
    same.x_ft, same.y_ft = same.x_ft[pick], same.y_ft[pick]
    other = data(ctx, n_finetune=n_ft)
    n_test = min(len(same.x_test), len(other.x_test))
    same.x_test, same.y_test = same.x_test[:n_test], same.y_test[:n_test]
    other.x_pre, other.y_pre = same.x_pre, same.y_pre  # identical pretraining set
    other.x_test, other.y_test = other.x_test[:n_test], other.y_test[:n_test]
    pre, ft_a, emb = train_pretrain(ctx, same, ctx.cfg.seed)
    finetune_fixed(ctx, ft_a, same)
    s_a = influence(ctx, pre, ft_a, same, "fixed").scores
    ft_b = second_head(ctx, emb, other)
    s_b = influence(ctx, pre, ft_b, other, "fixed").scores
    _hist(
        ctx,
        {"same task (0–3 → 0–3)": s_a, "different task (0–3 → 4–9)": s_b},
        "task_similarity",
        "Score distribution by finetuning task",
    )
    return {
        "mean_abs_same_task": float(np.mean(np.abs(s_a))),
        "mean_abs_different_task": float(np.mean(np.abs(s_b))),
        "n_test": int(n_test),
        "n_finetune": int(n_ft),
        "n_pretrain": int(len(same.x_pre)),
        "acc_same_task": accuracy(ctx, ft_a, same.x_test, same.y_test),
        "acc_different_task": accuracy(ctx, ft_b, other.x_test, other.y_test),
        "test_loss_same_task": _test_loss_mean(ctx, ft_a, same),
        "test_loss_different_task": _test_loss_mean(ctx, ft_b, other),
    }


def finetune_size(ctx):
    n = max(50, ctx.cfg.n_finetune // 2)
    out = {}
    scores = {}
    for label, mult in (("n", 1), ("3n", 3)):
        d = data(ctx, n_finetune=mult * n)
        pre, _, _ = train_pretrain(ctx, d, ctx.cfg.seed)
        ft, _ = finetune_updated(ctx, pre, d, ctx.cfg.seed, steps=mult * ctx.cfg.case2_finetune_steps)
        s = influence(ctx, pre, ft, d, "updated").scores
        scores[f"{label}: {len(d.x_ft)} examples, {mult * ctx.cfg.case2_finetune_steps} steps"] = s
        out[f"mean_abs_{label}"] = float(np.mean(np.abs(s)))
        out[f"n_finetune_{label}"] = int(len(d.x_ft))
    _hist(ctx, scores, "finetune_size", "Score distribution by finetuning size (case 2)")
    return out


def cross_task(ctx):
    d_a = data(ctx, finetune_classes=(4, 5, 6))
    d_b = data(ctx, finetune_classes=(7, 8, 9))
    pre, ft_a, emb = train_pretrain(ctx, d_a, ctx.cfg.seed)
    finetune_fixed(ctx, ft_a, d_a)
    s_a = influence(ctx, pre, ft_a, d_a, "fixed").scores
    ft_b = second_head(ctx, emb, d_b)
    idx = loo.top_by_magnitude(s_a, ctx.cfg.n_loo)
    actual = retrainer(ctx, pre, ft_b, d_b, "fixed").leave_one_out(idx, ctx.cache, progress=ctx.progress)
    pred = -s_a[idx] / len(d_a.x_pre)
    out = loo.correlation_report(
        pred, actual, ctx.out, "cross_task", "Scores for task 4-5-6 vs leave-one-out on task 7-8-9"
    )
    s_b = influence(ctx, pre, ft_b, d_b, "fixed").scores
    out["same_examples_own_task"] = loo.correlation(-s_b[idx] / len(d_b.x_pre), actual)
    return out


def figure3(ctx):
    m = main_case(ctx, "fixed")
    d = m["data"]
    pred = np.argmax(m["ft"].predict(d.x_test, verbose=0), axis=1)
    wrong = np.flatnonzero(pred != d.y_test)[:6]
    if len(wrong) == 0:
        return {"n_misclassified": 0, "path": None}
    res = influence(
        ctx, m["pre"], m["ft"], d, "fixed", test_target="each", x_test=d.x_test[wrong], y_test=d.y_test[wrong]
    )
    best = np.argmax(res.scores, axis=0)  # most harmful pretraining example per test point
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(wrong), figsize=(1.7 * len(wrong), 4.6), squeeze=False)
    ft_cls, pre_cls = np.array(d.finetune_classes), np.array(d.pretrain_classes)
    for j, (t, z) in enumerate(zip(wrong, best)):
        axes[0, j].imshow(d.x_test[t, :, :, 0], cmap="gray_r")
        axes[0, j].set_title(f"test '{ft_cls[d.y_test[t]]}'\npredicted '{ft_cls[pred[t]]}'", fontsize=7)
        axes[1, j].imshow(d.x_pre[z, :, :, 0], cmap="gray_r")
        axes[1, j].set_title(f"pretrain '{pre_cls[d.y_pre[z]]}'\nscore {res.scores[z, j]:+.2f}", fontsize=7)
        for a in axes[:, j]:
            a.axis("off")
    fig.suptitle("Misclassified finetune test images (top) and their most harmful pretraining image", fontsize=8)
    fig.tight_layout()
    path = os.path.join(ctx.out, "figure3.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {
        "n_misclassified": int(np.sum(pred != d.y_test)),
        "shown": int(len(wrong)),
        "path": path,
        "test_indices": wrong.tolist(),
        "pretrain_indices": best.tolist(),
    }


def _hist(ctx, groups: dict, name: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, s in groups.items():
        ax.hist(s, bins=40, alpha=0.55, label=f"{label}: mean |s| = {np.mean(np.abs(s)):.3g}")
    ax.set_xlabel("influence score (sum over the test set)")
    ax.set_ylabel("pretraining examples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(ctx.out, f"{name}.png"), dpi=120)
    plt.close(fig)


def text_multistage(ctx):
    """Text version of Section 4.1 (its own data and model; see :mod:`experiments.text_multistage`)."""
    from experiments import text_multistage as tm
    cfg = tm.TextConfig.quick() if ctx.cfg.quick else tm.TextConfig()
    r = tm.run(cfg, ctx.cache, progress=ctx.progress)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = ["cg", "ekfac", "identity"]
    fig, ax = plt.subplots(figsize=(4.2, 3))
    ax.bar(methods, [r[m]["pearson"] for m in methods], color=["C0", "C1", "C7"])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("Pearson r vs leave-one-out")
    ax.set_title(f"Text, case 1: {r['n_params']} parameters, top {r['n_examples']} examples", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(ctx.out, "text_multistage.png"), dpi=120)
    plt.close(fig)
    return r

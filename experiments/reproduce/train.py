"""Data and models of a reproduction run: small functions over its :class:`~.config.Context` (the
two-stage split, both stages' training, the influence call, the leave-one-out retrainer)."""

from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf

import tf_influence as tfi
from model_zoo import cnn as models, digits
from tf_influence.evaluation import loo, retraining

from .config import FINETUNE_HEAD_SEED_OFFSET


def data(ctx, finetune_classes=None, n_finetune="default", pretrain_classes=None, seed=None):
    """The two-stage split; ``n_finetune="default"`` = the configured size, ``None`` = all."""
    return digits.load_two_stage(
        ctx.cfg.dataset,
        pretrain_classes or digits.PRETRAIN_CLASSES,
        finetune_classes or digits.FINETUNE_CLASSES,
        n_finetune=ctx.cfg.n_finetune if n_finetune == "default" else n_finetune,
        seed=ctx.cfg.seed if seed is None else seed,
        data_dir=ctx.cfg.data_dir,
    )


def _trainer(ctx, model, x, y, group, steps, lr, weights=None):
    """Full-batch Adam on ``group`` of ``model`` (deterministic), optionally with example weights."""
    t = retraining.WeightedTrainer(tfi.Objective(model, models.sparse_ce()), x, y, group, "adam", lr)
    t.run(steps, weights)


def train_pretrain(ctx, d, seed, weights=None):
    """Pretraining model (W, U) trained to convergence; returns (pre, ft, emb) with a shared embedding."""
    pre, ft, emb = models.build_two_stage_models(
        d.x_pre.shape[1:], len(d.pretrain_classes), len(d.finetune_classes), seed=seed, l2=ctx.cfg.l2
    )
    _trainer(ctx, pre, d.x_pre, d.y_pre, tfi.ParameterGroup.from_model(pre, "(W,U)"), ctx.cfg.init_steps,
             ctx.cfg.init_lr, weights)
    return pre, ft, emb


def finetune_fixed(ctx, ft, d, steps=None, weights=None):
    W = tfi.group_from_layers(ft, ["embedding"])
    _trainer(ctx, ft, d.x_ft, d.y_ft, tfi.complement_group(ft, W), steps or ctx.cfg.init_steps, ctx.cfg.init_lr,
             weights)


def second_head(ctx, emb, d, weights=None, seed=None):
    """A fresh finetuning head on the shared (fixed) embedding, finetuned on ``d`` (optionally with
    finetuning example weights, the head initialised from ``seed``)."""
    if seed is not None:
        import keras
        keras.utils.set_random_seed(seed)
    head = models.build_head(int(emb.output_shape[-1]), len(d.finetune_classes), l2=ctx.cfg.l2, name="finetune_head")
    ft = models.attach_head(emb, head, "finetune_b")
    finetune_fixed(ctx, ft, d, weights=weights)
    return ft


def finetune_updated(ctx, pre, d, seed, steps=None):
    """Separate finetuning model: embedding copied from ``pre`` (W̄), head Θ₀ seeded; trains (W, Θ).

    Returns (ft, theta0)."""
    _, ft, emb = models.build_two_stage_models(
        d.x_pre.shape[1:],
        len(d.pretrain_classes),
        len(d.finetune_classes),
        seed=seed + FINETUNE_HEAD_SEED_OFFSET,
        l2=ctx.cfg.l2,
    )
    for dst, src in zip(emb.weights, tfi.group_from_layers(pre, ["embedding"]).variables):
        dst.assign(src)
    W = tfi.group_from_layers(ft, ["embedding"])
    theta0 = [v.numpy().copy() for v in tfi.complement_group(ft, W).tf_variables]
    _trainer(
        ctx,
        ft,
        d.x_ft,
        d.y_ft,
        tfi.ParameterGroup.from_model(ft, "all"),
        steps or ctx.cfg.case2_finetune_steps,
        ctx.cfg.case2_finetune_lr,
    )
    return ft, theta0


def influence(
    ctx,
    pre,
    ft,
    d,
    case,
    test_target="sum",
    x_test=None,
    y_test=None,
    identity=False,
    damping_pretrain=None,
    damping_finetune=None,
    alpha=None,
    solver="cg_squared",
    finetune_solver=None,
):
    pre_ds, ft_ds, test_ds = d.datasets()
    if x_test is not None:
        test_ds = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256)
    mk = lambda lam, method=solver: tfi.SolverConfig(  # noqa: E731
        method, damping=lam, tol=1e-5, iterative=tfi.IterativeOptions(max_iter=ctx.cfg.cg_iters, dtype=tf.float64)
    )
    c = ctx.cfg
    if damping_finetune is None:
        damping_finetune = c.damping_finetune if case == "fixed" else c.damping_finetune_case2
    args = tfi.InfluenceArgs(
        case=case,
        alpha=c.alpha if alpha is None else alpha,
        pretrain_solver=mk(c.damping_pretrain if damping_pretrain is None else damping_pretrain),
        finetune_solver=mk(damping_finetune, finetune_solver or solver),
        hessian_samples=c.hessian_samples,
        test_target=test_target,
    )
    kw = dict(embedding=["embedding"], progress=ctx.progress, args=args)
    pre_obj, ft_obj = tfi.Objective(pre, models.sparse_ce()), tfi.Objective(ft, models.sparse_ce())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tfi.SolverNotConvergedWarning)
        if identity:
            return tfi.identity_hessian_influence(pre_obj, pre_ds, ft_obj, ft_ds, test_ds, **kw)
        return tfi.multi_stage_influence(pre_obj, pre_ds, ft_obj, ft_ds, test_ds, **kw)


def retrainer(ctx, pre, ft, d, case, theta0=None, protocol=None):
    """The leave-one-out retrainer of a case (the configured protocol unless ``protocol`` is given)."""
    c = ctx.cfg
    if protocol is None and case == "fixed":
        protocol = loo.RetrainProtocol(
            case="fixed",
            pretrain_steps=c.loo_steps,
            finetune_steps=c.loo_steps,
            pretrain_lr=c.loo_lr,
            finetune_lr=c.loo_lr,
            optimizer="sgd",
        )
    elif protocol is None:
        protocol = loo.RetrainProtocol(
            case="updated",
            pretrain_steps=c.loo_steps,
            pretrain_lr=c.loo_lr,
            optimizer="sgd",
            finetune_optimizer="adam",
            finetune_steps=c.case2_finetune_steps,
            finetune_lr=c.case2_finetune_lr,
        )
    return loo.TwoStageRetrainer(
        pre,
        ft,
        models.sparse_ce(),
        ["embedding"],
        d.x_pre,
        d.y_pre,
        d.x_ft,
        d.y_ft,
        d.x_test,
        d.y_test,
        protocol,
        finetune_start_weights=theta0,
    )


def main_case(ctx, case):
    """The Section 4.1 setting (trained once per case and reused)."""
    if case not in ctx.main:
        d = data(ctx)
        pre, ft, emb = train_pretrain(ctx, d, ctx.cfg.seed)
        theta0 = None
        if case == "fixed":
            finetune_fixed(ctx, ft, d)
        else:
            ft, theta0 = finetune_updated(ctx, pre, d, ctx.cfg.seed)
        ctx.main[case] = dict(data=d, pre=pre, ft=ft, theta0=theta0)
    return ctx.main[case]


def accuracy(ctx, model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0, batch_size=512), axis=1) == y))

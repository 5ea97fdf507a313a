"""The linear datamodeling score experiment (``lds``): both stages retrained from scratch on random
subsets (a Beam job), every method's LDS with its noise floor, and ``lds.png``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

import tf_influence as tfi
from model_zoo import cnn as models
from tf_influence.evaluation import loo

from .config import Context, ReproConfig
from .train import (data, finetune_fixed, finetune_updated, influence, main_case, retrainer, second_head,
                    train_pretrain)


@dataclass
class DigitsRetrain:
    """One LDS retrain, picklable for Beam workers: ``(mask, seed) → test losses``.

    ``stage="pretrain"``, ``protocol="scratch"`` (TRAK's): pretrain from scratch (init seed
    ``cfg.seed + seed``) on the pretraining examples where ``mask`` is true, then finetune exactly
    as the original pipeline — case 1 (head on the fixed embedding) and case 2 (embedding and head,
    head Θ₀ from the case-2 seed); returns the case-1 losses of the measured test points followed by
    the case-2 losses. ``protocol="continue"``: the leave-one-out protocol of the correlation rows
    (gradient-descent continuation of both stages from the trained models, :func:`retrainer`) with
    the subset as example weights — deterministic, so ``seed`` is ignored.
    ``stage="finetune"`` (single-stage influence): the original pretrained embedding (seed
    ``cfg.seed``, all examples), a fresh head (init seed ``cfg.seed + seed``) finetuned on the
    finetuning examples where ``mask`` is true; returns the test losses."""

    cfg: ReproConfig
    stage: str = "pretrain"
    protocol: str = "scratch"

    def _setup(self):
        if getattr(self, "_ctx", None) is None:
            tf.config.experimental.enable_op_determinism()  # as the driver: same weights in every worker
            self._ctx = Context.__new__(Context)
            self._ctx.cfg = self.cfg
            self._ctx.main = {}
            self._d = data(self._ctx)
            k = self.cfg.lds_test_points
            self._test = (self._d.x_test[:k], self._d.y_test[:k])
            self._emb = None
            self._retrainers = None
        return self._ctx, self._d

    def _losses(self, model):
        return tfi.Objective(model, models.sparse_ce()).per_example_losses(*self._test).numpy()

    def __call__(self, mask, seed):
        ctx, d = self._setup()
        w = np.asarray(mask, np.float32)
        s = self.cfg.seed + int(seed)
        if self.stage == "pretrain" and self.protocol == "continue":
            if self._retrainers is None:
                self._retrainers = []
                for case in ("fixed", "updated"):
                    m = main_case(ctx, case)
                    self._retrainers.append(retrainer(ctx, m["pre"], m["ft"], d, case, m["theta0"]))
            return np.concatenate([rt.run(w, self._losses) for rt in self._retrainers])
        if self.stage == "pretrain":
            pre, ft, _ = train_pretrain(ctx, d, s, weights=w)
            finetune_fixed(ctx, ft, d)
            ft2, _ = finetune_updated(ctx, pre, d, s)
            return np.concatenate([self._losses(ft), self._losses(ft2)])
        if self._emb is None:
            self._emb = train_pretrain(ctx, d, self.cfg.seed)[2]
        return self._losses(second_head(ctx, self._emb, d, weights=w, seed=s))


def _lds_measure(ctx, stage, num_train, protocol="scratch", num_seeds=None):
    """``[num_seeds, num_subsets, outputs]`` retrain measurements (cached, Beam-parallel) and the masks."""
    from tf_influence.evaluation import lds
    c = ctx.cfg
    masks = lds.draw_subsets(num_train, c.lds_num_subsets, c.lds_alpha, seed=c.seed)
    key = "digits-{}-{}-{}".format(stage, protocol, loo._hash_arrays(np.frombuffer(json.dumps(
        {k: v for k, v in dataclasses.asdict(c).items() if k not in ("lds_workers", "lds_num_seeds", "sensitivity",
                                                                      "seeds", "n_loo", "cg_iters")},
        sort_keys=True, default=str).encode(), np.uint8)))
    beam = (None if c.lds_workers <= 0 else
            ["--direct_running_mode=multi_processing", f"--direct_num_workers={c.lds_workers}"])
    # experiments.reproduce.datamodels.DigitsRetrain: importable by Beam workers (nothing lives in __main__)
    retrain = DigitsRetrain(ReproConfig(**dataclasses.asdict(c)), stage, protocol)
    meas = lds.measure_subsets(retrain, masks, num_seeds or c.lds_num_seeds, ctx.cache, key, ctx.progress, beam,
                               per_seed=True)
    return masks, meas


def lds(ctx):
    """LDS of each score source on the digits protocol under two ground truths — retraining from
    scratch (TRAK's; several seeds, with its noise floor) and the leave-one-out rows' warm-started
    continuation (deterministic) — with 95 % CIs."""
    from tf_influence.evaluation import lds as L
    c = ctx.cfg
    t = c.lds_test_points
    m1, m2 = main_case(ctx, "fixed"), main_case(ctx, "updated")
    d = m1["data"]
    x_t, y_t = d.x_test[:t], d.y_test[:t]
    scores = {
        "case1_cg": ("fixed", influence(ctx, m1["pre"], m1["ft"], d, "fixed", "each", x_t, y_t).scores),
        "case1_ekfac": ("fixed", influence(ctx, m1["pre"], m1["ft"], d, "fixed", "each", x_t, y_t, solver="ekfac",
                                           finetune_solver="cg_squared").scores),
        "case1_identity": ("fixed", influence(ctx, m1["pre"], m1["ft"], d, "fixed", "each", x_t, y_t,
                                              identity=True).scores),
        "case2_cg": ("updated", influence(ctx, m2["pre"], m2["ft"], d, "updated", "each", x_t, y_t).scores),
        "case2_identity": ("updated", influence(ctx, m2["pre"], m2["ft"], d, "updated", "each", x_t, y_t,
                                                identity=True).scores),
        "pretraining_loss": ("fixed", np.repeat(tfi.pretraining_loss_scores(
            tfi.Objective(m1["pre"], models.sparse_ce()), d.datasets()[0])[:, None], t, axis=1)),
    }
    out = {"protocol": "scratch: retrain both stages from scratch on each subset (TRAK), seeds averaged; "
                       "continue: the leave-one-out rows' gradient-descent continuation with the subset as "
                       "example weights (deterministic)",
           "num_subsets": c.lds_num_subsets, "subset_fraction": c.lds_alpha, "num_seeds": c.lds_num_seeds,
           "num_test_points": t}
    for protocol, key, seeds in (("scratch", "methods", c.lds_num_seeds), ("continue", "methods_continue", 1)):
        masks, meas = _lds_measure(ctx, "pretrain", len(d.x_pre), protocol, seeds)     # [seeds, subsets, 2t]
        parts = {"fixed": meas[:, :, :t], "updated": meas[:, :, t:]}
        rows = {}
        for name, (case, sc) in scores.items():
            r = L.linear_datamodeling_score(sc, masks, parts[case].mean(0), c.lds_alpha, seeds)
            floor = L.seed_noise(parts[case]) if seeds > 1 else {"deterministic": True}
            rows[name] = {**r.summary(), "ground_truth": f"{protocol} ({case})", "noise_floor": floor}
        out[key] = rows
    # single-stage: finetuning examples, the head retrained from scratch on their subsets (embedding fixed)
    ft = m1["ft"]
    theta = tfi.complement_group(ft, tfi.group_from_layers(ft, ["embedding"]))
    _, ft_ds, _ = d.datasets()
    test_ds = tf.data.Dataset.from_tensor_slices((x_t, y_t)).batch(256)
    masks_ft, meas_ft = _lds_measure(ctx, "finetune", len(d.x_ft))
    noise_ft = L.seed_noise(meas_ft)
    for name, method in (("single_stage_cg", "cg"), ("single_stage_identity", "identity")):
        res = tfi.single_stage_influence(tfi.Objective(ft, models.sparse_ce()), ft_ds, test_ds, theta,
                                         tfi.SolverConfig(method, damping=c.damping_finetune, tol=1e-8,
                                                          iterative=tfi.IterativeOptions(max_iter=c.cg_iters,
                                                                                         dtype=tf.float64)),
                                         test_target="each")
        r = L.linear_datamodeling_score(res.scores, masks_ft, meas_ft.mean(0), c.lds_alpha, c.lds_num_seeds)
        out["methods"][name] = {**r.summary(), "ground_truth": "scratch (finetuning subsets, head only)",
                                "noise_floor": noise_ft}
    _lds_plot(ctx, out)
    return out


def _lds_plot(ctx, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = list(out["methods"])
    x = np.arange(len(names))
    for k, (key, label, color) in enumerate((("methods", "retrained from scratch (TRAK)", "C0"),
                                             ("methods_continue", "warm-started continuation", "C1"))):
        rows = out[key]
        mean = np.array([rows[n]["lds"] if n in rows else np.nan for n in names])
        lo = np.array([rows[n]["ci95"][0] if n in rows else np.nan for n in names])
        hi = np.array([rows[n]["ci95"][1] if n in rows else np.nan for n in names])
        ax.bar(x + (k - 0.5) * 0.38, mean, 0.38, yerr=np.nan_to_num(np.stack([mean - lo, hi - mean])), capsize=3,
               color=color, label=label)
    floor = [out["methods"][n]["noise_floor"].get("seed_to_seed_lds", np.nan) for n in names]
    ax.scatter(x - 0.19, floor, marker="_", s=300, color="C3", zorder=3,
               label="noise floor of the scratch retrains (seed-to-seed LDS)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x, names, rotation=30, fontsize=7)
    ax.set_ylabel("LDS (Spearman, mean ± 95 % CI)")
    ax.set_title(f"Digits: {out['num_subsets']} subsets (fraction {out.get('subset_fraction', out.get('alpha'))}), {out['num_test_points']} test points",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(ctx.out, "lds.png"), dpi=120)
    plt.close(fig)

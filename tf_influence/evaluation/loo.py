"""Leave-one-out ground truth for multi-stage influence, and the correlation report.

:class:`TwoStageRetrainer` re-runs pretraining and finetuning deterministically from fixed
starting weights with example weights (0 = removed), as in the paper's Appendix B: "remove an
example from pretraining dataset, then re-run the pretraining and finetuning process with this
leave-one-out pretraining dataset starting from the original models' weights". The true loss
difference of removing ``z`` is

    Δ(z) = L_test(protocol run without z) − L_test(the same protocol run with all examples)

so the drift of the continued training itself cancels; both runs share the minibatch order and
optimizer trajectory (see :mod:`retraining`). ``L_test`` is the sum of the finetuning test losses
(the test target of eq. 8). The protocol (:class:`RetrainProtocol`):

1. restore the original pretraining weights (W̄, Ū) and continue pretraining (W, U) for
   ``pretrain_steps`` steps (``mode="continue"``; paper: 100 steps on MNIST), or retrain until
   the gradient norm falls below ``grad_tol`` (``mode="converge"``, capped at ``max_steps``);
2. hand the new embedding to the finetuning model and finetune: case ``fixed`` trains Θ from
   the original finetuned head Θ* (W stays fixed); case ``updated`` re-runs finetuning of
   (W, Θ) from the new pretrained embedding and the finetuning start head Θ₀ — the pretrained
   embedding only enters case 2 as an initialisation, so the finetuning must be re-run from it.

:class:`LOOCache` persists results keyed by a hash of the protocol, the starting weights and
the data, so a rerun only computes what changed. :func:`correlation_report` writes the
Pearson / Spearman numbers (JSON) and a scatter plot like the paper's Figure 2 (PNG).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..compiled import function
from ..objective import Objective
from ..params import ParameterGroup, complement_group, group_from_layers
from .retraining import WeightedTrainer, restore, snapshot


#: The finetuning stage draws its minibatch order from ``seed + 1`` so that the two stages do not
#: share one permutation sequence (only matters with minibatches).
FINETUNE_ORDER_SEED_OFFSET = 1


@dataclass
class RetrainProtocol:
    """How a leave-one-out run retrains both stages (see module docstring)."""

    case: str = "fixed"
    mode: str = "continue"             # or "converge"
    pretrain_steps: int = 100
    finetune_steps: int = 100
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-3
    optimizer: str = "sgd"             # pretraining continuation ("sgd" = gradient descent, or "adam")
    finetune_optimizer: str | None = None  # default: same as `optimizer`
    pretrain_batch_size: int | None = None   # None = full batch
    finetune_batch_size: int | None = None
    grad_tol: float = 1e-5             # "converge" mode
    max_steps: int = 20000             # "converge" mode, per stage
    check_every: int = 100             # "converge" mode
    seed: int = 0

    def __post_init__(self):
        if self.case not in ("fixed", "updated"):
            raise ValueError(f"case must be 'fixed' or 'updated', got '{self.case}'")
        if self.mode not in ("continue", "converge"):
            raise ValueError(f"mode must be 'continue' or 'converge', got '{self.mode}'")


def _hash_arrays(*arrays) -> str:
    h = hashlib.sha1()
    for a in (leaf for arr in arrays for leaf in tf.nest.flatten(arr)):
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


class TwoStageRetrainer:
    """Deterministic two-stage retraining with pretraining example weights.

    Args:
      pretrain_model, finetune_model: the trained models (their current weights are the
        starting point of every run and are restored after each run).
      loss: the per-example loss of the pretraining stage (and of finetuning, unless
        ``finetune_loss`` is given).
      embedding: layer / sub-model name(s) of W in both models.
      x_pre, y_pre, x_ft, y_ft, x_test, y_test: the data of the two stages.
      protocol: :class:`RetrainProtocol`.
      finetune_start_weights: for case ``updated``, the finetuning head's starting weights Θ₀
        (a list of arrays for the head variables; default: the finetuned head Θ*).
    """

    def __init__(self, pretrain_model, finetune_model, loss, embedding, x_pre, y_pre, x_ft, y_ft, x_test, y_test,
                 protocol: RetrainProtocol, finetune_start_weights=None, finetune_loss=None):
        self.protocol = protocol
        self.pre, self.ft = pretrain_model, finetune_model
        self.pre_obj = Objective(pretrain_model, loss)
        self.ft_obj = Objective(finetune_model, finetune_loss if finetune_loss is not None else loss)
        self.W_pre = group_from_layers(pretrain_model, embedding, name="W (pretrain)")
        self.W_ft = group_from_layers(finetune_model, embedding, name="W (finetune)")
        self.Theta = complement_group(finetune_model, self.W_ft, name="Θ")
        self.shared = [id(v) for v in self.W_pre.tf_variables] == [id(v) for v in self.W_ft.tf_variables]
        self.x_test, self.y_test = tf.nest.map_structure(tf.constant, x_test), tf.constant(y_test)
        self.n_pre = len(y_pre)
        p = protocol
        self.pre_trainer = WeightedTrainer(self.pre_obj, x_pre, y_pre,
                                           ParameterGroup.from_model(pretrain_model, "(W,U)"),
                                           p.optimizer, p.pretrain_lr, p.pretrain_batch_size, p.seed)
        ft_group = self.Theta if p.case == "fixed" else ParameterGroup(
            "(W,Θ)", tuple(self.W_ft.variables) + tuple(self.Theta.variables))
        self.ft_trainer = WeightedTrainer(self.ft_obj, x_ft, y_ft, ft_group, p.finetune_optimizer or p.optimizer,
                                          p.finetune_lr,
                                          p.finetune_batch_size, p.seed + FINETUNE_ORDER_SEED_OFFSET)
        self.start_pre, self.start_ft = snapshot(pretrain_model), snapshot(finetune_model)
        self.theta_start = (list(finetune_start_weights) if finetune_start_weights is not None
                            else [v.numpy().copy() for v in self.Theta.tf_variables])
        self._test_loss = function(lambda: tf.reduce_sum(self.ft_obj.per_example_losses(self.x_test, self.y_test)))
        self.key = "-".join([
            hashlib.sha1(json.dumps(dataclasses.asdict(p), sort_keys=True).encode()).hexdigest()[:12],
            _hash_arrays(*self.start_pre, *self.start_ft, *self.theta_start),
            _hash_arrays(x_pre, y_pre, x_ft, y_ft, x_test, y_test)])
        self._reference = None
        self.runs = 0

    def test_loss(self) -> float:
        """Sum of the finetuning test losses of the finetuning model's current weights."""
        return float(self._test_loss())

    def _stage(self, trainer: WeightedTrainer, steps: int, weights=None):
        p = self.protocol
        if p.mode == "continue":
            trainer.run(steps, weights)
            return
        done = 0
        while done < p.max_steps:
            trainer.run(p.check_every, weights)
            done += p.check_every
            if trainer.gradient_norm(weights) < p.grad_tol:
                return

    def run(self, weights=None, measure=None):
        """One protocol run with pretraining example weights; returns L_test (or ``measure(finetune_model)``,
        e.g. every test point's loss for the LDS) and restores the start."""
        p = self.protocol
        try:
            restore(self.pre, self.start_pre)
            restore(self.ft, self.start_ft)
            self._stage(self.pre_trainer, p.pretrain_steps, weights)
            if not self.shared:  # hand the (re)pretrained embedding to the finetuning model
                for dst, src in zip(self.W_ft.tf_variables, self.W_pre.tf_variables):
                    dst.assign(src)
            if p.case == "updated":
                for v, val in zip(self.Theta.tf_variables, self.theta_start):
                    v.assign(val)
            self._stage(self.ft_trainer, p.finetune_steps)
            self.runs += 1
            return self.test_loss() if measure is None else measure(self.ft)
        finally:
            restore(self.pre, self.start_pre)
            restore(self.ft, self.start_ft)

    def reference(self) -> float:
        """L_test of the protocol run with every pretraining example (computed once)."""
        if self._reference is None:
            self._reference = self.run(None)
        return self._reference

    def loss_difference(self, index: int) -> float:
        """Δ of removing pretraining example ``index``."""
        w = np.ones(self.n_pre, np.float32)
        w[index] = 0.0
        return self.run(w) - self.reference()

    def leave_one_out(self, indices, cache: "LOOCache | None" = None, progress: bool = True) -> np.ndarray:
        """Δ for each index (cached results are reused; new ones are saved as they come)."""
        indices = [int(i) for i in indices]
        out = {}
        todo = []
        for i in indices:
            hit = cache.get(self.key, i) if cache is not None else None
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
        it = todo
        if progress and todo:
            from tqdm.auto import tqdm
            it = tqdm(todo, desc=f"leave-one-out retraining ({self.protocol.case})", leave=False)
        for i in it:
            out[i] = self.loss_difference(i)
            if cache is not None:
                cache.put(self.key, i, out[i])
        if cache is not None and todo:
            cache.save()
        return np.array([out[i] for i in indices])


class LOOCache:
    """JSON file of retraining results: ``{key: {index: value}}`` — a leave-one-out Δ, or (for the
    LDS) the measurements of every test point as a list."""

    def __init__(self, path: str):
        self.path = path
        self.data = {}
        if os.path.exists(path):
            with open(path) as fh:
                self.data = json.load(fh)
        self._dirty = 0

    def get(self, key: str, index: int):
        return self.data.get(key, {}).get(str(index))

    def put(self, key: str, index: int, value: float):
        self.data.setdefault(key, {})[str(index)] = (np.asarray(value, float).tolist() if np.ndim(value)
                                                      else float(value))
        self._dirty += 1
        if self._dirty >= 10:
            self.save()

    def save(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.data, fh)
        os.replace(tmp, self.path)
        self._dirty = 0


def top_by_magnitude(scores, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``|score|`` (the paper studies the top 100)."""
    return np.argsort(-np.abs(np.asarray(scores)))[:k]


def correlation(predicted, actual) -> dict:
    from scipy import stats
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    if len(predicted) < 3 or np.std(predicted) == 0 or np.std(actual) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "n_examples": int(len(predicted))}
    return {"pearson": float(stats.pearsonr(predicted, actual)[0]),
            "spearman": float(stats.spearmanr(predicted, actual)[0]),
            "n_examples": int(len(predicted))}


def correlation_report(predicted, actual, out_dir: str, name: str, title: str = "", extra: dict | None = None,
                       xlabel: str = "predicted loss difference (−score / m)") -> dict:
    """Pearson / Spearman of predicted vs actual loss differences; writes ``{name}.json`` and
    ``{name}.png`` (a scatter with the least-squares line, like the paper's Figure 2)."""
    os.makedirs(out_dir, exist_ok=True)
    stats_ = correlation(predicted, actual)
    record = {**stats_, **(extra or {}), "predicted": np.asarray(predicted, float).tolist(),
              "actual": np.asarray(actual, float).tolist()}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    p, a = np.asarray(predicted, float), np.asarray(actual, float)
    ax.scatter(p, a, s=12, alpha=0.7)
    if len(p) >= 2 and np.std(p) > 0:
        slope, icept = np.polyfit(p, a, 1)
        xs = np.linspace(p.min(), p.max(), 10)
        ax.plot(xs, slope * xs + icept, color="C3", lw=1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.ticklabel_format(style="sci", scilimits=(-2, 3), axis="both")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("actual loss difference (leave-one-out)")
    ax.set_title(f"{title}\nPearson r = {stats_['pearson']:.2f}, Spearman = {stats_['spearman']:.2f}, "
                 f"n = {stats_['n_examples']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=120)
    plt.close(fig)
    return stats_


__all__ = ["RetrainProtocol", "TwoStageRetrainer", "LOOCache", "top_by_magnitude", "correlation",
           "correlation_report"]

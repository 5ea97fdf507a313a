"""Influence scores: single-stage (Koh & Liang) and multi-stage (Chen et al., NeurIPS 2020).

Sign convention (one for the whole package)
------------------------------------------
A score is ``I_{z,x_t} = ∂ f(x_t, θ̂_ε) / ∂ε |_{ε=0}``: the derivative of the test loss when the
training loss of example ``z`` is up-weighted by ``ε`` (eq. 4 / 6). Removing ``z`` from a set of
``m`` examples is ``ε = −1/m``, so

* a **positive** score means the example *increases* the test loss: it is **harmful**
  (removing it is predicted to lower the test loss);
* a **negative** score means the example is **helpful**;
* :func:`predicted_loss_change_on_removal` gives the first-order change ``−score / m``.

Every score is computed in the efficient shape of Algorithm 1: the test side (the gradient of
the test target and the inverse-Hessian chains) is solved **once** into a vector ``s`` over the
pretraining parameters, and each training example costs one ``∇l(z) · s`` (:func:`score_examples`).
With ``test_target="sum"`` the test target is the sum of the test losses (eq. 8) and scores
are ``[m]``; with ``"each"`` every test point is its own right-hand side (multi-RHS solves) and
scores are a ``[m, k]`` matrix.

Case 1 (embedding fixed, Theorem 1, eq. 9–11, Algorithm 1)::

    b_Θ = ∇_Θ f(x_t),  b_W = ∇_W f(x_t)                     (finetune model at W*, Θ*)
    v_W = b_W − (∂²F/∂W∂Θ) (∂²F/∂Θ²)⁻¹ b_Θ                  (Algorithm 1, steps 2–3)
    s   = −(∂²G/∂(W,U)²)⁻¹ [v_W, 0]                          (step 4, with eq. 9's minus sign)
    I_{z,x_t} = ∇_{(W,U)} g(z) · s                           (step 5)

Algorithm 1 as printed drops the minus sign of eq. 9 in step 5; eq. 11 keeps it, and we follow
eq. 11 (checked against exact leave-one-out retraining in ``tests/tf_influence/test_convex_loo.py``).

Case 2 (embedding updated, α-proximal approximation, eq. 12–15): see
:meth:`MultiStageInfluence.test_vectors` for the derivation (eq. 12 is garbled in the paper).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
import tensorflow as tf

from .configs import JsonConfig
from .gradients import mean_gradient, per_example_dot, stack_per_example_gradients
from .hessian import HessianOperator
from .head_features import head_operator
from .objective import Objective, count_examples
from .params import (GroupSpec, ParameterGroup, ParameterGroupError, as_layer_list, check_groups_match, complement_group,
                     concat_groups, group_from_layers)
from .solvers import DEFAULT_FINETUNE_DAMPING, DEFAULT_PRETRAIN_DAMPING, SolverConfig, forget_factors, solve

TEST_TARGETS = ("sum", "each")
CASES = ("fixed", "updated")

#: Why solver "auto" keeps EK-FAC off the case-1 finetuning head (measured in the multi-stage reproduction).
HEAD_KRONECKER_REASON = ("case 'fixed' head: v_W = b_W − F_WΘ F_ΘΘ⁻¹ b_Θ nearly cancels and needs an accurate "
                         "head inverse (EK-FAC on both inverses: r = 0.08 against leave-one-out, CG 0.94)")


def _default_pretrain_solver() -> SolverConfig:
    return SolverConfig("auto", damping=DEFAULT_PRETRAIN_DAMPING)


def _default_finetune_solver() -> SolverConfig:
    return SolverConfig("auto", damping=DEFAULT_FINETUNE_DAMPING)


@dataclass
class InfluenceArgs(JsonConfig):
    """Every option of multi-stage influence, each default declared here once; passed whole from a
    CLI or a TFX component to :class:`MultiStageInfluence` (``to_json`` / ``from_json``).

    >>> args = InfluenceArgs(case="updated", pretrain_solver=SolverConfig("ekfac", damping=1e-4))
    >>> InfluenceArgs.from_json(args.to_json()) == args
    True
    >>> InfluenceArgs(hessian_sample=10)
    Traceback (most recent call last):
    ...
    TypeError: InfluenceArgs.__init__() got an unexpected keyword argument 'hessian_sample'
    """

    case: str = field(default="fixed", metadata={
        "help": "'fixed': finetuning kept the pretrained embedding W (eq. 9-11); 'updated': it was finetuned "
                "(eq. 12-15)"})
    alpha: float = field(default=0.01, metadata={"help": "case 'updated': the proximal weight α of eq. 12 "
                                                         "(paper: 0.01)"})
    pretrain_solver: SolverConfig = field(default_factory=_default_pretrain_solver, metadata={
        "help": "inverse of the pretraining Hessian ∂²G/∂(W,U)²"})
    finetune_solver: SolverConfig = field(default_factory=_default_finetune_solver, metadata={
        "help": "inverse of ∂²F/∂Θ² (case 'fixed') or of the eq. 15 block (case 'updated')"})
    hessian_samples: int | None = field(default=1000, metadata={
        "help": "pretraining examples of the pretraining Hessian, a fixed random subset (paper: 1,000); "
                "None = all"})
    hvp_mode: str | None = field(default=None, metadata={
        "help": "'fob' / 'rr' for every Hessian product; None: fob for square blocks, rr for the mixed block"})
    seed: int = field(default=0, metadata={"help": "seed of the Hessian subsample"})
    check_fixed_embedding: bool = field(default=True, metadata={
        "help": "case 'fixed': check that W has the same values in both models"})
    test_target: str = field(default="sum", metadata={
        "help": "'sum': score against the summed test loss (eq. 8); 'each': one column per test point"})
    memory_budget: str | None = field(default=None, metadata={
        "help": "memory the computation may allocate: bytes, '8GB', or a fraction of the available memory "
                "(None: 70 % of it, or $TF_INFLUENCE_MEMORY_BUDGET); both solvers choose within it unless their "
                "SolverConfig sets its own, and a request that cannot fit is refused before any work"})

    def __post_init__(self):
        for name in ("pretrain_solver", "finetune_solver"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, SolverConfig.from_dict(value))
            elif not isinstance(value, SolverConfig):
                raise TypeError(f"InfluenceArgs.{name} must be a SolverConfig (or its dict), "
                                f"got {type(value).__name__}")
        if self.case not in CASES:
            raise ValueError(f"case must be 'fixed' (embedding fixed in finetuning) or 'updated', got '{self.case}'")
        if self.case == "updated" and not self.alpha > 0:
            raise ValueError(f"case='updated' needs alpha > 0 (the proximal weight of eq. 12), got {self.alpha}")
        if self.hessian_samples is not None and int(self.hessian_samples) < 1:
            raise ValueError(f"hessian_samples must be ≥ 1 or None (all examples), got {self.hessian_samples}")
        if self.hvp_mode not in (None, "fob", "rr"):
            raise ValueError(f"hvp_mode must be None, 'fob' or 'rr', got '{self.hvp_mode}'")
        if self.test_target not in TEST_TARGETS:
            raise ValueError(f"test_target must be one of {TEST_TARGETS}, got '{self.test_target}'")
        from .memory import check_budget_value
        check_budget_value(self.memory_budget)

    def solver(self, which: str) -> SolverConfig:
        """``pretrain_solver`` / ``finetune_solver`` with :attr:`memory_budget` applied where the solver
        reads a budget and does not set its own."""
        from .solvers import SOLVER_FIELDS
        config = getattr(self, f"{which}_solver")
        if (self.memory_budget is not None and config.memory_budget is None
                and "memory_budget" in SOLVER_FIELDS[config.method]):
            return replace(config, memory_budget=self.memory_budget)
        return config

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["pretrain_solver"], out["finetune_solver"] = self.pretrain_solver.to_dict(), self.finetune_solver.to_dict()
        return out



#: the :class:`InfluenceArgs` fields that :class:`MultiStageInfluence` and the functional forms also took as
#: keywords (deprecated: ``args=InfluenceArgs(...)`` is the one form; removed in 0.4)
DEPRECATED_ARG_KEYWORDS = ("case", "alpha", "pretrain_solver", "finetune_solver", "hessian_samples", "hvp_mode",
                           "seed", "check_fixed_embedding")


def args_with_keywords(where: str, args: InfluenceArgs | None, keywords: dict, allowed=DEPRECATED_ARG_KEYWORDS
                       ) -> InfluenceArgs:
    """``args`` (default :class:`InfluenceArgs`) with the deprecated keyword forms of its fields applied, each
    with a ``DeprecationWarning`` naming ``args=InfluenceArgs(field=...)``; any other keyword is a ``TypeError``
    (as an unknown keyword of a signature is). A solver keyword given as ``None`` meant "the default"."""
    from .deprecation import typed_options, warn
    given = {k: v for k, v in keywords.items() if not (k.endswith("_solver") and v is None)}
    unknown = sorted(set(keywords) - set(allowed))
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument '{unknown[0]}'")
    for k in sorted(set(keywords) - set(given)):         # the old form, though None changes nothing
        warn(f"{where}({k}=...)", f"{where}(args=InfluenceArgs({k}=...))", stacklevel=4)
    return typed_options(where, InfluenceArgs, args, given, allowed)


def default_solvers(case: str = "fixed") -> tuple:
    """``(pretrain_solver, finetune_solver)``: the package's defaults (those of :class:`InfluenceArgs`) —
    ``solver="auto"`` (an exact eq. 16 solve for small blocks such as finetuning heads, EK-FAC for
    large pretraining Hessians: :func:`~tf_influence.solvers.auto_choice`) with
    :data:`DEFAULT_PRETRAIN_DAMPING` and :data:`DEFAULT_FINETUNE_DAMPING`. ``result.solves[...]["auto"]``
    records what was chosen."""
    args = InfluenceArgs(case=case)
    return args.pretrain_solver, args.finetune_solver


def as_measurement(measurement, model) -> Objective | None:
    """The test measurement as an :class:`Objective` of ``model`` (kronfluence's "measurement").

    ``measurement`` is ``None`` (use the training loss), an :class:`Objective`, or a per-example
    function ``fn(y_true, y_pred) -> [B]`` (e.g. a margin or one output), to which no
    regularisation is added."""
    if measurement is None or isinstance(measurement, Objective):
        return measurement
    if callable(measurement) or isinstance(measurement, str):
        return Objective(model, measurement, include_model_losses=False, name=f"measurement of {model.name}")
    raise TypeError(f"measurement must be an Objective or a function (y_true, y_pred) -> [B], got {measurement!r}")


def higher_is_better(measurement) -> bool:
    """Whether ``measurement`` (a function, an :class:`Objective` or a loss) is a quantity to raise — a
    log-probability (:func:`~tf_influence.lm.completion_log_probability`) — rather than a loss: its
    ``higher_is_better`` attribute, on it or on the :class:`Objective`'s loss. A score's sign means the same
    either way (positive: removing the example is predicted to *lower* the measurement); which side is
    "harmful" depends on this: for a loss the positive side, for a log-probability the negative one."""
    for m in (measurement, getattr(measurement, "loss", None)):
        if m is not None and bool(getattr(m, "higher_is_better", False)):
            return True
    return False


def predicted_loss_change_on_removal(scores, num_train: int):
    """First-order change of the test target when an example is removed (ε = −1/m): ``−score/m``."""
    return -np.asarray(scores) / float(num_train)


@dataclass
class InfluenceResult:
    """Scores of training examples (dataset order) and how they were obtained.

    ``save(directory)`` writes ``scores.npy``, ``test_vector.npy`` (the solved test side ``s``:
    the file the Beam scoring job reads with ``--vector``), and ``result.json`` (method, counts,
    solver diagnostics, timings and the :class:`~tf_influence.params.GroupSpec` of ``s``);
    ``InfluenceResult.load(directory)`` reads them back (``group`` is then ``None`` and
    ``group_spec`` rebuilds it on a model with :meth:`ParameterGroup.from_spec`).
    """

    scores: np.ndarray                 # [m] for test_target="sum", [m, k] for "each"
    test_vector: tf.Tensor             # s: scores = ∇l(z) · s, over `group`
    group: ParameterGroup | None       # the parameters s lives on (None after load)
    num_train: int
    method: str
    solves: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    group_spec: GroupSpec | None = None
    #: the measurement is a quantity to raise (a log-probability, :func:`higher_is_better`): the harmful
    #: examples are then those with the most negative scores
    higher_is_better: bool = False

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, "scores.npy"), np.asarray(self.scores))
        np.save(os.path.join(directory, "test_vector.npy"), np.asarray(self.test_vector))
        meta = {"method": self.method, "num_train": int(self.num_train), "solves": self.solves,
                "seconds": self.seconds, "group_spec": json.loads(self.group_spec.to_json()) if self.group_spec else None,
                "higher_is_better": bool(self.higher_is_better)}
        with open(os.path.join(directory, "result.json"), "w") as fh:
            json.dump(meta, fh, indent=1, default=float)
        return directory

    @classmethod
    def load(cls, directory: str) -> "InfluenceResult":
        path = os.path.join(directory, "result.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no saved InfluenceResult in {directory} (missing result.json)")
        with open(path) as fh:
            meta = json.load(fh)
        spec = GroupSpec.from_json(meta["group_spec"]) if meta.get("group_spec") else None
        return cls(np.load(os.path.join(directory, "scores.npy")),
                   tf.constant(np.load(os.path.join(directory, "test_vector.npy"))), None, meta["num_train"],
                   meta["method"], meta.get("solves", {}), meta.get("seconds", {}), spec,
                   bool(meta.get("higher_is_better", False)))

    def predicted_loss_change_on_removal(self):
        return predicted_loss_change_on_removal(self.scores, self.num_train)

    def _total(self):
        return self.scores if self.scores.ndim == 1 else self.scores.sum(axis=1)

    def top_harmful(self, k: int = 10) -> np.ndarray:
        """Indices of the ``k`` most harmful examples, those whose removal is predicted to improve the
        measurement: the largest positive scores for a loss (removal lowers it), the most negative for a
        quantity to raise (``higher_is_better``: a log-probability, which removal raises)."""
        sign = -1.0 if self.higher_is_better else 1.0
        return np.argsort(-sign * self._total(), kind="stable")[:k]

    def top_helpful(self, k: int = 10) -> np.ndarray:
        """Indices of the ``k`` most helpful examples, those whose removal is predicted to worsen the
        measurement (the other end of :meth:`top_harmful`)."""
        sign = -1.0 if self.higher_is_better else 1.0
        return np.argsort(sign * self._total(), kind="stable")[:k]


def _progress_cb(desc: str, enabled: bool, total: int):
    if not enabled:
        return None, lambda: None
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, leave=False)

    def cb(it, res):
        bar.update(1)
        bar.set_postfix(residual=f"{res:.2e}")
    return cb, bar.close


def _solve(op, b, config: SolverConfig, desc: str, progress: bool):
    cb, close = _progress_cb(desc, progress, config.iterative.max_iter)
    try:
        return solve(op, b, config, progress=cb)
    finally:
        close()


def test_gradients(objective: Objective, test_data, group: ParameterGroup, test_target: str = "sum"):
    """``b`` for the test target: ``∇ Σ_t f(x_t)`` (``[p]``) or one column per test point (``[p, k]``)."""
    if test_target not in TEST_TARGETS:
        raise ValueError(f"test_target must be one of {TEST_TARGETS}, got '{test_target}'")
    if test_target == "sum":
        return mean_gradient(objective, test_data, group, reduction="sum", name="test data")
    return tf.transpose(stack_per_example_gradients(objective, test_data, group, name="test data"))


def score_examples(objective: Objective, dataset, group: ParameterGroup, test_vector, progress: bool = False,
                   name: str = "training data") -> np.ndarray:
    """``I(z) = ∇l(z) · s`` for every example of ``dataset`` (the per-example half of Algorithm 1)."""
    return per_example_dot(objective, dataset, group, test_vector, progress=progress, name=name)


def single_stage_influence(objective: Objective, train_data, test_data, group: ParameterGroup | None = None,
                           solver: SolverConfig | None = None, measurement=None,
                           test_target: str = "sum", hessian_samples: int | None = None,
                           hvp_mode: str = "fob", seed: int = 0, progress: bool = False) -> InfluenceResult:
    """Koh & Liang influence ``I(z) = −∇f_test · H⁻¹ ∇l(z)`` of each training example on the test target.

    ``measurement`` (default: the training loss) is what is measured on the test points: an
    :class:`Objective` or a per-example function ``fn(y_true, y_pred)`` (see :func:`as_measurement`).
    ``solver`` defaults to ``SolverConfig("auto", damping=DEFAULT_FINETUNE_DAMPING)`` (never plain CG:
    a network's training Hessian is rarely positive definite)."""
    t0 = time.perf_counter()
    solver = solver or SolverConfig("auto", damping=DEFAULT_FINETUNE_DAMPING)
    if group is None:
        group = ParameterGroup.from_model(objective.model)
    measurement = as_measurement(measurement, objective.model) or objective
    b = test_gradients(measurement, test_data, group, test_target)
    H = HessianOperator(objective, train_data, group, mode=hvp_mode, hessian_samples=hessian_samples, seed=seed,
                        name=f"training Hessian of {objective.name}")
    res = _solve(H, b, solver, "IHVP (training Hessian)", progress)
    s = -res.x
    t1 = time.perf_counter()
    scores = score_examples(objective, train_data, group, s, progress=progress)
    t2 = time.perf_counter()
    m = H.num_examples if hessian_samples is None else count_examples(train_data, "training data", objective.model)
    return InfluenceResult(scores, s, group, m, "single_stage",
                           {"hessian": res.summary()}, {"test_side": t1 - t0, "scoring": t2 - t1},
                           group.spec(objective.model), higher_is_better(measurement))


def pretrain_head_group(model, W: ParameterGroup, pretrain_head=None) -> ParameterGroup | None:
    """U: the ``pretrain_head`` layers, or every parameter of the pretraining model outside W. May be
    ``None``: a tied-embedding language model (GPT-2's ``ReversibleEmbedding``) projects onto the
    vocabulary with W itself, so G depends on W alone and (W, U) is just W."""
    if as_layer_list(pretrain_head):
        return group_from_layers(model, pretrain_head, name="U")
    return complement_group(model, W, name="U", allow_empty=True)


def pretrain_group(W: ParameterGroup, U: ParameterGroup | None) -> ParameterGroup:
    """(W, U), the parameters the pretraining Hessian and the scores are over (W first)."""
    return concat_groups("(W,U)", W, U) if U is not None else concat_groups("(W,U)", W)


class MultiStageInfluence:
    """Multi-stage influence of pretraining examples on a finetuned model's test loss.

    Args:
      pretrain_objective: pretraining model (W, U) and its loss ``g``.
      pretrain_data: the pretraining examples ``Z`` (batched ``(x, y)``), scored in dataset order.
      finetune_objective: finetuning model (W, Θ) and its loss ``f``.
      finetune_data: the finetuning training data ``X`` (for ``∂²F``).
      embedding: the shared parameters W: layers / sub-models present in *both* models, as layer
        objects (``backbone``), names (``["embedding"]``) or paths (``"backbone/token_embedding"``),
        or a pair of :class:`ParameterGroup` ``(W_pretrain, W_finetune)``. Frozen layers count.
      pretrain_head: layers of U; default: every other parameter of the pretraining model. U may
        be empty (a tied-embedding LM whose output projection is W itself).
      finetune_head: layers of Θ; default: every other parameter of the finetuning model.
      measurement: what is measured on the test points (default: the finetuning loss ``f``); an
        :class:`Objective` of the finetuning model or a function ``fn(y_true, y_pred) -> [B]``.
      progress: progress bars on the solves and the scoring pass.
      args: :class:`InfluenceArgs`, every option in one typed object: ``case`` (``"fixed"``: finetuning
        kept W = W*, eq. 9–11; ``"updated"``: eq. 12–15 with the proximal weight ``alpha``, paper 0.01),
        ``pretrain_solver`` / ``finetune_solver`` (:class:`SolverConfig`; default ``solver="auto"`` with
        :data:`DEFAULT_PRETRAIN_DAMPING` / :data:`DEFAULT_FINETUNE_DAMPING`, :func:`default_solvers`),
        ``hessian_samples`` (pretraining examples of ``∂²G``, paper 1,000; ``None`` = all), ``hvp_mode``
        (``"fob"`` / ``"rr"`` for every Hessian product; ``None``: ``"fob"`` for the square blocks and
        ``"rr"`` for case 1's mixed block ``∂²F/∂W∂Θ``, whose inner gradient is then over the small head Θ
        only — on a 1 M-parameter keras-hub GPT-2 under a 6-class head: trace + first product 5.2 s instead
        of 14.5 s, then 1.3 s instead of 1.8 s; the products are equal either way), ``seed``,
        ``check_fixed_embedding`` (case 1: verify that W has the same values in both models),
        ``test_target`` (the default of :meth:`__call__`) and ``memory_budget``. Those fields given as
        keywords of this constructor (``case="updated"``) still work but are deprecated (removed in 0.4).

    Example::

        args = tfi.InfluenceArgs(case="updated", pretrain_solver=tfi.SolverConfig("ekfac"))
        ms = tfi.MultiStageInfluence(tfi.Objective(pre, pre_loss), pre_ds, tfi.Objective(ft, ft_loss), ft_ds,
                                     embedding=["embedding"], args=args)
        result = ms(test_ds)          # one set of Hessians, queried as often as needed
    """

    def __init__(self, pretrain_objective: Objective, pretrain_data, finetune_objective: Objective, finetune_data,
                 embedding, pretrain_head=None, finetune_head=None, measurement=None, progress: bool = False,
                 args: InfluenceArgs | None = None, **deprecated):
        self.args = args_with_keywords("MultiStageInfluence", args, deprecated)
        case, alpha, hessian_samples, hvp_mode, seed = (self.args.case, self.args.alpha, self.args.hessian_samples,
                                                        self.args.hvp_mode, self.args.seed)
        check_fixed_embedding = self.args.check_fixed_embedding
        self.case, self.alpha, self.progress = case, float(alpha), progress
        self.g, self.f = pretrain_objective, finetune_objective
        self.pretrain_data, self.finetune_data = pretrain_data, finetune_data
        self.pretrain_solver, self.finetune_solver = self.args.solver("pretrain"), self.args.solver("finetune")
        self.measurement = as_measurement(measurement, finetune_objective.model) or finetune_objective

        if isinstance(embedding, (tuple, list)) and len(embedding) == 2 and all(
                isinstance(e, ParameterGroup) for e in embedding):
            self.W_pre, self.W_ft = embedding
        else:
            self.W_pre = group_from_layers(pretrain_objective.model, embedding, name="W (pretrain model)")
            self.W_ft = group_from_layers(finetune_objective.model, embedding, name="W (finetune model)")
        check_groups_match(self.W_pre, self.W_ft)
        self.U = pretrain_head_group(pretrain_objective.model, self.W_pre, pretrain_head)
        self.Theta = (group_from_layers(finetune_objective.model, finetune_head, name="Θ")
                      if finetune_head is not None else complement_group(finetune_objective.model, self.W_ft,
                                                                         name="Θ"))
        if self.U is not None:
            self._check_disjoint(self.W_pre, self.U)
        self._check_disjoint(self.W_ft, self.Theta)
        if case == "fixed" and check_fixed_embedding:
            diff = float(tf.reduce_max(tf.abs(self.W_pre.values() - self.W_ft.values())))
            if diff > 1e-6:
                raise ParameterGroupError(
                    f"case='fixed' assumes finetuning kept the pretrained embedding, but W differs between the "
                    f"pretraining and finetuning models (max |ΔW| = {diff:.3g}); use case='updated' "
                    "or pass check_fixed_embedding=False")
        self.WU = pretrain_group(self.W_pre, self.U)
        self.num_pretrain = count_examples(pretrain_data, "pretraining data", pretrain_objective.model)
        square_mode, mixed_mode = (hvp_mode, hvp_mode) if hvp_mode is not None else ("fob", "rr")
        self.H_G = HessianOperator(pretrain_objective, pretrain_data, self.WU, mode=square_mode,
                                   hessian_samples=hessian_samples, seed=seed,
                                   name="pretraining Hessian ∂²G/∂(W,U)²", num_examples=self.num_pretrain)
        n_ft = count_examples(finetune_data, "finetuning data", finetune_objective.model)
        self.TW = concat_groups("(Θ,W)", self.Theta, self.W_ft)  # one pass gives both test gradients
        if case == "fixed":
            # over the frozen part's features, computed once (tf_influence.head_features): the solve's
            # products run the head only, not the backbone, where the model can be cut before Θ
            self.H_TT = head_operator(finetune_objective, finetune_data, self.Theta, mode=square_mode,
                                      name="finetuning Hessian ∂²F/∂Θ²", num_examples=n_ft)
            # solver "auto" does not pick EK-FAC here (an explicit method or kronecker_min still does)
            self.H_TT.avoid_kronecker = HEAD_KRONECKER_REASON
            self.H_WT = HessianOperator(finetune_objective, finetune_data, self.W_ft, self.Theta, mode=mixed_mode,
                                        name="mixed block ∂²F/∂W∂Θ", num_examples=n_ft)
        else:
            self._K_args = (finetune_objective, finetune_data, square_mode, n_ft)

    @property
    def K(self) -> HessianOperator:
        """Case 2's eq. 15 block ``[[F_ΘΘ, F_ΘW], [F_WΘ, F_WW + 2αI]]`` over (Θ, W), made when asked: its
        ``2α`` diagonal is a vector as long as the model (0.5 GB at GPT-2 small) and its fitted factors are as
        large as the pretraining ones, so the call's own operator goes with the finetuning solve instead of
        staying resident through the pretraining one."""
        return self._make_K()

    def _make_K(self, with_diagonal: bool = True) -> HessianOperator:
        """:attr:`K`; ``with_diagonal=False``: without its ``2α`` diagonal, for a memory plan (which reads the
        operator's size, group and data, not the diagonal)."""
        if self.case == "fixed":
            raise AttributeError("K is case 2's operator (case='updated'); case 1 has H_TT and H_WT")
        objective, data, mode, n = self._K_args
        diag = None
        if with_diagonal:
            diag = tf.concat([tf.zeros([self.Theta.size], self.TW.dtype),
                              tf.fill([self.W_ft.size], tf.cast(2.0 * self.alpha, self.TW.dtype))], 0)
        return HessianOperator(objective, data, self.TW, mode=mode, extra_diagonal=diag,
                               name="proximal finetuning Hessian (eq. 15)", num_examples=n)

    @staticmethod
    def _check_disjoint(a: ParameterGroup, b: ParameterGroup):
        shared = {id(v) for v in a.tf_variables} & {id(v) for v in b.tf_variables}
        if shared:
            raise ParameterGroupError(f"parameter groups '{a.name}' and '{b.name}' share {len(shared)} variable(s)")

    def test_vectors(self, test_data, test_target: str | None = None):
        """The test side of the score, solved once: ``s`` over (W, U) with ``I(z) = ∇g(z)·s``
        (``test_target`` default: ``args.test_target``).

        Case 1 — Algorithm 1 steps 1–4 with eq. 9's sign (see module docstring).

        Case 2 — derivation of eq. 12–15 (eq. 12 repeats its second line with the wrong
        left-hand side in the paper; this is what it must say). The approximated procedure is::

            W̄, Ū   = argmin_{W,U} G(W, U) + ε g(z, W, U)
            W*, Θ* = argmin_{W,Θ} α‖W − W̄‖² + F(W, Θ)

        Differentiating the finetuning optimality conditions ``∇_Θ F = 0`` and
        ``∇_W F + 2α (W − W̄) = 0`` in ε gives::

            K [dΘ/dε; dW/dε] = [0; 2α dW̄/dε],   K = [[F_ΘΘ, F_ΘW], [F_WΘ, F_WW + 2αI]]

        (eq. 15; the paper's matrix repeats F_ΘW in its first row and writes its transpose as F_ΘW),
        and ``dW̄/dε = −[(∂²G)⁻¹ ∇g(z)]_W`` (eq. 14). With ``b = [∇_Θ f; ∇_W f]`` at (W*, Θ*),
        eq. 13 gives ``I = bᵀ K⁻¹ [0; 2α dW̄/dε] = −(2α [K⁻¹ b]_W)ᵀ [(∂²G)⁻¹ ∇g(z)]_W``, so::

            y = K⁻¹ b,  s = −(∂²G/∂(W,U)²)⁻¹ [2α y_W, 0],  I(z) = ∇g(z)·s

        ``∂²G`` is taken at the pretrained (W̄, Ū) (the pretraining model's weights) and ``K`` at
        the finetuned (W*, Θ*) (the finetuning model's weights).

        Returns ``(s, solves, seconds)``.
        """
        test_target = test_target or self.args.test_target
        t0 = time.perf_counter()
        solves = {}
        # the finetuning side in a function of its own: its test gradients and intermediate vectors (each
        # as large as the model) are freed before the pretraining solve, which holds only its right-hand side
        rhs = self._pretrain_rhs(test_data, test_target, solves)
        r2 = _solve(self.H_G, rhs, self.pretrain_solver, "IHVP 2 (∂²G/∂(W,U)²)", self.progress)
        solves["pretrain"] = r2.summary()
        return -r2.x, solves, {"test_side": time.perf_counter() - t0}

    def _pretrain_rhs(self, test_data, test_target: str, solves: dict):
        """The right-hand side of the pretraining solve, ``[v_W, 0_U]`` (case 1: ``v_W = ∇_W f −
        ∂²F/∂W∂Θ (∂²F/∂Θ²)⁻¹ ∇_Θ f``; case 2: ``2α [K⁻¹ b]_W``), recording the finetuning solve in ``solves``."""
        b = test_gradients(self.measurement, test_data, self.TW, test_target)
        first = self.H_TT if self.case == "fixed" else self.K     # case 2's is this call's own (see K)
        # factors fitted for the finetuning solve (case 2's K over the whole backbone: as large as the
        # pretraining ones, 2 GB of host arrays at GPT-2 small) are dropped as soon as the solve returns, before
        # the right-hand side is assembled — they were the peak of case 2 there — and not kept: the two sets
        # are never held at once; a second call refits them (a pass over the finetuning data)
        if self.case == "fixed":
            rhs, b_W = (tf.gather(b, self.TW.slices(g), axis=0) for g in (self.Theta, self.W_ft))
            desc = "IHVP 1 (∂²F/∂Θ²)"
        else:
            rhs, desc = b, "IHVP 1 (eq. 15 block)"
        del b
        r1 = _solve(first, rhs, self.finetune_solver, desc, self.progress)
        del rhs
        forget_factors(first)
        solves["finetune"] = r1.summary()
        if self.case == "fixed":
            v_W = b_W - self.H_WT.matvec(r1.x)
        else:
            v_W = 2.0 * self.alpha * tf.gather(r1.x, self.TW.slices(self.W_ft), axis=0)
        del r1, first
        u_size = self.U.size if self.U is not None else 0
        zeros_U = tf.zeros([u_size] + ([] if v_W.shape.rank == 1 else [v_W.shape[1]]), self.WU.dtype)
        return tf.concat([tf.cast(v_W, self.WU.dtype), zeros_U], axis=0)

    def memory_plan(self, test_data=None, test_target: str | None = None):
        """The :class:`~tf_influence.memory.MemoryPlan` of a whole call — test gradients, both solves
        (``auto`` resolved within the budget), the scoring pass — from the models and the arguments,
        before anything is computed. :meth:`__call__` checks it against ``args.memory_budget``."""
        from .memory import MemoryPlan
        from .solvers import solve_plan
        test_target = test_target or self.args.test_target
        k = 1 if test_target == "sum" or test_data is None else count_examples(test_data, "test data", self.f.model)
        plan = MemoryPlan(f"multi-stage influence (case '{self.case}')")
        # the test gradients and the finetuning solve's vectors are freed before the pretraining solve, which
        # holds its right-hand side through the factor passes
        plan.add("right-hand side of the pretraining solve", self.WU.size * k * self.WU.dtype.size,
                 f"[{self.WU.size}, {k}]")
        first = self.H_TT if self.case == "fixed" else self._make_K(with_diagonal=False)   # no 0.5 GB diagonal
        if getattr(first, "held_bytes", 0):      # the frozen part's features (tf_influence.head_features)
            plan.add("finetuning features held for the head's products", first.held_bytes,
                     f"{first.num_examples} examples")
        method_f, plan_f = solve_plan(first, self.finetune_solver, k)
        method_g, plan_g = solve_plan(self.H_G, self.pretrain_solver, k)
        # the finetuning solve is over (its factors forgotten) before the pretraining one starts: its phases come
        # first, and only its TensorFlow memory stays in the allocator's high-water mark after them (case 2: its
        # factors, host memory, counted as held through the pretraining fit planned 14.1 GB for a measured
        # 10.0 GB peak at GPT-2 small)
        plan_f.add("test gradients over (Θ, W)", self.TW.size * k * self.TW.dtype.size * 3, f"[{self.TW.size}, {k}] × 3")
        plan.add_phases(plan_f, f"finetuning solve ({method_f})")
        # the pretraining solve's factors exist from its fit on, through the scoring (not during the finetuning
        # solve: counted there, they planned 12.2 GB for case 2's measured 9.1 GB at GPT-2 small)
        plan.add_phases(plan_g, f"pretraining solve ({method_g})", held_into=("scoring",))
        plan.suggest(*plan_g.options, *plan_f.options)
        plan.add("scoring (forward-mode tangents over (W, U))", self.WU.size * self.WU.dtype.size * 3 * min(k, 4),
                 f"[{self.WU.size}] × 3 per column", phase="scoring")
        return plan

    def __call__(self, test_data, test_target: str | None = None, score_data=None) -> InfluenceResult:
        """Scores of every pretraining example (or of ``score_data``) on the test target; the call's
        memory plan (:meth:`memory_plan`) is checked first."""
        test_target = test_target or self.args.test_target
        self.memory_plan(test_data, test_target).check(self.args.memory_budget)
        s, solves, seconds = self.test_vectors(test_data, test_target)
        t0 = time.perf_counter()
        data = score_data if score_data is not None else self.pretrain_data
        scores = score_examples(self.g, data, self.WU, s, progress=self.progress, name="pretraining data")
        seconds["scoring"] = time.perf_counter() - t0
        return InfluenceResult(scores, s, self.WU, self.num_pretrain, f"multi_stage_{self.case}", solves, seconds,
                               self.WU.spec(self.g.model), higher_is_better(self.measurement))


def multi_stage_influence(pretrain_objective, pretrain_data, finetune_objective, finetune_data, test_data,
                          embedding, pretrain_head=None, finetune_head=None, measurement=None, progress: bool = False,
                          args: InfluenceArgs | None = None, **deprecated) -> InfluenceResult:
    """Functional form of :class:`MultiStageInfluence` (see there for the arguments): the options are ``args``
    (an :class:`InfluenceArgs`; ``args.test_target`` says whether the summed test loss or each test point is
    scored)."""
    args = args_with_keywords("multi_stage_influence", args, deprecated, DEPRECATED_ARG_KEYWORDS + ("test_target",))
    ms = MultiStageInfluence(pretrain_objective, pretrain_data, finetune_objective, finetune_data, embedding,
                             pretrain_head=pretrain_head, finetune_head=finetune_head, measurement=measurement,
                             progress=progress, args=args)
    return ms(test_data)

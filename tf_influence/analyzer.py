"""The front door: declare the models once in a :class:`Task`, then ask an :class:`Analyzer` — it fits
curvature factors, computes influence and self-influence scores, and keeps each result by name under
one output directory (kronfluence's ``Task`` / ``Analyzer`` workflow, over this package's functions).

>>> import keras, numpy as np, tensorflow as tf, tempfile
>>> import tf_influence as tfi
>>> keras.utils.set_random_seed(0)
>>> x = keras.Input((4,))
>>> emb = keras.layers.Dense(3, name="embedding")
>>> pre = keras.Model(x, keras.layers.Dense(2, name="pre_head")(emb(x)))
>>> ft = keras.Model(x, keras.layers.Dense(2, name="ft_head")(emb(x)))
>>> data = lambda n, s: tf.data.Dataset.from_tensor_slices((np.random.default_rng(s).normal(size=(n, 4)),
...                                                          np.arange(n) % 2)).batch(8)
>>> task = tfi.Task(pre, ft, "sparse_categorical_crossentropy", "sparse_categorical_crossentropy",
...                 embedding=["embedding"])
>>> analyzer = tfi.Analyzer(task, tempfile.mkdtemp(), progress=False)
>>> result = analyzer.influence("first_test", data(24, 0), data(16, 1), data(4, 2))
>>> result.scores.shape
(24,)
>>> bool(np.allclose(analyzer.load_scores("first_test").scores, result.scores))
True

What the analyzer writes (``output_dir``)::

    factors/<name>/          KFACFactors of fit_factors(name, ...)  (+ factor_args.json)
    scores/<name>/           InfluenceResult of influence(name, ...) (+ influence_args.json)
    self_influence/<name>/   scores.npy + meta.json of self_influence(name, ...)
    index/<name>/            the gradient index of build_index(name, ...) (+ index_args.json); query_index

A name already computed is loaded, not recomputed (``overwrite=True`` recomputes); the arguments it
was computed with are compared with the ones asked for, and a mismatch raises instead of returning
scores of another configuration.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace

import numpy as np

from .configs import JsonConfig
from .kfac.products import DEFAULT_PRODUCT_DTYPE, PRODUCT_DTYPE_HELP, PRODUCT_DTYPES
from .influence import InfluenceArgs, InfluenceResult, MultiStageInfluence
from .objective import Objective


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


from . import provenance  # noqa: E402
from .provenance import AnalyzerError, StaleResultError  # noqa: E402,F401 (the front door's errors)


@dataclass
class FactorArgs(JsonConfig):
    """How :meth:`Analyzer.fit_factors` fits Kronecker-factored curvature (:func:`~tf_influence.kfac.fit_factors`).

    >>> FactorArgs.from_json(FactorArgs(kind="kfac", hessian_samples=500).to_json())
    FactorArgs(kind='kfac', fisher='true', max_examples=None, seed=0, hessian_samples=500, dense_factor_max=None, memory_budget=None, covariance_max_examples=None, product_dtype='auto')
    """

    kind: str = field(default="ekfac", metadata={"help": "'ekfac' (eigenvalue-corrected) or 'kfac'",
                                                 "choices": ("ekfac", "kfac")})
    fisher: str = field(default="true", metadata={"help": "'true' (labels sampled from the model) or 'empirical'",
                                                  "choices": ("true", "empirical")})
    max_examples: int | None = field(default=None, metadata={
        "help": "fit both passes on the first N examples only (a streaming cap, as kronfluence's "
                "covariance_max_examples and lambda_max_examples together: shuffle the data first; None: all)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampled labels and of the hessian_samples subset"})
    # added last, so positional FactorArgs(kind, fisher, max_examples, seed) calls keep their meaning
    hessian_samples: int | None = field(default=None, metadata={
        "help": "fit on a fixed random subset of N examples, drawn by the rule of InfluenceArgs.hessian_samples "
                "(tf_influence.objective.subsample with `seed`; None: all)"})
    dense_factor_max: int | None = field(default=None, metadata={
        "help": "a factor side larger than this (a vocabulary) is kept diagonal (None: "
                "tf_influence.kfac.DENSE_FACTOR_MAX, 4,096)"})
    memory_budget: str | None = field(default=None, metadata={
        "help": "memory the fit may allocate: bytes, '8GB' or a fraction of the available memory (None: 70 % of "
                "it); a fit whose plan exceeds it is refused before the first pass"})
    covariance_max_examples: int | None = field(default=None, metadata={
        "help": "EK-FAC: fit the covariances (the eigenbases) on the first N examples of those the fit sees, the "
                "eigenvalue correction still on all of them (kronfluence's covariance_max_examples; None: all)"})
    product_dtype: str = field(default=DEFAULT_PRODUCT_DTYPE, metadata={"help": PRODUCT_DTYPE_HELP,
                                                                      "choices": PRODUCT_DTYPES})

    def __post_init__(self):
        from .kfac.products import check_product_dtype
        check_product_dtype(self.product_dtype, "FactorArgs.product_dtype")
        from .kfac import FISHERS, KINDS
        if self.kind not in KINDS:
            raise ValueError(f"FactorArgs.kind must be one of {KINDS}, got '{self.kind}'")
        if self.fisher not in FISHERS:
            raise ValueError(f"FactorArgs.fisher must be one of {FISHERS}, got '{self.fisher}'")
        for what in ("max_examples", "covariance_max_examples"):
            if getattr(self, what) is not None and getattr(self, what) < 1:
                raise ValueError(f"FactorArgs.{what} must be ≥ 1 or None, got {getattr(self, what)}")
        if self.covariance_max_examples is not None and self.kind != "ekfac":
            raise ValueError("FactorArgs.covariance_max_examples applies to kind='ekfac' (K-FAC's eigenvalues come "
                             "from the covariances): use max_examples")
        if self.hessian_samples is not None and self.hessian_samples < 1:
            raise ValueError(f"FactorArgs.hessian_samples must be ≥ 1 or None, got {self.hessian_samples}")
        if self.dense_factor_max is not None and self.dense_factor_max < 1:
            raise ValueError(f"FactorArgs.dense_factor_max must be ≥ 1 or None, got {self.dense_factor_max}")
        from .memory import check_budget_value
        check_budget_value(self.memory_budget)
        if self.hessian_samples is not None and self.max_examples is not None:
            raise ValueError("FactorArgs: give hessian_samples (a random subset) or max_examples (the first N), "
                             "not both")



@dataclass
class Task:
    """The models and what to ask of them, declared once.

    Args:
      pretrain_model: the pretraining model (W, U).
      finetune_model: the finetuned model (W, Θ); ``None`` for self-influence / single-model use.
      pretrain_loss: a Keras loss (object, name or ``fn(y_true, y_pred)``), or an
        :class:`~tf_influence.objective.Objective`; ``None``: the model's compiled loss.
      finetune_loss: the same for the finetuned model.
      embedding: the shared parameters W (layer objects, names or Keras paths present in both models).
      pretrain_head: U (default: everything in the pretraining model outside W).
      finetune_head: Θ (default: everything in the finetuned model outside W).
      measurement: what is measured on the test points (default: the finetuning loss; e.g.
        :func:`tf_influence.lm.completion_log_probability` for a causal LM).
      si_layers: the layer set K of self-influence (default ``None``: every layer of the pretraining
        model with parameters, as in the rest of the library; name ``embedding`` for the paper's K).

    Subclass and override :meth:`pretrain_objective` / :meth:`finetune_objective` for an objective
    that a loss alone cannot express (regularisers, sample weights).
    """

    pretrain_model: object
    finetune_model: object = None
    pretrain_loss: object = None
    finetune_loss: object = None
    embedding: object = None
    pretrain_head: object = None
    finetune_head: object = None
    measurement: object = None
    si_layers: object = None

    @staticmethod
    def _objective(model, loss, which):
        if isinstance(loss, Objective):
            return loss
        if loss is None:
            loss = getattr(model, "loss", None)
            if loss is None:
                raise AnalyzerError(f"Task: no {which}_loss given and the {which} model '{model.name}' is not "
                                    "compiled with one")
        return Objective(model, loss)

    def pretrain_objective(self) -> Objective:
        return self._objective(self.pretrain_model, self.pretrain_loss, "pretrain")

    def finetune_objective(self) -> Objective:
        if self.finetune_model is None:
            raise AnalyzerError("Task has no finetune_model: multi-stage influence needs the finetuned model")
        return self._objective(self.finetune_model, self.finetune_loss, "finetune")


class Analyzer:
    """Fits factors and computes scores for a :class:`Task`, each result kept by name under ``output_dir``.

    Args:
      task: the :class:`Task`.
      output_dir: where the results live (created if missing).
      args: the :class:`~tf_influence.influence.InfluenceArgs` of :meth:`influence` (default: the
        package defaults); a call may pass its own.
      progress: progress bars on the long loops.
    """

    def __init__(self, task: Task, output_dir: str, args: InfluenceArgs | None = None, progress: bool = True):
        if not isinstance(task, Task):
            raise TypeError(f"Analyzer needs a tf_influence.Task, got {type(task).__name__}")
        self.task, self.output_dir, self.progress = task, str(output_dir), progress
        self.args = args or InfluenceArgs()
        os.makedirs(self.output_dir, exist_ok=True)
        self._pre = self._ft = None

    # -- objectives (built once: their compiled kernels are reused across calls) ----------------------
    @property
    def pretrain_objective(self) -> Objective:
        if self._pre is None:
            self._pre = self.task.pretrain_objective()
        return self._pre

    @property
    def finetune_objective(self) -> Objective:
        if self._ft is None:
            self._ft = self.task.finetune_objective()
        return self._ft

    def _dir(self, kind: str, name: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise AnalyzerError(f"result name {name!r} must be letters, digits, '_', '-', '.' (a directory name "
                                "under the output directory), not starting with '.' or '-'")
        return os.path.join(self.output_dir, kind, name)

    @staticmethod
    def _check_same(directory: str, filename: str, wanted: str, what: str):
        path = os.path.join(directory, filename)
        if os.path.exists(path):
            with open(path) as fh:
                saved = fh.read()
            if json.loads(saved) != json.loads(wanted):
                raise AnalyzerError(f"{what} in {directory} was computed with other arguments ({saved}); "
                                    "choose another name or pass overwrite=True")

    # -- factors --------------------------------------------------------------------------------------
    def fit_factors(self, name: str, pretrain_data, factor_args: FactorArgs | None = None, overwrite: bool = False):
        """(E)K-FAC factors of the pretraining Hessian over ``(W, U)``, saved as ``factors/<name>``;
        pass ``factors_name=name`` to :meth:`influence` to invert ``∂²G`` with them."""
        from .kfac import KFACFactors, dense_factor_limit, fit_factors
        factor_args = factor_args or FactorArgs()
        directory = self._dir("factors", name)
        saved_args = os.path.join(directory, "factor_args.json")
        group = self.pretrain_group()
        prov = lambda: provenance.record({"pretrain": (self.task.pretrain_model, group)},   # noqa: E731
                                         {"pretrain": pretrain_data}, {"factor_args": factor_args.to_dict()})
        if os.path.exists(saved_args) and not overwrite:
            with open(saved_args) as fh:
                saved = fh.read()
            if FactorArgs.from_json(saved) != factor_args:      # fields added since then take their defaults
                raise AnalyzerError(f"factors '{name}' in {directory} were computed with other arguments ({saved}); "
                                    "choose another name or pass overwrite=True")
            provenance.check(directory, prov(), f"factors '{name}'")
            return KFACFactors.load(directory)
        record = prov()
        if factor_args.hessian_samples is not None:     # the one subsampling rule (as the Hessian's)
            from .objective import subsample
            pretrain_data = subsample(pretrain_data, factor_args.hessian_samples, seed=factor_args.seed,
                                      name="pretraining data")
        factors = fit_factors(self.pretrain_objective, pretrain_data, group, kind=factor_args.kind,
                              fisher=factor_args.fisher, seed=factor_args.seed, progress=self.progress,
                              name="pretraining data", max_examples=factor_args.max_examples,
                              dense_factor_max=dense_factor_limit(factor_args.dense_factor_max),
                              memory_budget=factor_args.memory_budget,
                              covariance_max_examples=factor_args.covariance_max_examples,
                              product_dtype=factor_args.product_dtype)
        factors.save(directory)
        with open(os.path.join(directory, "factor_args.json"), "w") as fh:
            fh.write(factor_args.to_json())
        provenance.save(directory, record)
        return factors

    def load_factors(self, name: str):
        from .kfac import KFACFactors
        directory = self._dir("factors", name)
        path = os.path.join(directory, provenance.PROVENANCE_FILE)
        if os.path.exists(path):        # factors of other weights are refused (their data may differ: a subset)
            with open(path) as fh:
                saved = json.load(fh)["models"].get("pretrain")
            now = provenance.weights_fingerprint(self.task.pretrain_model, self.pretrain_group())
            if saved != now:
                raise StaleResultError(f"factors '{name}' in {directory} were fitted on other weights of the "
                                       f"pretraining model (fingerprint {saved} → {now}); refit them "
                                       "(fit_factors(..., overwrite=True)) or choose another name")
        return KFACFactors.load(directory)

    def pretrain_group(self):
        """(W, U) of the pretraining model — what the pretraining Hessian and the scores are over
        (the whole model when the task names no embedding)."""
        from .influence import pretrain_group, pretrain_head_group
        from .params import group_from_layers
        model = self.task.pretrain_model
        if self.task.embedding is None:
            return _whole(model)
        W = group_from_layers(model, self.task.embedding, name="W (pretrain model)")
        return pretrain_group(W, pretrain_head_group(model, W, self.task.pretrain_head))

    # -- multi-stage influence ------------------------------------------------------------------------
    def _influence(self, pretrain_data, finetune_data, args: InfluenceArgs) -> MultiStageInfluence:
        t = self.task
        if t.embedding is None:
            raise AnalyzerError("Task.embedding (the shared parameters W) is needed for multi-stage influence")
        return MultiStageInfluence(self.pretrain_objective, pretrain_data, self.finetune_objective, finetune_data,
                                   t.embedding, pretrain_head=t.pretrain_head, finetune_head=t.finetune_head,
                                   measurement=t.measurement, progress=self.progress, args=args)

    def influence(self, name: str, pretrain_data, finetune_data, test_data, args: InfluenceArgs | None = None,
                  factors_name: str | None = None, overwrite: bool = False) -> InfluenceResult:
        """Multi-stage influence of every pretraining example on ``test_data`` (the task's measurement),
        saved as ``scores/<name>``. ``factors_name``: invert the pretraining Hessian with the factors of
        :meth:`fit_factors` (the damping stays ``args.pretrain_solver.damping``)."""
        args = args or self.args
        directory = self._dir("scores", name)
        record = json.dumps({"influence_args": json.loads(args.to_json()), "factors": factors_name}, sort_keys=True)

        def prov():   # both models' weights, the three datasets, the arguments
            return provenance.record({"pretrain": (self.task.pretrain_model, None),
                                      "finetune": (self.task.finetune_model, None)},
                                     {"pretrain": pretrain_data, "finetune": finetune_data, "test": test_data},
                                     json.loads(record))
        if os.path.exists(os.path.join(directory, "result.json")) and not overwrite:
            self._check_same(directory, "influence_args.json", record, f"scores '{name}'")
            provenance.check(directory, prov(), f"scores '{name}'")
            return InfluenceResult.load(directory)
        run_args = args
        if factors_name is not None:
            factors = self.load_factors(factors_name)
            run_args = replace(args, pretrain_solver=args.pretrain_solver.with_factors(factors))
        result = self._influence(pretrain_data, finetune_data, run_args)(test_data, args.test_target)
        result.save(directory)
        with open(os.path.join(directory, "influence_args.json"), "w") as fh:
            fh.write(record)
        provenance.save(directory, prov())     # the datasets' fingerprints come from the call's counting passes
        return result

    def load_scores(self, name: str) -> InfluenceResult:
        return InfluenceResult.load(self._dir("scores", name))

    # -- self-influence -------------------------------------------------------------------------------
    def self_influence(self, name: str, data, si_layers=None, method: str = "ghost",
                       overwrite: bool = False, memory_budget=None) -> np.ndarray:
        """TracIn self-influence ``‖∇_K l(z)‖²`` of every example of ``data`` under the pretraining
        objective (:func:`~tf_influence.tracin.self_influence`), saved as ``self_influence/<name>``.
        ``si_layers`` defaults to ``Task.si_layers``, then the whole model; ``memory_budget`` as the
        function's (the pass is planned first)."""
        from .tracin import self_influence
        layers = si_layers if si_layers is not None else self.task.si_layers
        group = _whole(self.task.pretrain_model) if layers is None else layers
        directory = self._dir("self_influence", name)
        record = json.dumps({"si_layers": _describe(layers), "method": method}, sort_keys=True)

        def prov():
            return provenance.record({"pretrain": (self.task.pretrain_model, None)}, {"pretrain": data},
                                     json.loads(record))
        if os.path.exists(os.path.join(directory, "scores.npy")) and not overwrite:
            self._check_same(directory, "meta.json", record, f"self-influence '{name}'")
            provenance.check(directory, prov(), f"self-influence '{name}'")
            return np.load(os.path.join(directory, "scores.npy"))
        scores = self_influence(self.pretrain_objective, data, group, progress=self.progress, method=method,
                                memory_budget=memory_budget)
        current = prov()
        if current["datasets"]["pretrain"]["size"] != len(scores):     # the data changed under the pass
            raise StaleResultError(f"self-influence '{name}': {len(scores)} scores for a dataset of "
                                   f"{current['datasets']['pretrain']['size']} examples")
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, "scores.npy"), scores)
        with open(os.path.join(directory, "meta.json"), "w") as fh:
            fh.write(record)
        provenance.save(directory, current)
        return scores

    def load_self_influence(self, name: str) -> np.ndarray:
        path = os.path.join(self._dir("self_influence", name), "scores.npy")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no self-influence scores named '{name}' under {self.output_dir}")
        return np.load(path)


    # -- gradient index ----------------------------------------------------------------------------
    def build_index(self, name: str, pretrain_data, projection_args=None, keys=None, batch_size: int | None = None,
                    overwrite: bool = False, memory_budget=None):
        """A gradient index (:mod:`tf_influence.index`) of the pretraining examples over ``(W, U)`` —
        the parameters of :meth:`influence`'s test vectors —, saved as ``index/<name>``; kept when its
        projection arguments and the model's weights (fingerprint) are unchanged. ``memory_budget``:
        :func:`~tf_influence.index.build_index`'s (the calibration and the corpus pass are planned first)."""
        from .index import INDEX_FILE, GradientIndex, build_index
        from .projection import ProjectionArgs
        projection_args = projection_args or ProjectionArgs()
        directory = self._dir("index", name)
        # the weights' fingerprint is in the provenance (a change is named as such, not as other arguments)
        record = json.dumps({"projection_args": json.loads(projection_args.to_json()), "keys": keys is not None},
                            sort_keys=True)
        def prov():
            return provenance.record({"pretrain": (self.task.pretrain_model, self.pretrain_group())},
                                     {"pretrain": pretrain_data}, json.loads(record))
        if os.path.exists(os.path.join(directory, INDEX_FILE)) and not overwrite:
            self._check_same(directory, "index_args.json", record, f"index '{name}'")
            provenance.check(directory, prov(), f"index '{name}'")
            return GradientIndex(directory)
        index = build_index(self.pretrain_objective, pretrain_data, directory, self.pretrain_group(),
                            projection_args, keys=keys, progress=self.progress, name="pretraining data",
                            batch_size=batch_size, memory_budget=memory_budget)
        with open(os.path.join(directory, "index_args.json"), "w") as fh:
            fh.write(record)
        current = prov()
        if current["datasets"]["pretrain"]["size"] != index.count:
            raise StaleResultError(f"index '{name}': {index.count} examples indexed from a dataset of "
                                   f"{current['datasets']['pretrain']['size']}")
        provenance.save(directory, current)
        return index

    def query_index(self, name: str, query, args=None, **options):
        """Top-k helpful / harmful pretraining examples from the index ``name`` (:meth:`build_index`).
        ``query``: an :class:`~tf_influence.influence.InfluenceResult` (its test vector(s) ``s``, laid
        out by its group spec — e.g. :meth:`influence`'s or :meth:`load_scores`'), or an array over
        :meth:`pretrain_group`. ``args``: :class:`~tf_influence.index.QueryArgs` (its fields as keywords are
        deprecated)."""
        from .index import INDEX_FILE, GradientIndex
        from .params import ParameterGroup
        directory = self._dir("index", name)
        stamp = os.path.getmtime(os.path.join(directory, INDEX_FILE)) if os.path.exists(
            os.path.join(directory, INDEX_FILE)) else None
        cached = self.__dict__.setdefault("_indexes", {}).get(name)
        if cached is None or cached[0] != stamp:       # loaded once (its projector too) while the files stand
            cached = (stamp, GradientIndex(directory))
            self._indexes[name] = cached
        index = cached[1]
        model = self.task.pretrain_model
        if isinstance(query, InfluenceResult):
            if query.group_spec is None:
                raise AnalyzerError("the InfluenceResult has no group spec: its test vector cannot be placed")
            group = ParameterGroup.from_spec(model, query.group_spec.to_json())
            vectors = np.asarray(query.test_vector)
        else:
            group, vectors = self.pretrain_group(), np.asarray(query)
        from dataclasses import replace

        from .index import _query_args
        args = _query_args(args, options, "Analyzer.query_index")
        if isinstance(query, InfluenceResult) and query.higher_is_better:   # its sides named for its measurement
            args = replace(args, higher_is_better=True)
        return index.query(self.pretrain_objective, vectors, args, vector_group=group)


def _whole(model):
    from .params import ParameterGroup
    return ParameterGroup.from_model(model)


def _describe(layers) -> object:
    """A JSON-able description of a layer set (names / paths), for the saved record."""
    if layers is None:
        return None
    from .params import as_layer_list
    return [getattr(x, "path", None) or getattr(x, "name", None) or str(x) for x in as_layer_list(layers)]


__all__ = ["Analyzer", "AnalyzerError", "FactorArgs", "Task"]

"""InfluenceScorer: multi-stage influence of every pretraining example on a finetuned model's test loss.

Inputs: ``pretrain_examples`` and ``finetune_examples`` (Examples; the latter with a training
and a test split), ``pretrain_model`` and ``finetune_model`` (Model artifacts whose
``Format-Serving`` directory holds ``model.keras``, as written by the trainer modules of
``pipelines/``; one line in a Trainer's ``run_fn``: ``tfx_components.saving.save_for_influence``),
optionally ``schema`` / ``transform_graph`` (the model inputs and label come from them, as for
SelfInfluenceScorer; raw examples pass through the Transform graph). Parameters: ``embedding``
(layer names of W, present in both models; default: the layers with parameters the finetuned
model shares with the pretrained one, by name and shape), ``label_key`` / ``key_feature`` /
``feature_spec`` (optional, as for SelfInfluenceScorer: derived label, file-and-position
identity, a hand-written spec of ``tfx_components.example_io``), ``influence_args`` (a
``tf_influence.InfluenceArgs``, serialised whole: case, α, both solvers with their dampings,
``hessian_samples``, seed — the library's defaults unless set), ``finetune_train_split`` /
``test_split``, ``test_keys`` (JSON list: score
against these test examples only; default the sum over the whole test split, eq. 8),
``loss`` (Keras loss config JSON; default the models' compiled losses). Optional input
``pretrain_factors`` (KFACFactors from ``FactorFitter`` over the pretraining Examples and model):
the pretraining Hessian ∂²G/∂(W,U)² is then inverted with those (E)K-FAC factors (the solver's
kind is the factors'), and the driver reads no pretraining corpus. Optional input ``index`` (a
GradientIndex of the pretraining Examples from ``GradientIndexer``): the scores come from the index
(``⟨P∇g(z), Ps⟩``, the same ``s`` projected) instead of a Beam pass over the corpus, and with
``query_args`` (a ``tf_influence.index.QueryArgs``, serialised whole) every test point is also its own
query — its ``top_k`` most harmful / helpful pretraining examples in ``Split-<split>/top_k.json``, from
the index's ``backend``, and with ``rerank = R`` re-scored exactly over its R best candidates (one
streamed pass over the split, computing the candidates' gradients only). ``precondition`` must stay
``"none"``: the multi-stage test vectors already hold both inverse Hessians. (``index_top_k = k``, the
0.3 development form, still works: ``QueryArgs(top_k=k)``, with a ``DeprecationWarning``.)

The driver computes the test-side vector once (both IHVP chains, ``MultiStageInfluence.test_vectors``);
the per-example products run in Beam with the vector as a side input, over the (W, U) group
rebuilt in every worker from its serialised ``GroupSpec`` (also recorded on the output). Output: ``scores``
(InfluenceScores, ``score_kind = multi_stage_<case>``) for every pretraining split, with the
solver diagnostics and a score summary in its custom properties.
"""

import json
from typing import TYPE_CHECKING, Optional, Union

import tf_influence as tfi

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import channel_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from tfx_components import component_specs as specs
from tfx_components.artifacts import GradientIndex, InfluenceScores, KFACFactors
from tfx_components.influence_scorer import executor

if TYPE_CHECKING:
    from tf_influence.index import QueryArgs


class InfluenceScorerSpec(types.ComponentSpec):
    PARAMETERS = {
        **specs.example_parameters(),
        **specs.scoring_parameters(),
        specs.EMBEDDING_KEY: ExecutionParameter(type=str, optional=True),
        specs.INFLUENCE_ARGS_KEY: ExecutionParameter(type=str),
        specs.FINETUNE_TRAIN_SPLIT_KEY: ExecutionParameter(type=str),
        specs.TEST_SPLIT_KEY: ExecutionParameter(type=str),
        specs.TEST_KEYS_KEY: ExecutionParameter(type=str, optional=True),
        specs.QUERY_ARGS_KEY: ExecutionParameter(type=str, optional=True),
    }
    INPUTS = {specs.PRETRAIN_EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
              specs.FINETUNE_EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
              specs.PRETRAIN_MODEL_KEY: ChannelParameter(type=standard_artifacts.Model),
              specs.FINETUNE_MODEL_KEY: ChannelParameter(type=standard_artifacts.Model),
              specs.PRETRAIN_FACTORS_KEY: ChannelParameter(type=KFACFactors, optional=True),
              **specs.transform_inputs(),
              specs.INDEX_KEY: ChannelParameter(type=GradientIndex, optional=True)}
    OUTPUTS = {specs.SCORES_KEY: ChannelParameter(type=InfluenceScores)}


class InfluenceScorer(base_beam_component.BaseBeamComponent):
    """Multi-stage influence (Chen et al. 2020) of every pretraining example on the finetuned
    model's test loss, as an InfluenceScores artifact. The parameters are described in the module
    docstring; ``influence_args`` is a :class:`tf_influence.InfluenceArgs`, passed whole.

    Example (pretraining and finetuning Trainers upstream — the finetuning one built on the
    pretrained model, ``Trainer(base_model=...)``, with its embedding frozen or not)::

        import tf_influence as tfi
        from tfx_components.influence_scorer.component import InfluenceScorer

        scorer = InfluenceScorer(
            pretrain_examples=pre_gen.outputs["examples"], finetune_examples=ft_gen.outputs["examples"],
            pretrain_model=pre_trainer.outputs["model"], finetune_model=ft_trainer.outputs["model"],
            transform_graph=transform.outputs["transform_graph"],   # inputs and label from the graph
            influence_args=tfi.InfluenceArgs(case="fixed", hessian_samples=1000),
            finetune_train_split="train", test_split="eval")   # W: the layers both models share

    ``pipelines/penguin_pipeline.py --two-stage`` runs this under ``LocalDagRunner``.
    """
    SPEC_CLASS = InfluenceScorerSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, pretrain_examples: types.BaseChannel, finetune_examples: types.BaseChannel,
                 pretrain_model: types.BaseChannel, finetune_model: types.BaseChannel,
                 feature_spec: Optional[dict] = None, embedding=None, influence_args: Optional[Union["tfi.InfluenceArgs", dict]] = None,
                 finetune_train_split: str = "train", test_split: str = "test", test_keys=None,
                 loss: Optional[dict] = None, batch_size: int = 256,
                 pretrain_factors: Optional[types.BaseChannel] = None, schema: Optional[types.BaseChannel] = None,
                 transform_graph: Optional[types.BaseChannel] = None, label_key: Optional[str] = None,
                 key_feature: Optional[str] = None, index: Optional[types.BaseChannel] = None,
                 index_top_k: Optional[int] = None, query_args: Optional[Union["QueryArgs", dict]] = None,
                 **deprecated):
        args = influence_args_from(influence_args, deprecated)
        query = query_args_from(query_args, index_top_k, index is not None)
        spec = InfluenceScorerSpec(
            pretrain_examples=pretrain_examples, finetune_examples=finetune_examples, pretrain_model=pretrain_model,
            finetune_model=finetune_model, feature_spec=json.dumps(feature_spec) if feature_spec else None,
            embedding=json.dumps(list(embedding)) if embedding is not None else None, schema=schema,
            transform_graph=transform_graph, label_key=label_key, key_feature=key_feature, index=index,
            query_args=query.to_json() if query is not None else None,
            influence_args=args.to_json(), finetune_train_split=finetune_train_split, test_split=test_split,
            test_keys=json.dumps([k if isinstance(k, str) else k.decode() for k in test_keys]) if test_keys else None,
            loss=json.dumps(loss) if loss else None, batch_size=batch_size, pretrain_factors=pretrain_factors,
            scores=channel_utils.as_channel([InfluenceScores()]))
        super().__init__(spec=spec)


def query_args_from(query_args, index_top_k, has_index: bool) -> "Optional[QueryArgs]":
    """The component's :class:`tf_influence.index.QueryArgs` (an object or its dict), or ``None`` (no
    per-test lists); the deprecated ``index_top_k = k`` is ``QueryArgs(top_k=k)``. Options that cannot
    apply to multi-stage test vectors, or a query without an index, are refused."""
    from tf_influence.index import QueryArgs
    if index_top_k:
        if query_args is not None:
            raise TypeError("InfluenceScorer: pass query_args=QueryArgs(top_k=...) or the deprecated index_top_k, "
                            "not both")
        from tf_influence.deprecation import warn
        warn("InfluenceScorer(index_top_k=k)", "query_args=tf_influence.index.QueryArgs(top_k=k)", stacklevel=4)
        query_args = QueryArgs(top_k=int(index_top_k))
    if query_args is None:
        return None
    if isinstance(query_args, dict):
        query_args = QueryArgs.from_dict(query_args)
    if not isinstance(query_args, QueryArgs):
        raise TypeError(f"query_args must be a tf_influence.index.QueryArgs or its dict, got "
                        f"{type(query_args).__name__}")
    if not has_index:
        raise ValueError("InfluenceScorer: query_args answers queries against a GradientIndex; give the index "
                         "input (GradientIndexer's output) too")
    if query_args.precondition != "none":
        raise ValueError(f"InfluenceScorer: QueryArgs.precondition='{query_args.precondition}' would precondition "
                         "the multi-stage test vectors again — they already hold both inverse Hessians; use "
                         "'none'")
    if query_args.all_scores:
        raise ValueError("InfluenceScorer: QueryArgs.all_scores is not an option here — every pretraining "
                         "example's score is always written")
    return query_args


#: The 0.2 keyword arguments of ``InfluenceScorer`` and where they live now (one release of grace).
DEPRECATED_ARGUMENTS = ("case", "alpha", "damping_pretrain", "damping_finetune", "solver", "max_iter",
                        "hessian_samples")


def influence_args_from(influence_args, deprecated: dict) -> "tfi.InfluenceArgs":
    """The :class:`tf_influence.InfluenceArgs` of the component: ``influence_args`` (an object or its
    dict), with the deprecated 0.2 keywords (``case=``, ``damping_pretrain=``, ``solver=`` …) folded in
    under a ``DeprecationWarning``; any other keyword raises."""
    unknown = sorted(set(deprecated) - set(DEPRECATED_ARGUMENTS))
    if unknown:
        raise TypeError(f"InfluenceScorer got unexpected keyword argument(s) {unknown}")
    if isinstance(influence_args, dict):
        args = tfi.InfluenceArgs.from_dict(influence_args)
    elif influence_args is None:
        args = tfi.InfluenceArgs()
    elif isinstance(influence_args, tfi.InfluenceArgs):
        args = influence_args
    else:
        raise TypeError(f"influence_args must be a tf_influence.InfluenceArgs or its dict, got "
                        f"{type(influence_args).__name__}")
    given = {k: v for k, v in deprecated.items() if v is not None}
    if not given:
        return args
    from tf_influence.deprecation import warn
    warn(f"InfluenceScorer({', '.join(f'{k}=' for k in given)})", "influence_args=tf_influence.InfluenceArgs(...)",
         stacklevel=4)
    import dataclasses
    top = {k: given[k] for k in ("case", "alpha", "hessian_samples") if k in given}
    solver = {}
    if "solver" in given:
        solver["method"] = given["solver"]
    if "max_iter" in given:
        solver["max_iter"] = int(given["max_iter"])
    pre = args.pretrain_solver.replace(**solver, **({"damping": float(given["damping_pretrain"])}
                                                    if "damping_pretrain" in given else {}))
    ft = args.finetune_solver.replace(**solver, **({"damping": float(given["damping_finetune"])}
                                                  if "damping_finetune" in given else {}))
    return dataclasses.replace(args, pretrain_solver=pre, finetune_solver=ft, **top)

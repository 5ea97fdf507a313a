"""FactorFitter: (E)K-FAC curvature factors of a model over an Examples artifact, as a Beam combiner.

Inputs: ``examples`` (Examples: the corpus the curvature is taken over, e.g. the pretraining data),
``model`` (Model whose ``Format-Serving`` directory holds ``model.keras``), optionally ``schema`` /
``transform_graph`` (the model's inputs and label derived from them as for the scorers, with
``label_key``; a hand-written ``feature_spec`` of ``tfx_components.example_io`` overrides). Parameters: ``layers`` (JSON
list of layer names whose variables are covered; default every trainable variable — what
``InfluenceScorer`` needs for the pretraining Hessian ∂²G/∂(W,U)²), ``kind`` (``ekfac`` / ``kfac``),
``fisher`` (``true``: labels sampled from the model; ``empirical``: the observed labels), ``splits``
(JSON list, default all), ``loss`` (Keras loss config JSON, default the compiled loss),
``batch_size``, ``seed``, ``product_dtype`` (``auto``, the default / ``bfloat16`` / ``model``: the dtype of the
passes' large products, as ``tf_influence.kfac.fit_factors``'), ``memory_budget`` (``FactorArgs.memory_budget``:
``"8GB"``, a fraction such as ``"0.5"``, default a fraction of each worker's available memory — every Beam worker
checks the fit's memory plan against it before its first pass, ``tfx_components.beam_factors``).

Output: ``factors`` (KFACFactors artifact). The driver only loads the model to check the layers;
both passes (covariances, then the EK-FAC eigenvalue correction) run in the Beam workers
(``tfx_components.beam_factors``) and only their sums are combined. Feed the artifact to
``InfluenceScorer(pretrain_factors=...)`` to replace the CG solve of the pretraining Hessian.
"""

import json
from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import channel_utils
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from tf_influence.kfac.products import DEFAULT_PRODUCT_DTYPE
from tfx_components import component_specs as specs
from tfx_components.artifacts import KFACFactors
from tfx_components.factor_fitter import executor


class FactorFitterSpec(types.ComponentSpec):
    PARAMETERS = {
        **specs.example_parameters(key_feature=False),
        **specs.scoring_parameters(),
        specs.LAYERS_KEY: ExecutionParameter(type=str, optional=True),
        "kind": ExecutionParameter(type=str),
        "fisher": ExecutionParameter(type=str),
        specs.SPLITS_KEY: ExecutionParameter(type=str, optional=True),
        "seed": ExecutionParameter(type=int, optional=True),
        "product_dtype": ExecutionParameter(type=str, optional=True),
        "memory_budget": ExecutionParameter(type=str, optional=True),
    }
    INPUTS = specs.examples_and_model()
    OUTPUTS = {specs.FACTORS_KEY: ChannelParameter(type=KFACFactors)}


class FactorFitter(base_beam_component.BaseBeamComponent):
    """(E)K-FAC factors of ``model`` over ``examples``, fitted by a Beam combiner, as a KFACFactors
    artifact for ``InfluenceScorer(pretrain_factors=...)``. The parameters are described in the
    module docstring.

    Example::

        from tfx_components.factor_fitter.component import FactorFitter

        factors = FactorFitter(examples=pre_gen.outputs["examples"], model=pre_trainer.outputs["model"],
                               kind="ekfac")   # inputs derived as for the scorers; or schema= / transform_graph=
        scorer = InfluenceScorer(..., pretrain_factors=factors.outputs["factors"])
    """
    SPEC_CLASS = FactorFitterSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(self, examples: types.BaseChannel, model: types.BaseChannel, feature_spec: Optional[dict] = None,
                 layers=None, kind: str = "ekfac", fisher: str = "true", splits=None, loss: Optional[dict] = None,
                 batch_size: int = 256, seed: int = 0, schema: Optional[types.BaseChannel] = None,
                 transform_graph: Optional[types.BaseChannel] = None, label_key: Optional[str] = None,
                 product_dtype: str = DEFAULT_PRODUCT_DTYPE, memory_budget=None):
        from tf_influence.kfac.products import check_product_dtype
        from tf_influence.memory import check_budget_value
        check_product_dtype(product_dtype)
        check_budget_value(memory_budget)
        if kind not in ("ekfac", "kfac"):
            raise ValueError(f"kind must be 'ekfac' or 'kfac', got '{kind}'")
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher must be 'true' or 'empirical', got '{fisher}'")
        if isinstance(layers, str):
            raise ValueError("layers must be a list of layer names")
        spec = FactorFitterSpec(
            examples=examples, model=model, feature_spec=json.dumps(feature_spec) if feature_spec else None,
            schema=schema, transform_graph=transform_graph, label_key=label_key,
            layers=json.dumps(list(layers)) if layers else None, kind=kind, fisher=fisher,
            splits=json.dumps(list(splits)) if splits else None, loss=json.dumps(loss) if loss else None,
            batch_size=batch_size, seed=seed, product_dtype=product_dtype,
            memory_budget=None if memory_budget is None else str(memory_budget),
            factors=channel_utils.as_channel([KFACFactors()]))
        super().__init__(spec=spec)

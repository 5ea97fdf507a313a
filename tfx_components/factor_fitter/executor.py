"""Beam executor of FactorFitter: the two passes of ``tf_influence.kfac.FactorStatistics`` over the
splits (``tfx_components.beam_factors``), the factors written into the output artifact."""

import json

from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils

from tf_influence.kfac.products import DEFAULT_PRODUCT_DTYPE
from tfx_components import component_specs as specs
from tfx_components import beam_factors, beam_scoring, common


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict, output_dict, exec_properties):
        import tf_influence as tfi
        from tf_influence import kfac
        examples = artifact_utils.get_single_instance(input_dict[specs.EXAMPLES_KEY])
        model = artifact_utils.get_single_instance(input_dict[specs.MODEL_KEY])
        out = artifact_utils.get_single_instance(output_dict[specs.FACTORS_KEY])
        e = exec_properties
        splits = json.loads(e[specs.SPLITS_KEY]) if e.get(specs.SPLITS_KEY) else artifact_utils.decode_split_names(examples.split_names)
        path = common.model_path(model)
        # fail early, in the driver, with the artifact named: model file and layers
        keras_model = beam_scoring.load_keras_model(path)
        try:
            group = (tfi.group_from_layers(keras_model, json.loads(e[specs.LAYERS_KEY]), name="factors")
                     if e.get("layers") else tfi.ParameterGroup.from_model(keras_model))
            kfac.kronecker_blocks(keras_model, group)
        except (tfi.ParameterGroupError, ValueError) as err:
            raise ValueError(f"Model artifact {model.uri}: {err}") from None
        group_spec = group.spec(keras_model).to_json()
        spec = common.feature_spec(e, input_dict, keras_model, examples, splits[0])
        patterns = [common.split_pattern(examples, s) for s in splits]

        def build(p):
            beam_factors.fit_factors(p, patterns, path, spec, out.uri, group_spec=group_spec, kind=e["kind"],
                                     fisher=e["fisher"], seed=int(e.get("seed") or 0), loss_config=e.get(specs.LOSS_KEY),
                                     batch_size=specs.batch_size(e), product_dtype=e.get("product_dtype") or DEFAULT_PRODUCT_DTYPE,
                                     memory_budget=e.get("memory_budget") or None)

        common.run_beam(self, build, f"FactorFitter on Examples artifact {examples.uri} with Model artifact "
                                     f"{model.uri}")
        factors = kfac.KFACFactors.load(out.uri)
        out.set_string_custom_property("kind", factors.kind)
        out.set_string_custom_property("fisher", factors.fisher)
        out.set_int_custom_property("num_examples", int(factors.num_examples))
        out.set_string_custom_property("group_spec", group_spec)
        out.set_string_custom_property("summary", json.dumps(factors.summary(), sort_keys=True))

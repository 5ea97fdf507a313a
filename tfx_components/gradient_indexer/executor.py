"""Beam executor of GradientIndexer: ``tfx_components.beam_index.index_examples`` per split."""

import json
import os

from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils

from tfx_components import component_specs as specs
from tfx_components import beam_index, common, example_io


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict, output_dict, exec_properties):
        import tf_influence as tfi
        from tf_influence.index import GradientIndex
        from tf_influence.projection import ProjectionArgs
        examples = artifact_utils.get_single_instance(input_dict[specs.EXAMPLES_KEY])
        model = artifact_utils.get_single_instance(input_dict[specs.MODEL_KEY])
        out = artifact_utils.get_single_instance(output_dict[specs.INDEX_KEY])
        e = exec_properties
        args = ProjectionArgs.from_json(e["projection_args"])
        splits = json.loads(e[specs.SPLITS_KEY]) if e.get(specs.SPLITS_KEY) else artifact_utils.decode_split_names(examples.split_names)
        path = common.model_path(model)
        keras_model = example_io.load_keras_model(path)
        group_spec = None
        if e.get("layers"):
            try:
                group_spec = tfi.group_from_layers(keras_model, json.loads(e[specs.LAYERS_KEY]), name="index").spec(
                    keras_model).to_json()
            except (tfi.ParameterGroupError, ValueError) as err:
                raise ValueError(f"Model artifact {model.uri}: {err}") from None
        spec = common.feature_spec(e, input_dict, keras_model, examples, splits[0])
        dirs = {s: os.path.join(out.uri, f"Split-{s}") for s in splits}

        def build(p):
            for split in splits:
                beam_index.index_examples(p, common.split_pattern(examples, split), path, spec, dirs[split], args,
                                          group_spec, e.get(specs.LOSS_KEY), specs.batch_size(e),
                                          label=f"[{split}]",
                                          temp_dir=os.path.join(self._get_tmp_dir(), "scores", split))

        common.run_beam(self, build, f"GradientIndexer on Examples artifact {examples.uri} with Model artifact "
                                     f"{model.uri}", output_dirs=list(dirs.values()))
        first = GradientIndex(dirs[splits[0]])
        out.set_string_custom_property("split_names", json.dumps(splits))
        out.set_string_custom_property("projection", args.to_json())
        out.set_string_custom_property("model_fingerprint", first.meta["model_fingerprint"])
        out.set_string_custom_property("feature_spec", json.dumps(spec, sort_keys=True))
        out.set_int_custom_property("dim", first.dim)
        out.set_int_custom_property("num_examples", sum(GradientIndex(d).count for d in dirs.values()))

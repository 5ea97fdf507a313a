"""Beam executor of SelfInfluenceScorer: reads each split, scores it with
``tf_influence.tracin.self_influence`` (through ``tfx_components.beam_scoring``), writes InfluenceScores."""

import json
import os

from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils

from tfx_components import component_specs as specs
from tfx_components import beam_scoring, common
from tfx_components.artifacts import set_scores_metadata


class Executor(base_beam_executor.BaseBeamExecutor):

    def Do(self, input_dict, output_dict, exec_properties):
        examples = artifact_utils.get_single_instance(input_dict[specs.EXAMPLES_KEY])
        model = artifact_utils.get_single_instance(input_dict[specs.MODEL_KEY])
        out = artifact_utils.get_single_instance(output_dict[specs.SCORES_KEY])
        si_layers = json.loads(exec_properties.get("si_layers") or "null")   # None: every layer with parameters
        splits = json.loads(exec_properties[specs.SPLITS_KEY]) if exec_properties.get(specs.SPLITS_KEY) else \
            artifact_utils.decode_split_names(examples.split_names)
        path = common.model_path(model)
        # fail early, in the driver, with the artifact named: model file, layer set, features
        keras_model = beam_scoring.load_keras_model(path)
        from tf_influence import tracin
        try:
            tracin.layer_set(keras_model, si_layers)
        except ValueError as err:
            raise ValueError(f"Model artifact {model.uri}: {err}") from None
        patterns = {s: common.split_pattern(examples, s) for s in splits}
        spec = common.feature_spec(exec_properties, input_dict, keras_model, examples, splits[0])
        checkpoints = json.loads(exec_properties["checkpoints"]) if exec_properties.get("checkpoints") else None
        learning_rates = json.loads(exec_properties["learning_rates"]) if exec_properties.get("learning_rates") \
            else None
        import tensorflow as tf
        for c in checkpoints or []:
            if not tf.io.gfile.exists(c):
                raise FileNotFoundError(f"SelfInfluenceScorer: checkpoint {c} does not exist")
        def build(p):
            for split, pattern in patterns.items():
                beam_scoring.score_examples(p, pattern, path, spec, "self_influence",
                                            os.path.join(out.uri, f"Split-{split}"), si_layers=si_layers,
                                            loss_config=exec_properties.get(specs.LOSS_KEY),
                                            batch_size=specs.batch_size(exec_properties),
                                            label=f"[{split}]", checkpoints=checkpoints,
                                            learning_rates=learning_rates,
                                            temp_dir=os.path.join(self._get_tmp_dir(), "scores", split))

        common.run_beam(self, build, f"SelfInfluenceScorer on Examples artifact {examples.uri} "
                                     f"with Model artifact {model.uri}",
                        output_dirs=[os.path.join(out.uri, f"Split-{s}") for s in splits])
        set_scores_metadata(out, splits, "self_influence", key_feature=spec["key"])
        out.set_string_custom_property("feature_spec", json.dumps(spec, sort_keys=True))
        common.record_summary(out, {s: common.summarize(os.path.join(out.uri, f"Split-{s}")) for s in splits})

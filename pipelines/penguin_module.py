"""TFX's penguin tutorial module (``tfx/examples/penguin/penguin_utils_keras.py`` with its
``penguin_utils_base.py``), written for Keras 3 / TensorFlow 2.16, plus **the one line** the
tf-influence components need: ``save_for_influence(model, fn_args)`` at the end of ``run_fn``.

What differs from the tutorial, and why:

* Keras 3 has no ``model.save(dir, save_format="tf", signatures=...)``: the serving SavedModel is
  written with ``tf.saved_model.save(module, dir, signatures=...)`` around the same two serving
  functions (``serving_default`` on serialized examples through the Transform layer, and
  ``transform_features``). The Transform layer is a tf.keras layer, so it is tracked by a
  ``tf.Module`` beside the Keras 3 model rather than set as a model attribute.
* No KerasTuner (not installed with this stack): the tutorial's default hyperparameters
  (learning rate 1e-2, two hidden layers of 8) are used directly.
* ``save_for_influence(model, fn_args)`` — the documented addition: ``model.keras`` beside the
  SavedModel, the file the scorers read (Keras 3 reloads a SavedModel only as an inference layer).

``stage: "finetune"`` in ``custom_config`` (not in the tutorial; the two-stage pipeline variant) trains
a new classification head on the hidden layers of ``fn_args.base_model`` (the first Trainer's model),
with those layers frozen — the case the multi-stage influence function's "embedding fixed" covers.
"""

from typing import List

import keras
import tensorflow as tf
import tensorflow_transform as tft
from absl import logging
from tfx import v1 as tfx
from tfx_bsl.public import tfxio

from tfx_components.saving import save_for_influence

FEATURE_KEYS = ['culmen_length_mm', 'culmen_depth_mm', 'flipper_length_mm', 'body_mass_g']
_LABEL_KEY = 'species'

TRAIN_BATCH_SIZE = 20
EVAL_BATCH_SIZE = 10


def transformed_name(key):
    return key + '_xf'


# TFX Transform will call this function.
def preprocessing_fn(inputs):
    """tf.transform's callback: z-scores of the four measurements, the label as is."""
    outputs = {}
    for key in FEATURE_KEYS:
        outputs[transformed_name(key)] = tft.scale_to_z_score(inputs[key])
    outputs[transformed_name(_LABEL_KEY)] = inputs[_LABEL_KEY]
    return outputs


def input_fn(file_pattern: List[str], data_accessor: tfx.components.DataAccessor,
             tf_transform_output: tft.TFTransformOutput, batch_size: int) -> tf.data.Dataset:
    return data_accessor.tf_dataset_factory(
        file_pattern,
        tfxio.TensorFlowDatasetOptions(batch_size=batch_size, label_key=transformed_name(_LABEL_KEY)),
        tf_transform_output.transformed_metadata.schema).repeat()


def _make_keras_model(learning_rate=1e-2, num_layers=2) -> keras.Model:
    """The tutorial's DNN: four named inputs, concatenated, ``num_layers`` Dense(8, relu), softmax over 3."""
    inputs = [keras.layers.Input(shape=(1,), name=transformed_name(f)) for f in FEATURE_KEYS]
    d = keras.layers.concatenate(inputs)
    for _ in range(int(num_layers)):
        d = keras.layers.Dense(8, activation='relu')(d)
    outputs = keras.layers.Dense(3, activation='softmax')(d)
    model = keras.Model(inputs=inputs, outputs=outputs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss='sparse_categorical_crossentropy',
                  metrics=[keras.metrics.SparseCategoricalAccuracy()])
    return model


def _finetune_model(base: keras.Model, n_classes: int = 3, learning_rate=1e-2) -> keras.Model:
    """A new head on ``base``'s last hidden layer; the hidden layers are frozen (embedding fixed)."""
    hidden = base.layers[-2].output
    for layer in base.layers[:-1]:
        layer.trainable = False
    keras.utils.set_random_seed(1)
    head = keras.layers.Dense(n_classes, activation='softmax', name='finetune_head')(hidden)
    model = keras.Model(inputs=base.inputs, outputs=head)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss='sparse_categorical_crossentropy',
                  metrics=[keras.metrics.SparseCategoricalAccuracy()])
    return model


class _Serving(tf.Module):
    """The tutorial's two serving signatures, tracking the Keras model and the Transform layer."""

    def __init__(self, model, tf_transform_output):
        super().__init__()
        self.model, self.tft_layer = model, tf_transform_output.transform_features_layer()
        raw = tf_transform_output.raw_feature_spec()
        self._raw, self._raw_no_label = raw, {k: v for k, v in raw.items() if k != _LABEL_KEY}

    @tf.function(input_signature=[tf.TensorSpec(shape=[None], dtype=tf.string, name='examples')])
    def serve_tf_examples_fn(self, serialized_tf_example):
        transformed = self.tft_layer(tf.io.parse_example(serialized_tf_example, self._raw_no_label))
        return {'outputs': self.model({transformed_name(f): transformed[transformed_name(f)] for f in FEATURE_KEYS})}

    @tf.function(input_signature=[tf.TensorSpec(shape=[None], dtype=tf.string, name='examples')])
    def transform_features_fn(self, serialized_tf_example):
        return self.tft_layer(tf.io.parse_example(serialized_tf_example, self._raw))


# TFX Trainer will call this function.
def run_fn(fn_args: tfx.components.FnArgs):
    """Train the model based on the given args (the tutorial's run_fn)."""
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)
    train_dataset = input_fn(fn_args.train_files, fn_args.data_accessor, tf_transform_output, TRAIN_BATCH_SIZE)
    eval_dataset = input_fn(fn_args.eval_files, fn_args.data_accessor, tf_transform_output, EVAL_BATCH_SIZE)
    config = dict(fn_args.custom_config or {})
    keras.utils.set_random_seed(int(config.get('seed', 0)))
    if config.get('stage') == 'finetune':
        model = _finetune_model(keras.models.load_model(fn_args.base_model + '/model.keras'))
    else:
        model = _make_keras_model()
    logging.info('training %s', model.name)
    model.fit(train_dataset, steps_per_epoch=fn_args.train_steps, validation_data=eval_dataset,
              validation_steps=fn_args.eval_steps, verbose=0)
    serving = _Serving(model, tf_transform_output)
    tf.saved_model.save(serving, fn_args.serving_model_dir,
                        signatures={'serving_default': serving.serve_tf_examples_fn,
                                    'transform_features': serving.transform_features_fn})
    save_for_influence(model, fn_args)   # the one line tf-influence adds: <serving_model_dir>/model.keras

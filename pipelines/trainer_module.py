"""``run_fn`` module for the stock ``tfx.components.Trainer`` (GenericExecutor).

TFX users expect the stock Trainer with a module file, so the reweighted training is a
``run_fn`` rather than a separate component: it gets TFX's orchestration, caching, base-model
wiring and ``Format-Serving`` layout for free. ``custom_config`` selects the stage:

* ``{"stage": "pretrain", ...}`` — the Table-A CNN on pretraining examples;
* ``{"stage": "lm", ...}`` — the character LM of ``model_zoo.text`` (presence_pipeline);
* ``{"stage": "finetune", "case": "fixed"|"updated", ...}`` — a new head on the embedding of
  ``fn_args.base_model`` (the pretraining Trainer's model); ``fixed`` freezes the embedding;
* ``presence: {"num_microbatches": n, "si_layers": [...], "tau1", "tau2", "switch_fraction"}`` — a
  :class:`tf_influence.presence.PresenceArgs` as a dict (its defaults; unknown keys refused) —
  train with the PRESENCE reweighted step (``tf_influence.presence``) and two-stage τ schedule,
  under ``presence.get_strategy()`` (TPUStrategy when a TPU is configured, else Mirrored / default).

The number of optimizer steps is the Trainer's ``TrainArgs(num_steps=…)`` (``fn_args.train_steps``).
Every stage writes a SavedModel (``model.export``) and ``model.keras`` (for the scorers) to
``fn_args.serving_model_dir``. Data is read from ``fn_args.train_files`` as GZIP TFRecords with
the feature spec in ``custom_config["feature_spec"]``.
"""


import keras
import tensorflow as tf

from model_zoo import cnn as models
from tf_influence import presence
from tf_influence.presence import PresenceArgs
from tfx_components.beam_scoring import decode_batch, load_keras_model, parse_feature_spec
from tfx_components.common import glob_files, read_records
from tfx_components.saving import save_for_influence

#: The finetuning head is initialised from ``seed + 1`` (not the pretraining model's draw).
FINETUNE_HEAD_SEED_OFFSET = 1


def _load(patterns, spec):
    desc = f"training files {patterns}"
    return decode_batch(read_records(glob_files(patterns), desc), spec, desc)


def check_labels(y, n_classes: int, desc: str) -> None:
    """Labels must index the model's classes; name the file set and the offending value otherwise."""
    bad = y[(y < 0) | (y >= n_classes)]
    if bad.size:
        raise ValueError(f"{desc}: label value {int(bad.flat[0])} is outside the model's classes [0, {n_classes}) "
                         f"({bad.size} such labels)")


def train_steps(fn_args) -> int:
    """``TrainArgs(num_steps)`` of the Trainer; refuses a missing or non-positive value."""
    steps = getattr(fn_args, "train_steps", None)
    if not steps or int(steps) <= 0:
        raise ValueError(f"the Trainer needs train_args=TrainArgs(num_steps=N) with N > 0, got {steps!r}")
    return int(steps)


def build(cfg: dict, input_shape, base_model=None):
    if cfg["stage"] == "lm":
        from model_zoo import text
        return text.build_lm(int(input_shape[0]), seed=cfg.get("seed", 0))
    if cfg["stage"] == "pretrain":
        pre, _, _ = models.build_two_stage_models(input_shape, cfg["n_classes"], 1, seed=cfg.get("seed", 0),
                                                  l2=cfg.get("l2", 1e-4))
        return pre
    if base_model is None:
        raise ValueError("the finetune stage needs base_model (the pretraining Trainer's model)")
    keras.utils.set_random_seed(cfg.get("seed", 0) + FINETUNE_HEAD_SEED_OFFSET)
    emb = base_model.get_layer("embedding")
    head = models.build_head(int(emb.output_shape[-1]), cfg["n_classes"], l2=cfg.get("l2", 1e-4),
                             name="finetune_head")
    emb.trainable = cfg.get("case", "fixed") == "updated"
    return models.attach_head(emb, head, "finetune")


def run_fn(fn_args):
    cfg = dict(fn_args.custom_config or {})
    spec = parse_feature_spec(cfg["feature_spec"])
    _, x, y = _load(fn_args.train_files, spec)
    base = load_keras_model(fn_args.base_model) if getattr(fn_args, "base_model", None) else None
    strategy = presence.get_strategy(tpu=cfg.get("tpu", ""))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with strategy.scope():
        model = build(cfg, x.shape[1:], base)
    check_labels(y, int(model.output_shape[-1]), f"training files {fn_args.train_files}")
    with strategy.scope():
        presence_args = PresenceArgs.from_dict(cfg["presence"]) if cfg.get("presence") else None
        if presence_args:
            trainer = presence.PresenceModel(model, num_microbatches=presence_args.num_microbatches,
                                             si_layers=list(presence_args.si_layers or ["embedding"]),
                                             eps=presence_args.eps, relative_eps=presence_args.relative_eps,
                                             memory_budget=presence_args.memory_budget)
        else:
            trainer = model
        trainer.compile(optimizer=keras.optimizers.Adam(cfg.get("learning_rate", 1e-2)), loss=loss,
                        metrics=["accuracy"])
    batch = cfg.get("batch_size", 64)
    steps = train_steps(fn_args)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=cfg.get("seed", 0)).repeat().batch(
        batch, drop_remainder=True)
    callbacks = []
    if cfg.get("presence"):
        args = PresenceArgs.from_dict(cfg["presence"])
        callbacks.append(presence.PresenceCallback(args.schedule(steps), keep_weights=False))
    trainer.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=callbacks, shuffle=False)
    for layer in model.layers:  # W is a parameter group of the saved model even if it was frozen here
        layer.trainable = True
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])  # so model.keras carries the loss
    model.optimizer.build(model.trainable_variables)  # saved with all its slots: loads without a mismatch warning
    tf.io.gfile.makedirs(fn_args.serving_model_dir)
    model.export(fn_args.serving_model_dir, verbose=False)
    save_for_influence(model, fn_args)   # model.keras beside the SavedModel: what the components read

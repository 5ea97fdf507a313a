"""CNNs shaped like the multi-stage paper's Table A: a convolutional embedding W (tanh),
fully connected task heads U (pretraining) and Θ (finetuning), tanh activations, no
activation on the output layer. Both models share one ``embedding`` sub-model; the heads
are sub-models called ``pretrain_head`` and ``finetune_head``.
"""

from __future__ import annotations

import keras


def _reg(l2: float):
    return keras.regularizers.L2(l2) if l2 else None


def build_embedding(input_shape=(8, 8, 1), filters=(8, 16), l2: float = 0.0, dtype="float32",
                    name: str = "embedding") -> keras.Model:
    """W: conv(tanh) → 2×2 average pool → conv(tanh) → flatten."""
    inp = keras.Input(tuple(input_shape), dtype=dtype)
    h = keras.layers.Conv2D(filters[0], 3, padding="same", activation="tanh", dtype=dtype, name="conv1",
                            kernel_regularizer=_reg(l2))(inp)
    h = keras.layers.AveragePooling2D(2, dtype=dtype, name="pool1")(h)
    h = keras.layers.Conv2D(filters[1], 3, activation="tanh", dtype=dtype, name="conv2",
                            kernel_regularizer=_reg(l2))(h)
    h = keras.layers.Flatten(dtype=dtype, name="flatten")(h)
    return keras.Model(inp, h, name=name)


def build_head(n_inputs: int, n_classes: int, hidden: int = 32, l2: float = 0.0, dtype="float32",
               name: str = "head") -> keras.Model:
    """A fully connected tanh layer, then linear logits."""
    inp = keras.Input((n_inputs,), dtype=dtype)
    h = keras.layers.Dense(hidden, activation="tanh", dtype=dtype, name="fc", kernel_regularizer=_reg(l2))(inp)
    out = keras.layers.Dense(n_classes, dtype=dtype, name="logits", kernel_regularizer=_reg(l2))(h)
    return keras.Model(inp, out, name=name)


def attach_head(embedding: keras.Model, head: keras.Model, name: str) -> keras.Model:
    inp = keras.Input(embedding.input_shape[1:], dtype=embedding.inputs[0].dtype)
    return keras.Model(inp, head(embedding(inp)), name=name)


def build_two_stage_models(input_shape, n_pre_classes: int, n_ft_classes: int, seed: int = 0, l2: float = 0.0,
                           filters=(8, 16), hidden: int = 32, dtype="float32"):
    """``(pretrain_model, finetune_model, embedding)`` sharing the ``embedding`` sub-model."""
    keras.utils.set_random_seed(seed)
    emb = build_embedding(input_shape, filters, l2, dtype)
    n_feat = int(emb.output_shape[-1])
    pre = attach_head(emb, build_head(n_feat, n_pre_classes, hidden, l2, dtype, "pretrain_head"), "pretrain")
    ft = attach_head(emb, build_head(n_feat, n_ft_classes, hidden, l2, dtype, "finetune_head"), "finetune")
    return pre, ft, emb


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

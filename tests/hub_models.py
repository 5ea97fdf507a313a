"""Tiny random-weight keras-hub models (vocabulary 160 — more than 8 × the width, as real LMs —, 2 layers, width 16) for the tests.

Each builder returns a :class:`HubCase`: the pretraining model (a causal LM, or BERT with a masked-LM
style token head), a finetuning classifier over the *same* backbone object (case 1: the backbone
is frozen there), datasets of synthetic tokens and the layer names a user would pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

import tf_influence as tfi
from tf_influence.lm import CausalLMLoss, causal_lm_examples

VOCAB, LENGTH, WIDTH = 160, 8, 16   # vocabulary > 8 × width, the shape of real LMs
KINDS = ("bert", "gpt2", "llama")


def kinds(slow=()):
    """:data:`KINDS` as test parameters, those in ``slow`` marked ``slow`` (``make test-slow``, not
    ``make test``: their code paths run in ``make test`` through the other kinds or other tests)."""
    import pytest
    return [pytest.param(k, marks=pytest.mark.slow) if k in slow else k for k in KINDS]
#: the float64 models whose influence is compared with dense numpy formulas
TINY = dict(vocab=37, width=4, layers=1, length=5, n_pre=10, n_ft=8, n_test=3, batch=5)


@dataclass
class HubCase:
    name: str
    backbone: object
    pretrain: keras.Model
    finetune: keras.Model
    pretrain_data: tf.data.Dataset
    finetune_data: tf.data.Dataset
    test_data: tf.data.Dataset
    pretrain_loss: object
    finetune_loss: object


def _tokens(n, seed, length=LENGTH, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[: n // 3, -2:] = 0            # some padded sequences
    ids = ids * mask
    return ids, mask


def backbone(kind: str, dtype="float32", vocab=VOCAB, width=WIDTH, layers=2, length=LENGTH):
    import keras_hub
    common = dict(vocabulary_size=vocab, num_layers=layers, hidden_dim=width, intermediate_dim=2 * width,
                  dtype=dtype, name="backbone")
    if kind == "bert":
        return keras_hub.models.BertBackbone(num_heads=2, max_sequence_length=length, **common)
    if kind == "gpt2":
        return keras_hub.models.GPT2Backbone(num_heads=2, max_sequence_length=length, **common)
    if kind == "llama":
        return keras_hub.models.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **common)
    raise ValueError(kind)


def _inputs(kind):
    names = ["token_ids", "padding_mask"] + (["segment_ids"] if kind == "bert" else [])
    return {n: keras.Input((None,), dtype="int32", name=n) for n in names}


def _x(kind, ids, mask):
    x = {"token_ids": ids, "padding_mask": mask}
    if kind == "bert":
        x["segment_ids"] = np.zeros_like(ids)
    return x


def pretrain_model(kind, bb):
    import keras_hub
    if kind == "gpt2":
        return keras_hub.models.GPT2CausalLM(backbone=bb, preprocessor=None)
    if kind == "llama":
        return keras_hub.models.LlamaCausalLM(backbone=bb, preprocessor=None)
    inp = _inputs(kind)
    seq = bb(inp)["sequence_output"]
    logits = keras.layers.Dense(bb.vocabulary_size, name="lm_head", dtype=bb.dtype_policy)(seq)
    return keras.Model(inp, logits, name="bert_lm")


def finetune_model(kind, bb, classes=3):
    inp = _inputs(kind)
    out = bb(inp)
    seq = out["sequence_output"] if isinstance(out, dict) else out
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(seq)
    logits = keras.layers.Dense(classes, name="classifier", dtype=bb.dtype_policy)(pooled)
    return keras.Model(inp, logits, name=f"{kind}_classifier")


def build(kind: str, dtype="float32", n_pre=24, n_ft=18, n_test=4, batch=8, seed=0, freeze=True,
          vocab=VOCAB, width=WIDTH, layers=2, length=LENGTH, updated=False) -> HubCase:
    """``updated=True``: the finetuning model gets its own copy of the backbone with moved weights
    (case 2, the embedding updated in finetuning); else it shares the backbone object (case 1)."""
    keras.utils.set_random_seed(seed)
    bb = backbone(kind, dtype, vocab, width, layers, length)
    pre = pretrain_model(kind, bb)
    if updated:
        bb_ft = backbone(kind, dtype, vocab, width, layers, length)
        rng = np.random.default_rng(seed + 7)
        bb_ft.set_weights([w + 0.05 * rng.normal(size=w.shape).astype(w.dtype) for w in bb.get_weights()])
        ft = finetune_model(kind, bb_ft)
    else:
        ft = finetune_model(kind, bb)
    if dtype == "float64":   # keras-hub's attention softmax layers run in float32 by their own policy
        from tf_influence.evaluation.derivative_check import promote_to_float64
        promote_to_float64(pre)
        promote_to_float64(ft)
    ids, mask = _tokens(n_pre, seed + 1, length, vocab)
    if kind == "bert":  # masked-LM style: predict every real token from the full sequence
        x = _x(kind, ids, mask)
        labels = np.where(mask > 0, ids, -100).astype(np.int32)
    else:
        x, labels = causal_lm_examples(ids, mask)
    pre_ds = tf.data.Dataset.from_tensor_slices((x, labels)).batch(batch)
    fid, fmask = _tokens(n_ft + n_test, seed + 2, length, vocab)
    fy = (fid[:, 0] % 3).astype(np.int32)
    fx = _x(kind, fid, fmask)
    ft_ds = tf.data.Dataset.from_tensor_slices(({k: v[:n_ft] for k, v in fx.items()}, fy[:n_ft])).batch(batch)
    te_ds = tf.data.Dataset.from_tensor_slices(({k: v[n_ft:] for k, v in fx.items()}, fy[n_ft:])).batch(batch)
    if freeze and not updated:
        bb.trainable = False
    case = HubCase(kind, bb, pre, ft, pre_ds, ft_ds, te_ds, CausalLMLoss(),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    case.arrays = dict(pre=(x, labels), ft=({k: v[:n_ft] for k, v in fx.items()}, fy[:n_ft]),
                       test=({k: v[n_ft:] for k, v in fx.items()}, fy[n_ft:]))
    return case


def objectives(case: HubCase):
    return (tfi.Objective(case.pretrain, case.pretrain_loss, name=f"{case.name} pretraining"),
            tfi.Objective(case.finetune, case.finetune_loss, name=f"{case.name} finetuning"))

"""Check Hessian-vector products against an independent reference: central finite differences of the
gradient in float64.

Autodiff checked against autodiff cannot find an autodiff bug (Keras' ``LayerNormalization`` had a
wrong second derivative in *every* TensorFlow autodiff mode, see :mod:`tf_influence.exact`).
:func:`hvp_fd_error` compares ``H v`` from :class:`~tf_influence.hessian.HessianOperator` with::

    (∇L(w + h v) − ∇L(w − h v)) / 2h

whose error is ``O(h²)`` (third derivatives) plus ``O(ε_machine / h)`` rounding: about 1e-9 relative
in float64 with ``h = 1e-5``. Run it on your own model (cast to float64) before trusting a solve::

    python -m tf_influence.evaluation.derivative_check      # the layer catalogue below

>>> import keras, numpy as np, tensorflow as tf
>>> import tf_influence as tfi
>>> model, loss, data = layer_case("layer_norm")
>>> err = hvp_fd_error(tfi.Objective(model, loss), data, tfi.ParameterGroup.from_model(model))
>>> err < 1e-6
True
"""

from __future__ import annotations

import argparse
import contextlib
import json

import keras
import numpy as np
import tensorflow as tf

from ..gradients import mean_gradient
from ..hessian import HessianOperator
from ..objective import Objective


@contextlib.contextmanager
def float64_throughout():
    """Keep float64 tensors float64 where a layer casts to float32 on purpose (keras-hub's Llama / Gemma
    RMS norms "always compute in float32"): a float64 finite difference through a float32 cast is
    rounding noise (``ε₃₂ / h ≈ 1e-2``), not a reference. Only ``keras.ops.cast`` from float64 to a
    narrower float is intercepted, and only inside this block."""
    original = keras.ops.cast

    def cast(x, dtype):
        narrow = keras.backend.standardize_dtype(dtype) in ("float32", "float16", "bfloat16")
        if narrow and keras.backend.standardize_dtype(getattr(x, "dtype", "float32")) == "float64":
            return x
        return original(x, dtype)
    keras.ops.cast = cast
    try:
        yield
    finally:
        keras.ops.cast = original


def promote_to_float64(model) -> list:
    """Give float64 to the sub-layers of a float64 model that run in float32 by their own dtype policy
    (keras-hub's attention softmax layers); returns their names. Part of a float64 reference check."""
    from ..params import all_layers
    promoted = []
    for layer in all_layers(model):
        if getattr(layer, "compute_dtype", None) in ("float32", "float16", "bfloat16"):
            layer.dtype_policy = "float64"
            promoted.append(layer.name)
    return promoted


def hvp_fd_error(objective: Objective, dataset, group, v=None, step: float = 1e-5, seed: int = 0,
                 mode: str = "fob") -> float:
    """``‖H v − FD(v)‖ / ‖FD(v)‖`` for a random unit direction ``v`` (or the one given).

    The model should be float64 (a float32 finite difference is dominated by rounding; see
    :func:`float64_throughout` for layers that cast down on purpose). The group's variables are
    restored afterwards."""
    w0 = group.values()
    if v is None:
        v = np.random.default_rng(seed).normal(size=group.size)
        v = v / np.linalg.norm(v)
    v = tf.constant(np.asarray(v), dtype=group.dtype)
    hv = HessianOperator(objective, dataset, group, mode=mode).matvec(v).numpy()
    try:
        group.assign(w0 + step * v)
        g_plus = mean_gradient(objective, dataset, group).numpy()
        group.assign(w0 - step * v)
        g_minus = mean_gradient(objective, dataset, group).numpy()
    finally:
        group.assign(w0)
    fd = (g_plus - g_minus) / (2 * step)
    return float(np.linalg.norm(hv - fd) / max(np.linalg.norm(fd), 1e-300))


class _TrainingMode(Objective):
    """The model called with ``training=True`` (BatchNormalization on the batch's own statistics)."""

    def per_example_losses(self, x, y, training: bool = False):
        return super().per_example_losses(x, y, training=True)


def _classifier(body, inputs):
    out = keras.layers.Dense(3, name="head")(body)
    return keras.Model(inputs, out)


#: Layer types with second derivatives checked (``layer_case(name)``); keras-hub ones need keras-hub.
LAYER_CASES = ("dense", "layer_norm", "rms_norm", "batch_norm_inference", "batch_norm_training",
               "group_norm", "multi_head_attention", "hub_transformer_encoder", "hub_transformer_decoder",
               "hub_bert", "hub_gpt2", "hub_llama", "hub_gemma")


def layer_case(name: str, n: int = 12, seed: int = 0):
    """``(model, loss, dataset)``: a tiny float64 model exercising layer type ``name``."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    y = rng.integers(0, 3, n).astype(np.int32)
    with keras.dtype_policies.DTypePolicyScope("float64") if hasattr(keras.dtype_policies, "DTypePolicyScope") \
            else _floatx64():
        if name.startswith("hub_") and name not in ("hub_transformer_encoder", "hub_transformer_decoder"):
            return _hub_case(name[4:], n, rng, sce, y)
        seq = name in ("group_norm", "multi_head_attention", "hub_transformer_encoder", "hub_transformer_decoder")
        x = rng.normal(size=(n, 4, 6) if seq else (n, 5))
        inputs = keras.Input(x.shape[1:], dtype="float64")
        h = keras.layers.Dense(6, activation="tanh")(inputs)
        objective_cls = Objective
        if name == "layer_norm":
            h = keras.layers.LayerNormalization()(h)
        elif name == "rms_norm":
            h = keras.layers.LayerNormalization(rms_scaling=True)(h)
        elif name in ("batch_norm_inference", "batch_norm_training"):
            h = keras.layers.BatchNormalization()(h)
            objective_cls = _TrainingMode if name == "batch_norm_training" else Objective
        elif name == "group_norm":
            h = keras.layers.GroupNormalization(groups=2)(h)
        elif name == "multi_head_attention":
            h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(2, 3)(h, h))
        elif name == "hub_transformer_encoder":
            import keras_hub
            h = keras_hub.layers.TransformerEncoder(intermediate_dim=8, num_heads=2)(h)
        elif name == "hub_transformer_decoder":
            import keras_hub
            h = keras_hub.layers.TransformerDecoder(intermediate_dim=8, num_heads=2)(h)
        elif name != "dense":
            raise ValueError(f"unknown layer case '{name}'; choose one of {LAYER_CASES}")
        if seq:
            h = keras.layers.GlobalAveragePooling1D()(h)
        model = _classifier(h, inputs)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
    if objective_cls is not Objective:
        model._tfi_objective_cls = objective_cls   # noqa: SLF001 (read by objective_for)
    return model, sce, data


def objective_for(model, loss) -> Objective:
    """The :class:`Objective` a :func:`layer_case` model is checked with (training mode for BN training)."""
    return getattr(model, "_tfi_objective_cls", Objective)(model, loss)


class _floatx64:
    """float64 layers inside: ``floatx`` *and* the global dtype policy, which Keras caches from
    ``floatx`` the first time a layer reads it (after any earlier float32 model, setting ``floatx``
    alone would leave new layers float32)."""

    def __enter__(self):
        self.old = keras.config.floatx(), keras.config.dtype_policy()
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")

    def __exit__(self, *exc):
        keras.config.set_floatx(self.old[0])
        keras.config.set_dtype_policy(self.old[1])


def _hub_case(kind, n, rng, sce, y):
    import keras_hub
    vocab, length, width = 31, 5, 8
    common = dict(vocabulary_size=vocab, num_layers=1, hidden_dim=width, intermediate_dim=2 * width, dtype="float64")
    if kind == "bert":
        bb = keras_hub.models.BertBackbone(num_heads=2, max_sequence_length=length, **common)
    elif kind == "gpt2":
        bb = keras_hub.models.GPT2Backbone(num_heads=2, max_sequence_length=length, **common)
    elif kind == "llama":
        bb = keras_hub.models.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **common)
    elif kind == "gemma":
        bb = keras_hub.models.GemmaBackbone(num_query_heads=2, num_key_value_heads=1, head_dim=4, **common)
    else:
        raise ValueError(kind)
    names = ["token_ids", "padding_mask"] + (["segment_ids"] if kind == "bert" else [])
    inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in names}
    out = bb(inputs)
    seq = out["sequence_output"] if isinstance(out, dict) else out
    model = _classifier(keras.layers.GlobalAveragePooling1D()(seq), inputs)
    promote_to_float64(model)
    ids = rng.integers(1, vocab, size=(n, length)).astype(np.int32)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    if kind == "bert":
        x["segment_ids"] = np.zeros_like(ids)
    return model, sce, tf.data.Dataset.from_tensor_slices((x, y)).batch(6)


def check_all(cases=LAYER_CASES, step: float = 1e-5) -> dict:
    """``{layer case: relative HVP error vs central differences}`` (float64); skips keras-hub cases
    when keras-hub is not installed."""
    from ..params import ParameterGroup
    out = {}
    for name in cases:
        if "hub" in name:
            try:
                import keras_hub  # noqa: F401
            except ImportError:
                continue
        with float64_throughout():
            model, loss, data = layer_case(name)
            out[name] = hvp_fd_error(objective_for(model, loss), data, ParameterGroup.from_model(model), step=step)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="HVP vs float64 central finite differences of the gradient, "
                                                 "per layer type (relative error; ≤ 1e-6 is exact to FD precision).")
    parser.add_argument("--cases", nargs="*", default=list(LAYER_CASES), choices=LAYER_CASES,
                        help="layer cases to check (default: all)")
    parser.add_argument("--step", type=float, default=1e-5, help="finite-difference step h")
    args = parser.parse_args(argv)
    print(json.dumps(check_all(args.cases, args.step), indent=1))


if __name__ == "__main__":
    main()

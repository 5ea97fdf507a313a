"""The one call a TFX Trainer ``run_fn`` adds so the components can score its model.

Why a second file: the stock Trainer exports a SavedModel (``tf.saved_model.save`` / ``model.export``)
for serving. Keras 3 reloads a SavedModel only as an inference-only ``TFSMLayer`` — no layers, no
trainable variables, no loss — so parameter groups, Hessians and per-example gradients cannot be
built from it. The components therefore read a native Keras file, ``model.keras``, next to the
SavedModel in the same ``Format-Serving`` directory (Keras' own format: architecture, weights,
compiled loss). Frozen layers are fine: a parameter group is a set of variables, not a training switch.

Example, the end of a Trainer ``run_fn``::

    from tfx_components.saving import save_for_influence

    model.export(fn_args.serving_model_dir)    # the SavedModel for serving, unchanged
    save_for_influence(model, fn_args)         # the one added line: <serving_model_dir>/model.keras
"""

from __future__ import annotations

import os

#: The file the components look for in a Model artifact's ``Format-Serving`` directory.
MODEL_FILE = "model.keras"


def save_for_influence(model, fn_args_or_dir) -> str:
    """Save ``model`` (a built, compiled Keras 3 model) as ``<serving_model_dir>/model.keras``.

    ``fn_args_or_dir``: the Trainer's ``fn_args`` (its ``serving_model_dir`` is used) or a directory.
    The model should be compiled with the loss it was trained with (the scorers use it unless the
    component is given a ``loss``). Returns the path written."""
    import tensorflow as tf
    directory = getattr(fn_args_or_dir, "serving_model_dir", fn_args_or_dir)
    if not isinstance(directory, str) or not directory:
        raise ValueError(f"save_for_influence needs the Trainer's fn_args or a directory, got {fn_args_or_dir!r}")
    if not model.built:
        raise ValueError(f"model '{model.name}' is not built: call it on a batch (or train it) before saving")
    if getattr(model, "loss", None) is None:
        raise ValueError(f"model '{model.name}' has no compiled loss: compile it with its training loss first "
                         "(the scorers differentiate that loss), or give the components a `loss`")
    tf.io.gfile.makedirs(directory)
    path = os.path.join(directory, MODEL_FILE)
    model.save(path)
    return path

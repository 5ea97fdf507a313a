"""TracIn influence and self-influence (Pruthi et al. 2020; PRESENCE, Thakkar et al. 2023).

* ``TracIn(z, z') = Σ_c η_c g_c(z) · g_c(z')`` over checkpoints ``c`` with learning rates
  ``η_c`` (eq. 1; one checkpoint with η = 1 is the paper's PRESENCE form);
* ``TracInSI_K(z) = Σ_c η_c Σ_{k∈K} ‖g_{c,k}(z)‖²`` restricted to a layer set ``K`` (eq. 2–3);
* :func:`microbatch_self_influence` — eq. 11: the same with the microbatch's mean loss.

Per-example gradients come from :func:`tf_influence.gradients.per_example_gradients`
(vectorised, bounded memory). Checkpoints are weight snapshots — lists of arrays in
``model.get_weights()`` order, or paths of ``model.save_weights`` files; the model's own
weights are restored afterwards.
"""

from __future__ import annotations


import numpy as np
import tensorflow as tf

from .deprecation import moved_names
from .gradients import per_example_gradients
from .objective import EmptyDatasetError, Objective, batches, finite_check
from .params import ParameterGroup, ParameterGroupError, as_layer_list, group_from_layers


#: What ``si_layers=None`` means everywhere (library, components, CLIs): every layer with parameters.
ALL_LAYERS = None


def layer_set(model, si_layers=ALL_LAYERS) -> ParameterGroup:
    """The layer set K as a parameter group; ``si_layers`` = one or several layer / sub-model names,
    Keras paths or layer objects (non-empty), a :class:`ParameterGroup` (returned as is), or ``None``:
    every parameter of the model (the paper's embedding-only K is a choice the user names)."""
    if isinstance(si_layers, ParameterGroup):
        return si_layers
    if si_layers is None:
        return ParameterGroup.from_model(model, name="K=every layer")
    if not as_layer_list(si_layers):
        raise ParameterGroupError("the layer set K is empty: name at least one layer in si_layers for self-influence")
    return group_from_layers(model, si_layers, name=f"K={si_layers}")


def _checkpoints(model, checkpoints, learning_rates):
    if checkpoints is None:
        return [(None, 1.0 if learning_rates is None else float(np.ravel(learning_rates)[0]))]
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("checkpoints is empty")
    lrs = [1.0] * len(checkpoints) if learning_rates is None else [float(v) for v in learning_rates]
    if len(lrs) != len(checkpoints):
        raise ValueError(f"{len(checkpoints)} checkpoints but {len(lrs)} learning rates")
    return list(zip(checkpoints, lrs))


class _AtCheckpoint:
    """Context manager: load a checkpoint into ``model`` and restore the weights afterwards."""

    def __init__(self, model, ckpt):
        self.model, self.ckpt = model, ckpt

    def __enter__(self):
        if self.ckpt is not None:
            self.saved = self.model.get_weights()
            if isinstance(self.ckpt, str):
                self.model.load_weights(self.ckpt)
            else:
                self.model.set_weights(self.ckpt)
        return self.model

    def __exit__(self, *exc):
        if self.ckpt is not None:
            self.model.set_weights(self.saved)


SI_METHODS = ("ghost", "per_example")


def self_influence(objective: Objective, dataset, si_layers=ALL_LAYERS, checkpoints=None, learning_rates=None,
                   chunk_size: int | None = 512, progress: bool = False, name: str = "dataset",
                   method: str = "ghost", memory_budget=None) -> np.ndarray:
    """TracInSI_K of every example of a batched ``(x, y)`` dataset, in dataset order (eq. 3).

    ``si_layers``: the layer set K (layer names / paths / objects or a :class:`ParameterGroup`;
    ``None``, the default: every layer with parameters). ``method``:
    ``"ghost"`` (default) computes ``‖∇_K l(z)‖²`` from one ordinary forward / backward pass per
    batch (:class:`tf_influence.ghost_norms.GhostNorms`: exact for ``Dense``, ``EinsumDense``, ``Conv1D`` /
    ``Conv2D`` and ``Embedding`` layers, per-example gradients for the rest of K);
    ``"per_example"`` materialises vectorised per-example gradients (chunks of ``chunk_size``).
    ``memory_budget`` (bytes, ``"8GB"``, a fraction of the available memory; ``None``: 70 % of it): one
    batch's ghost-norm pass is planned first (:func:`tf_influence.memory.ghost_plan`; per-example
    gradients: the chunk's blocks) and a batch that cannot fit is refused before the pass, naming what
    is too big."""
    if method not in SI_METHODS:
        raise ValueError(f"method must be one of {SI_METHODS}, got '{method}'")
    group = layer_set(objective.model, si_layers)
    total = None
    for ckpt, lr in _checkpoints(objective.model, checkpoints, learning_rates):
        with _AtCheckpoint(objective.model, ckpt):
            if method == "ghost":
                s = lr * _ghost_self_influence(objective, dataset, group, progress, name, memory_budget)
            else:
                parts = [tf.reduce_sum(tf.square(b), axis=1).numpy()
                         for b in per_example_gradients(objective, dataset, group, chunk_size, progress, name,
                                                        memory_budget)]
                s = lr * np.concatenate(parts)
        total = s if total is None else total + s
    return total


def _ghost_self_influence(objective: Objective, dataset, group: ParameterGroup, progress: bool, name: str,
                          memory_budget=None):
    from .ghost_norms import GhostNorms
    from .memory import batch_shape, ghost_plan
    norms = GhostNorms.get(objective, group)
    it = batches(dataset, name, objective.model)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"self-influence ({name})", leave=False)
    out = []
    with finite_check(f"self-influence of {objective.name} on {name}"):
        for x, y in it:
            if not out:      # planned on the first batch's shape, before its pass (no extra read of the data)
                ghost_plan(norms, batch_shape=batch_shape(y)).check(memory_budget)
            out.append(check_finite_np(norms.fn(x, y).numpy(), f"self-influence of {objective.name} on {name}"))
    if not out:
        raise EmptyDatasetError(f"{name} is empty: it yielded no examples")
    return np.concatenate(out)


def check_finite_np(values: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        from .objective import NonFiniteError
        raise NonFiniteError(f"{what}: NaN or Inf encountered")
    return values


def tracin(objective: Objective, train_data, test_data, si_layers=ALL_LAYERS, checkpoints=None, learning_rates=None,
           chunk_size: int | None = 512) -> np.ndarray:
    """TracIn influence matrix ``[n_train, n_test]`` (eq. 1 summed over checkpoints) over the layer set K."""
    group = layer_set(objective.model, si_layers)
    total = None
    for ckpt, lr in _checkpoints(objective.model, checkpoints, learning_rates):
        with _AtCheckpoint(objective.model, ckpt):
            test = tf.concat(list(per_example_gradients(objective, test_data, group, chunk_size, name="test data")),
                             0)
            rows = [(b @ tf.transpose(test)).numpy()
                    for b in per_example_gradients(objective, train_data, group, chunk_size, name="training data")]
        m = lr * np.concatenate(rows, axis=0)
        total = m if total is None else total + m
    return total


def microbatch_self_influence(objective: Objective, x, y, si_layers, num_microbatches: int) -> np.ndarray:
    """MicrobatchSI_K (eq. 11) of the ``n`` contiguous microbatches of one batch ``(x, y)``."""
    from .presence.weights import microbatch_gradients
    group = layer_set(objective.model, si_layers)
    _, grads = microbatch_gradients(objective, x, y, group.variables, num_microbatches)
    return np.sum([tf.reduce_sum(tf.reshape(tf.square(g), [num_microbatches, -1]), axis=1).numpy() for g in grads],
                  axis=0)


__all__ = ["layer_set", "self_influence", "tracin", "microbatch_self_influence"]


# PRESENCE-Sequential lived here before 0.3; it is tf_influence.presence.sequential now
__getattr__ = moved_names(__name__, {"presence_sequential": ("tf_influence.presence.sequential", "presence_sequential"),
                                     "FilterResult": ("tf_influence.presence.sequential", "FilterResult")})

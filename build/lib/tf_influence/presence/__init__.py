"""PRESENCE: online microbatch reweighting by self-influence (Thakkar et al. 2023, Algorithm 2).

For a minibatch split into ``n`` contiguous microbatches ``b_i``:

    g_i = ∇ l(b_i)                                  (microbatch mean loss, one vectorised pass)
    s_i = Σ_{k∈K} ‖g_{i,k}‖²                        (MicrobatchSI_K, eq. 11 / 3)
    s   ← (s − μ(s)) / sqrt(σ²(s) + ε·μ(s)²)        (eq. 7, ε relative: see below)
    w_i = softmax(τ · s)_i                          (eq. 8)
    G   = Σ_i w_i g_i                               (eq. 9)

Eq. 7's ε is "a small number" for numerical stability. Taken literally as an absolute constant
it makes the weights depend on the loss's arbitrary scale: measured on the transformer LM of
``experiments.presence_lm`` (mean token loss), the embedding layer's microbatch SI was ~4·10⁻⁵
with σ ≈ 4·10⁻⁶ within a step between steps 20 and 120, so σ² ≈ 10⁻¹¹ ≪ ε = 10⁻⁶ and every
weight stayed within 0.009 of 0.25 — the first stage of the two-stage schedule silently did
nothing (the paper sums its loss with a normalising factor of 234,496, where the scores are
large). ε is therefore relative by default (``relative_eps=True``: ε·μ(s)², so
``normalize(c·s) = normalize(s)`` for any scale c > 0); ``relative_eps=False`` is the literal
constant.

``τ = 0`` gives ``w_i = 1/n`` and ``G`` = the ordinary minibatch gradient. τ follows a
schedule: the paper's two stages (eq. 10: ``τ1 > 0`` for steps ``i ≤ I``, then ``τ2 < 0``),
constant direct / inverse, inverse-then-direct, or any callable of the step.

Keras integration: :class:`PresenceModel` wraps any Keras 3 model and overrides ``train_step``
(so ``fit`` does the reweighted step); :class:`PresenceCallback` drives τ from a schedule and
logs per-step τ, SI statistics and microbatch weights (its ``records``, the ``History`` logs,
and TensorBoard scalars / histograms when given a ``log_dir``).

Distribution: under ``tf.distribute`` each replica splits its local batch into
``num_microbatches`` microbatches; the SI scores of **all microbatches of the global batch**
are all-gathered, normalised and soft-maxed together, each replica weights its own
microbatch gradients with its slice of the global weights, and the optimizer's cross-replica
sum yields exactly ``Σ_i w_i g_i`` over the global batch — the same update as one device
processing the global batch with ``num_microbatches × replicas`` microbatches (tested with
MirroredStrategy on two logical CPUs). :func:`get_strategy` returns a TPUStrategy when a TPU
is reachable (``TPUClusterResolver``), else MirroredStrategy over the visible GPUs / CPUs, else
the default strategy.

Modules: :mod:`~tf_influence.presence.args` (:class:`PresenceArgs`, every default once),
:mod:`~tf_influence.presence.weights` (the math), :mod:`~tf_influence.presence.schedules`
(τ), :mod:`~tf_influence.presence.model` (Keras), :mod:`~tf_influence.presence.sequential`
(PRESENCE-Sequential filtering).
"""

from .args import PresenceArgs
from .model import PresenceCallback, PresenceModel, get_strategy
from .schedules import ConstantSchedule, TwoStageSchedule, direct, inverse, inverse_then_direct, two_stage
from .sequential import FilterResult, presence_sequential
from .weights import (EPS, layer_set_mask, microbatch_gradients, normalize_scores, presence_weights,
                      self_influence_from_gradients, split_microbatches, weighted_gradient)

__all__ = ["PresenceArgs", "PresenceModel", "PresenceCallback", "get_strategy", "TwoStageSchedule", "ConstantSchedule", "direct",
           "inverse", "two_stage", "inverse_then_direct", "FilterResult", "presence_sequential", "EPS",
           "normalize_scores", "presence_weights", "split_microbatches", "microbatch_gradients", "layer_set_mask",
           "self_influence_from_gradients", "weighted_gradient"]

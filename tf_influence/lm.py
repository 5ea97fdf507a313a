"""Language-model objectives and measurements: next-token loss and the log-probability of a completion.

Causal LMs (keras-hub's ``GPT2CausalLM``, ``LlamaCausalLM``, ``GemmaCausalLM``, or any Keras model
mapping ``{"token_ids", "padding_mask"}`` to ``[B, T, vocab]`` logits) are scored with labels shifted
by one position. Positions that must not count — padding, the prompt of a prompt/completion pair,
the last position — carry the label :data:`IGNORE` (−100, the convention of Hugging Face and
kronfluence's examples), so a dataset stays plain ``(x, labels)`` pairs and every part of the library
(HVPs, K-FAC, ghost norms, the Beam jobs) sees one per-example loss.

>>> import numpy as np
>>> x, labels = causal_lm_examples(np.array([[5, 6, 7, 0]]), padding_mask=np.array([[1, 1, 1, 0]]),
...                                prompt_lengths=[2])
>>> labels.tolist()      # prompt (5, 6), completion 7: only "7 after (5, 6)" counts; padding ignored
[[-100, 7, -100, -100]]

* :class:`CausalLMLoss` — the pretraining objective ``g(z)``: mean (or sum) token cross-entropy
  over the labelled positions of a sequence.
* :func:`completion_log_probability` — the measurement a generative-model user asks about:
  ``log p(completion | prompt) = Σ_t log p(y_t | y_<t)`` over the completion's tokens (summed, or
  averaged per token). Used as ``measurement=`` of single- or multi-stage influence, a **positive**
  score means up-weighting the training example *raises* the completion's log-probability
  (the example supports it); the package's sign convention for losses (positive = harmful) is the
  same statement for a measurement that is a loss.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

#: Label of a position that does not count (padding, prompt, last position).
IGNORE = -100


def causal_lm_examples(token_ids, padding_mask=None, prompt_lengths=None):
    """``(x, labels)`` for a causal LM: ``x = {"token_ids", "padding_mask"}`` and next-token labels.

    ``labels[:, t] = token_ids[:, t + 1]`` where position ``t + 1`` is a real token and, with
    ``prompt_lengths``, part of the completion (``t + 1 ≥ prompt_length``); else :data:`IGNORE`.
    Arrays are numpy ``[B, T]``; the result feeds ``tf.data.Dataset.from_tensor_slices``.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 2:
        raise ValueError(f"token_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones_like(ids, dtype=np.int32) if padding_mask is None else np.asarray(padding_mask).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"padding_mask has shape {mask.shape}, token_ids {ids.shape}")
    labels = np.full(ids.shape, IGNORE, dtype=np.int32)
    labels[:, :-1] = np.where(mask[:, 1:] > 0, ids[:, 1:], IGNORE)
    if prompt_lengths is not None:
        prompt = np.asarray(prompt_lengths).reshape(-1)
        if prompt.shape[0] != ids.shape[0]:
            raise ValueError(f"prompt_lengths has {prompt.shape[0]} entries for {ids.shape[0]} sequences")
        target_pos = np.arange(ids.shape[1])[None, :] + 1          # the position label t predicts
        labels = np.where(target_pos >= prompt[:, None], labels, IGNORE).astype(np.int32)
    if not np.any(labels != IGNORE, axis=1).all():
        bad = int(np.where(~np.any(labels != IGNORE, axis=1))[0][0])
        raise ValueError(f"sequence {bad} has no labelled position (all padding or all prompt)")
    return {"token_ids": ids.astype(np.int32), "padding_mask": mask}, labels


def _token_nll(labels, logits):
    labels = tf.cast(labels, tf.int32)
    keep = labels >= 0
    safe = tf.where(keep, labels, tf.zeros_like(labels))
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
    keep = tf.cast(keep, nll.dtype)
    return nll * keep, keep


@keras.saving.register_keras_serializable(package="tf_influence")
class CausalLMLoss(keras.losses.Loss):
    """Next-token cross-entropy of each sequence over its labelled positions (labels ≥ 0).

    ``per_example="mean"`` (default) averages over the sequence's labelled tokens,
    ``"sum"`` sums them. ``call`` returns one value per sequence (``[B]``); as a Keras loss it is
    reduced over the batch like any other.

    >>> loss = CausalLMLoss()
    >>> logits = tf.zeros([1, 3, 4])                     # uniform over a vocabulary of 4
    >>> round(float(loss.call(tf.constant([[1, IGNORE, 2]]), logits)[0]), 4)   # log 4
    1.3863
    """

    def __init__(self, per_example: str = "mean", name: str = "causal_lm_loss", **kwargs):
        if per_example not in ("mean", "sum"):
            raise ValueError(f"per_example must be 'mean' or 'sum', got '{per_example}'")
        super().__init__(name=name, **kwargs)
        self.per_example = per_example

    def call(self, y_true, y_pred):
        nll, keep = _token_nll(y_true, y_pred)
        total = tf.reduce_sum(nll, axis=-1)
        if self.per_example == "sum":
            return total
        return total / tf.maximum(tf.reduce_sum(keep, axis=-1), 1.0)

    def token_terms(self, y_true, y_pred):
        """``[B, T]`` per-token terms whose sum over ``T`` is :meth:`call` (zero where the label is ignored)."""
        nll, keep = _token_nll(y_true, y_pred)
        if self.per_example == "sum":
            return nll
        return nll / tf.maximum(tf.reduce_sum(keep, axis=-1, keepdims=True), 1.0)

    def get_config(self):
        return {**super().get_config(), "per_example": self.per_example}


def completion_log_probability(per_token: bool = False):
    """Measurement ``fn(labels, logits) -> [B]``: ``log p(completion | prompt)`` of each test sequence.

    Only labelled positions count (build the labels with :func:`causal_lm_examples` and
    ``prompt_lengths`` so that the prompt and the padding are :data:`IGNORE`). ``per_token=True``
    divides by the number of completion tokens (mean log-probability per token).
    """
    def log_probability(y_true, y_pred):
        nll, keep = _token_nll(y_true, y_pred)
        total = -tf.reduce_sum(nll, axis=-1)
        if per_token:
            return total / tf.maximum(tf.reduce_sum(keep, axis=-1), 1.0)
        return total
    def token_terms(y_true, y_pred):
        nll, keep = _token_nll(y_true, y_pred)
        if per_token:
            return -nll / tf.maximum(tf.reduce_sum(keep, axis=-1, keepdims=True), 1.0)
        return -nll
    log_probability.__name__ = "completion_log_probability" + ("_per_token" if per_token else "")
    log_probability.token_terms = token_terms
    log_probability.higher_is_better = True     # a quantity to raise, not a loss (see influence.higher_is_better)
    return log_probability


def is_causal_lm_loss(loss) -> bool:
    return isinstance(loss, CausalLMLoss)


def _token_terms_fn(loss):
    """The ``token_terms(y_true, y_pred) -> [B, T]`` of a per-token loss or measurement, or a clear error."""
    fn = getattr(loss, "token_terms", None)
    if fn is None:
        raise TypeError(f"{getattr(loss, '__name__', type(loss).__name__)} has no per-token decomposition: per-token "
                        "scores need CausalLMLoss or completion_log_probability() (a loss whose value is a sum "
                        "of per-token terms, with a token_terms(y_true, y_pred) method)")
    return fn


def token_scores(objective, dataset, group, vector, progress: bool = False, name: str = "dataset") -> list:
    """Per-token terms of the influence scores ``∇l(z) · s``: one ``[T]`` array per example of ``dataset``
    (dataset order) whose sum is the example's score (:func:`~tf_influence.gradients.per_example_dot`).

    ``l(z) = Σ_t l_t(z)`` for a causal LM (:class:`CausalLMLoss`: ``l_t`` is the token's cross-entropy
    over the number of labelled tokens; :func:`completion_log_probability`: the completion token's
    log-probability), so ``∇l(z) · s = Σ_t ∇l_t(z) · s``: the terms are the directional derivatives of
    the per-token losses along ``s``, all ``T`` of them from one forward-mode pass
    (``tf.autodiff.ForwardAccumulator``) — which tokens of a sequence carry its influence. Positions
    whose label is ignored (:data:`IGNORE`: padding, a prompt) get exactly 0.

    ``objective``: an :class:`~tf_influence.objective.Objective` whose loss is a :class:`CausalLMLoss` or a
    :func:`completion_log_probability` measurement; ``group`` the parameters ``vector`` (``[p]``, e.g. an
    :class:`~tf_influence.influence.InfluenceResult`'s ``test_vector`` column) lives on.

    >>> # scores = token_scores(Objective(lm, CausalLMLoss()), corpus, result.group, result.test_vector[:, 0])
    >>> # the sum of scores[i] is result.scores[i, 0]; its entry t is the share of token t + 1 (label t)
    """
    from .compiled import cached_kernel, function
    from .exact import exact_moments
    from .objective import EmptyDatasetError, batches, finite_check
    terms_fn = _token_terms_fn(objective.loss)
    v = tf.cast(tf.reshape(tf.convert_to_tensor(vector), [-1]), group.dtype)
    if int(v.shape[0]) != group.size:
        raise ValueError(f"vector has {int(v.shape[0])} entries, group '{group.name}' has {group.size} parameters")

    def jvp(x, y, tangent):
        with tf.autodiff.ForwardAccumulator(group.tf_variables, group.unflatten(tangent)) as acc, exact_moments():
            terms = tf.cast(terms_fn(y, objective.model(x, training=False)), group.dtype)
        return acc.jvp(terms, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    fn = cached_kernel(objective, "token_scores", (group,), lambda: function(jvp, reduce_retracing=True))
    out = []
    it = batches(dataset, name, objective.model)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"per-token scores ({name})", leave=False)
    with finite_check(f"per-token scores of {objective.name} on {name}"):
        for x, y in it:
            out.extend(np.asarray(fn(x, y, v).numpy(), np.float64))
    if not out:
        raise EmptyDatasetError(f"{name} is empty: it yielded no examples")
    return out


def split_completion(x, labels):
    """One test point per labelled token: ``(x, labels, owner, position)`` where row ``r`` repeats test sequence
    ``owner[r]`` with only the label at ``position[r]`` kept (every other position :data:`IGNORE`).

    A completion's log-probability is a sum over its tokens, so its test vector is the sum of the tokens' own
    (``s = Σ_t s_t``, the solve is linear) and every training example's score splits into the contributions
    of the completion tokens: score the split points with ``test_target="each"`` and sum the columns of a
    sequence to get its score back. What each token of the completion owes to a training example.

    >>> x, y = causal_lm_examples(np.array([[5, 6, 7, 8]]), prompt_lengths=[2])
    >>> xs, ys, owner, pos = split_completion(x, y)
    >>> ys.tolist(), owner.tolist(), pos.tolist()
    ([[-100, 7, -100, -100], [-100, -100, 8, -100]], [0, 0], [1, 2])
    """
    labels = np.asarray(labels)
    owner, pos = np.nonzero(labels != IGNORE)
    if owner.size == 0:
        raise ValueError("no labelled position to split (every label is IGNORE)")
    ys = np.full((owner.size, labels.shape[1]), IGNORE, labels.dtype)
    ys[np.arange(owner.size), pos] = labels[owner, pos]
    xs = {k: np.asarray(v)[owner] for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)[owner]
    return xs, ys, owner, pos


__all__ = ["IGNORE", "CausalLMLoss", "causal_lm_examples", "completion_log_probability", "split_completion",
           "token_scores"]

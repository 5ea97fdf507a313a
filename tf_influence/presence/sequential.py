"""PRESENCE-Sequential (Section 3, eq. 4–5): filter a dataset by its TracIn self-influence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import require_finite
from ..objective import EmptyDatasetError, Objective, take_positions
from ..selection import select_kept
from ..tracin import self_influence


@dataclass
class FilterResult:
    """PRESENCE-Sequential output: indices (dataset order) kept and dropped, and every score."""

    kept: np.ndarray
    dropped: np.ndarray
    scores: np.ndarray
    reverse: bool

    def __post_init__(self):
        n = len(self.scores)
        both = np.concatenate([self.kept, self.dropped])
        if len(both) != n or len(np.unique(both)) != n:
            raise AssertionError("kept and dropped must partition the input")

    def take(self, dataset, which: str = "kept", batch_size: int | None = None):
        """The kept (or dropped) examples of ``dataset`` as a new dataset (same element order)."""
        idx = self.kept if which == "kept" else self.dropped
        mask = np.zeros(len(self.scores), bool)
        mask[idx] = True
        return take_positions(dataset, mask, batch_size)


def presence_sequential(objective: Objective, dataset, si_layers, keep: int, reverse: bool = False,
                        checkpoints=None, learning_rates=None, keys=None, progress: bool = False) -> FilterResult:
    """PRESENCE-Sequential (Section 3, eq. 4–5): keep the ``keep`` examples with the lowest
    self-influence (``reverse=True``: drop the lowest, i.e. keep the highest).

    Streams ``dataset`` (batched ``(x, y)``) once per checkpoint. Selection is
    :func:`tf_influence.selection.select_kept` — the rule the ``ScoreFilter`` component applies —
    with ties broken by ``keys`` (one per example, dataset order) or, without keys, by position."""
    scores = self_influence(objective, dataset, si_layers, checkpoints, learning_rates, progress=progress)
    n = len(scores)
    if n == 0:
        raise EmptyDatasetError("PRESENCE-Sequential got an empty dataset")
    if not 0 <= keep <= n:
        raise ValueError(f"keep={keep} but the dataset has {n} examples")
    require_finite(scores, "self-influence scores", keys)
    mask = select_kept(scores, "keep_highest" if reverse else "keep_lowest", keep, keys=keys)
    return FilterResult(np.flatnonzero(mask), np.flatnonzero(~mask), scores, reverse)

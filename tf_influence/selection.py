"""The one rule that turns per-example scores into a kept / dropped split.

Used by the library (:func:`tf_influence.presence.presence_sequential`) and by the ``ScoreFilter``
TFX component, so the same scores and keys always keep the same examples.

Order: ascending score; ties are broken by ascending key (the example's stable key in a
pipeline; its dataset position when no keys are given).

Modes (``value`` in brackets):

* ``drop_top_fraction`` [fraction in 0..1] — drop the ``round(value × n)`` highest scores (e.g.
  the most harmful 10 % of pretraining examples: ``value=0.1``);
* ``drop_above`` [threshold] — drop every score ``> value``;
* ``keep_lowest`` [count] — keep the ``value`` lowest scores (PRESENCE-Sequential);
* ``keep_highest`` [count] — keep the ``value`` highest (PRESENCE-Sequential-reverse).

>>> select_kept([0.3, 0.1, 0.2, 0.1], "keep_lowest", 2).tolist()     # the tie at 0.1: both kept
[False, True, False, True]
>>> select_kept([0.3, 0.1, 0.2, 0.1], "drop_top_fraction", 0.25).tolist()
[False, True, True, True]
"""

from __future__ import annotations

import numpy as np

from .errors import require_finite

SELECT_MODES = ("drop_top_fraction", "drop_above", "keep_lowest", "keep_highest")


def ascending_order(scores, keys=None) -> np.ndarray:
    """Indices sorting ``scores`` ascending, ties broken by ``keys`` (default: position)."""
    scores = np.asarray(scores, dtype=np.float64)
    if keys is None:
        return np.argsort(scores, kind="stable")
    keys = list(keys)
    if len(keys) != len(scores):
        raise ValueError(f"{len(keys)} keys for {len(scores)} scores")
    return np.array(sorted(range(len(scores)), key=lambda i: (scores[i], keys[i])), dtype=np.int64)


def check_mode(mode: str, value: float, n: int | None = None) -> None:
    """Raise ``ValueError`` for an unknown mode or a value it cannot take."""
    if mode not in SELECT_MODES:
        raise ValueError(f"unknown filter mode '{mode}'; choose one of {SELECT_MODES}")
    if mode == "drop_top_fraction" and not 0.0 <= value <= 1.0:
        raise ValueError(f"drop_top_fraction needs 0 ≤ value ≤ 1, got {value}")
    if mode in ("keep_lowest", "keep_highest"):
        if int(value) != value or value < 0 or (n is not None and value > n):
            bound = f"{n}" if n is not None else "the number of examples"
            raise ValueError(f"{mode} needs an integer 0 ≤ value ≤ {bound}, got {value}")


def order_cut(mode: str, value: float, n: int) -> tuple:
    """The order-statistics modes as one cut of the ascending ``(score, key)`` order:
    ``(keep_first, q)`` — the first ``q`` examples are kept (``keep_first``) or dropped.

    A corpus that no process holds is filtered by this cut: find the boundary element among the
    smaller side (``min(q, n − q)`` elements, :func:`first_set_boundary`), then decide every example
    alone with :func:`kept_by_cut` — the same examples as :func:`select_kept`.

    >>> order_cut("drop_top_fraction", 0.1, 60), order_cut("keep_highest", 20, 60)
    ((True, 54), (False, 40))
    """
    check_mode(mode, value, n)
    if mode == "drop_top_fraction":
        return True, n - int(round(value * n))
    if mode == "keep_lowest":
        return True, int(value)
    if mode == "keep_highest":
        return False, n - int(value)
    raise ValueError("drop_above is a threshold on the score, not an order cut")


def first_set_boundary(q: int, n: int) -> tuple:
    """How to find the first ``q`` of ``n`` in ascending order while holding the smaller side:
    ``("smallest", q)`` — the first set is ``e ≤`` the largest of the ``q`` smallest; or
    ``("largest", n − q)`` — it is ``e <`` the smallest of the ``n − q`` largest."""
    return ("smallest", q) if q <= n - q else ("largest", n - q)


def kept_by_cut(score: float, key, keep_first: bool, side: str, boundary) -> bool:
    """Whether the example ``(score, key)`` is kept under an :func:`order_cut` whose boundary element
    (``None`` when that side is empty) was found as :func:`first_set_boundary` says."""
    e = (float(score), key)
    if boundary is None:  # the side searched is empty: the first set is nothing ("smallest") or everything
        in_first = side == "largest"
    else:
        in_first = e <= boundary if side == "smallest" else e < boundary
    return in_first if keep_first else not in_first


def select_kept(scores, mode: str, value: float, keys=None) -> np.ndarray:
    """Boolean mask (input order) of the examples to keep under ``mode`` / ``value``."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    check_mode(mode, value, n)
    require_finite(scores, "scores to select by", keys)
    kept = np.zeros(n, dtype=bool)
    if mode == "drop_above":
        kept[:] = scores <= value
        return kept
    order = ascending_order(scores, keys)
    if mode == "drop_top_fraction":
        kept[order[:n - int(round(value * n))]] = True
    elif mode == "keep_lowest":
        kept[order[:int(value)]] = True
    else:
        kept[order[n - int(value):]] = True
    return kept

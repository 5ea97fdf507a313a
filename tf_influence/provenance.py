"""What a saved result was computed from, so that it is never returned for another model or corpus.

Every result the :class:`~tf_influence.analyzer.Analyzer` keeps by name (factors, scores, self-influence,
an index) is saved with a ``provenance.json``:

* ``models`` — the SHA-256 fingerprint of the weights it depends on (:func:`weights_fingerprint`: the
  parameter group's spec and the current values; both models for multi-stage influence);
* ``datasets`` — for each dataset, its number of examples and a SHA-256 of its elements in order
  (:func:`dataset_fingerprint`: one hash per component of ``(x, y)``, so the batching does not matter);
* ``arguments`` — the arguments of the call; ``library`` — the version that computed it.

Loading compares them with the current call's and raises :class:`StaleResultError` naming what changed
(the model, which dataset — its size or its contents —, the arguments) and how to recompute
(``overwrite=True`` or another name).

A dataset's fingerprint is taken while its examples are counted — the pass the computation makes anyway
(:func:`tf_influence.objective.count_examples` records it) — or by one read-only pass (no model) when
nothing counted it.

>>> import numpy as np, tensorflow as tf
>>> a = tf.data.Dataset.from_tensor_slices((np.arange(6.0), np.arange(6))).batch(4)
>>> b = tf.data.Dataset.from_tensor_slices((np.arange(6.0), np.arange(6))).batch(3)
>>> dataset_fingerprint(a) == dataset_fingerprint(b)        # the same examples, batched otherwise
True
>>> dataset_fingerprint(a)["size"]
6
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref

import numpy as np

PROVENANCE_FILE = "provenance.json"


class AnalyzerError(ValueError):
    """A name, a saved result or the arguments of a saved result do not fit the request
    (``tf_influence.analyzer.AnalyzerError``)."""


class StaleResultError(AnalyzerError):
    """A saved result was computed from other weights, other data or other arguments than the request."""


class DatasetHasher:
    """SHA-256 of a dataset's elements in order, one running hash per component of ``(x, y)`` (so batches
    of 4 and of 3 of the same examples hash alike), and the number of examples."""

    def __init__(self):
        self._hashes, self.size = None, 0

    def update(self, x, y) -> None:
        import tensorflow as tf
        leaves = tf.nest.flatten((x, y))
        arrays = [np.ascontiguousarray(t.numpy() if hasattr(t, "numpy") else np.asarray(t)) for t in leaves]
        if self._hashes is None:     # each component's dtype and per-example shape once, then its bytes
            self._hashes = [hashlib.sha256(f"{a.dtype}{a.shape[1:]}".encode()) for a in arrays]
        for h, a in zip(self._hashes, arrays):
            h.update(a.tobytes())
        self.size += int(np.shape(leaves[0])[0]) if leaves else 0

    def digest(self) -> dict:
        top = hashlib.sha256()
        for h in self._hashes or []:
            top.update(h.digest())
        return {"size": int(self.size), "sha256": top.hexdigest()[:16]}


_SEEN: dict = {}     # id(dataset) → (weakref to it, fingerprint): recorded by count_examples' pass


def remember(dataset, fingerprint: dict) -> None:
    """Keep the fingerprint a counting pass computed, for as long as the dataset object lives."""
    try:
        ref = weakref.ref(dataset, lambda _, key=id(dataset): _SEEN.pop(key, None))
    except TypeError:
        return
    _SEEN[id(dataset)] = (ref, fingerprint)


def dataset_fingerprint(dataset, name: str = "dataset", model=None) -> dict:
    """``{"size", "sha256"}`` of a batched ``(x, y)`` dataset: the one recorded when it was counted, or one
    read-only pass over it."""
    seen = _SEEN.get(id(dataset))
    if seen is not None and seen[0]() is dataset:
        return dict(seen[1])
    from .objective import batches
    h = DatasetHasher()
    for x, y in batches(dataset, name, model):
        h.update(x, y)
    fp = h.digest()
    remember(dataset, fp)
    return fp


def weights_fingerprint(model, group=None) -> str:
    """SHA-256 (16 hex digits) of a parameter group's spec and current values (default: every weight)."""
    from .index import fingerprint
    from .params import ParameterGroup
    return fingerprint(model, group if group is not None else ParameterGroup.from_model(model))


def record(models: dict, datasets: dict, arguments) -> dict:
    """The provenance of a computation: ``models`` name → ``(model, group)``, ``datasets`` name → dataset,
    ``arguments`` anything JSON-able."""
    from . import __version__
    return {"library": __version__,
            "models": {k: weights_fingerprint(m, g) for k, (m, g) in models.items()},
            "datasets": {k: dataset_fingerprint(d, f"{k} data") for k, d in datasets.items() if d is not None},
            "arguments": json.loads(json.dumps(arguments, default=str, sort_keys=True))}


def save(directory: str, prov: dict) -> None:
    with open(os.path.join(directory, PROVENANCE_FILE), "w") as fh:
        json.dump(prov, fh, indent=1, sort_keys=True)


def check(directory: str, current: dict, what: str) -> None:
    """Raise :class:`StaleResultError` unless the result saved in ``directory`` was computed from what
    ``current`` describes; the message names every difference."""
    path = os.path.join(directory, PROVENANCE_FILE)
    how = "recompute it with overwrite=True, or choose another name"
    if not os.path.exists(path):
        raise StaleResultError(f"{what} in {directory} was saved without a record of the weights and data it was "
                               f"computed from (before tf-influence 0.3): it cannot be trusted for this call; {how}")
    with open(path) as fh:
        saved = json.load(fh)
    changes = []
    for name, fp in current["models"].items():
        if saved.get("models", {}).get(name) != fp:
            changes.append(f"the {name} model's weights (fingerprint {saved.get('models', {}).get(name)} → {fp})")
    for name, fp in current["datasets"].items():
        old = saved.get("datasets", {}).get(name)
        if old is None:
            changes.append(f"the {name} data (not recorded)")
        elif old["size"] != fp["size"]:
            changes.append(f"the {name} data's size ({old['size']:,} → {fp['size']:,} examples)")
        elif old["sha256"] != fp["sha256"]:
            changes.append(f"the {name} data's contents (same {fp['size']:,} examples, other values or order)")
    if saved.get("arguments") != current["arguments"]:
        changes.append(f"the arguments ({json.dumps(saved.get('arguments'), sort_keys=True)} → "
                       f"{json.dumps(current['arguments'], sort_keys=True)})")
    if changes:
        raise StaleResultError(f"{what} in {directory} was computed from other inputs — changed: "
                               + "; ".join(changes) + f". {how}")


__all__ = ["AnalyzerError", "DatasetHasher", "PROVENANCE_FILE", "StaleResultError", "check", "dataset_fingerprint", "record", "save",
           "weights_fingerprint"]

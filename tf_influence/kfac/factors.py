"""Fitted K-FAC / EK-FAC factors (:class:`KFACFactors`) and their on-disk form."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from ..params import GroupSpec


KINDS = ("ekfac", "kfac")
FISHERS = ("true", "empirical")


@dataclass
class KFACFactors:
    """Fitted factors of one (model, loss, group): per block ``Q_A``, ``Q_S`` and the eigenvalues
    ``Λ`` ([rows, d_out]); per diagonal variable its Fisher diagonal. Built by :func:`fit_factors`."""

    kind: str
    fisher: str
    num_examples: int
    group_spec: GroupSpec
    blocks: dict = field(default_factory=dict)      # name → {"QA", "QS", "eig", "A_diag"(embedding)}
    diagonal: dict = field(default_factory=dict)    # variable path → Fisher diagonal (variable shape)
    #: block → {"in", "out", "per_example"}: the dtype its per-batch products ran in (``fit_factors``'
    #: ``product_dtype`` resolved; ``"bfloat16"`` or the model's); empty for factors saved before it was recorded
    products: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"kind": self.kind, "fisher": self.fisher, "num_examples": self.num_examples,
                "kronecker_blocks": {k: list(np.shape(v["eig"])) for k, v in self.blocks.items()},
                "diagonal_variables": sorted(self.diagonal),
                "bfloat16_products": sorted(f"{k}/{what}" for k, v in self.products.items()
                                            for what, d in v.items() if d == "bfloat16")}

    def save(self, directory: str) -> str:
        """Write ``factors.npz`` + ``factors.json`` to ``directory`` (a local path or any
        ``tf.io.gfile`` URL, e.g. ``gs://``)."""
        import io
        tf.io.gfile.makedirs(directory)
        arrays = {}
        for name, blk in self.blocks.items():
            for key, val in blk.items():
                arrays[f"block/{name}/{key}"] = val
        for path, val in self.diagonal.items():
            arrays[f"diag/{path}"] = val
        target = os.path.join(directory, "factors.npz")
        if _is_local(directory):        # straight to the file: no in-memory copy of every factor (1.5 GB at GPT-2 small)
            with open(target, "wb") as fh:
                np.savez(fh, **arrays)
        else:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            with tf.io.gfile.GFile(target, "wb") as fh:
                fh.write(buf.getbuffer())   # a view of the buffer, not a second copy
        with tf.io.gfile.GFile(os.path.join(directory, "factors.json"), "w") as fh:
            fh.write(json.dumps({"kind": self.kind, "fisher": self.fisher, "num_examples": self.num_examples,
                                 "group_spec": json.loads(self.group_spec.to_json()),
                                 "products": self.products}, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str) -> "KFACFactors":
        import io
        meta_path = os.path.join(directory, "factors.json")
        if not tf.io.gfile.exists(meta_path):
            raise FileNotFoundError(f"no K-FAC factors in {directory} (missing factors.json)")
        with tf.io.gfile.GFile(meta_path) as fh:
            meta = json.load(fh)
        target = os.path.join(directory, "factors.npz")
        if _is_local(directory):        # read array by array from the file, not the whole file into memory first
            source = target
        else:
            with tf.io.gfile.GFile(target, "rb") as fh:
                source = io.BytesIO(fh.read())
        blocks, diagonal = {}, {}
        with np.load(source) as data:
            for key in data.files:
                kind, rest = key.split("/", 1)
                if kind == "block":
                    name, field_ = rest.rsplit("/", 1)
                    blocks.setdefault(name, {})[field_] = data[key]
                else:
                    diagonal[rest] = data[key]
        return cls(meta["kind"], meta["fisher"], meta["num_examples"], GroupSpec.from_json(meta["group_spec"]),
                   blocks, diagonal, meta.get("products", {}))


def _is_local(directory: str) -> bool:
    """A path on this machine's file system (not a ``gs://`` or other ``tf.io.gfile`` URL)."""
    return "://" not in str(directory)

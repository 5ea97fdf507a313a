"""Shared output of the benchmark scripts: the JSON file and a readable table on stdout."""

from __future__ import annotations

import json
import os


def write(out: dict, path: str, width: int = 45, indent: int = 2) -> None:
    """Write ``out`` to ``path`` (JSON) and print one ``key value`` line per entry."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=indent)
    for k, val in out.items():
        print(f"{k:{width}s} {val:.4g}" if isinstance(val, float) else f"{k:{width}s} {val}")

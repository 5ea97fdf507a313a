"""The JSON form every configuration dataclass shares (``SolverConfig``, ``InfluenceArgs``,
``FactorArgs``, ``PresenceArgs``, ``ProjectionArgs``): one ``to_json`` / ``from_json`` rule, and
unknown keys refused by name.

Example::

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Args(JsonConfig):
    ...     k: int = 4
    >>> Args.from_json(Args(k=8).to_json())
    Args(k=8)
    >>> Args.from_json('{"kk": 8}')
    Traceback (most recent call last):
    ...
    ValueError: Args: unknown field(s) ['kk']; the fields are ['k']
"""

from __future__ import annotations

import json
from dataclasses import fields


def dataclass_from_dict(cls, d: dict):
    """``cls(**d)`` for a configuration dataclass, refusing unknown keys by name (the one rule of
    every ``from_json`` of the package's configuration objects)."""
    if not isinstance(d, dict):
        raise ValueError(f"a {cls.__name__} is a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; the fields are "
                         f"{sorted(f.name for f in fields(cls))}")
    return cls(**d)


class JsonConfig:
    """Mixin of a configuration dataclass: ``to_dict`` (its fields; override for fields that need a
    JSON form), ``to_json`` (sorted keys), ``from_dict`` / ``from_json`` (unknown keys raise)."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        return dataclass_from_dict(cls, d)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


__all__ = ["JsonConfig", "dataclass_from_dict"]

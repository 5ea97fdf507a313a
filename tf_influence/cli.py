"""Command-line flags generated from the configuration dataclasses, so a CLI, a TFX component and the
library read the same object with the same defaults and help texts.

Built on the standard library's ``argparse`` (no dependency the wheel would have to carry; TFX's
absl flags are global per process, which the CLIs' ``main(argv)`` entry points and tests cannot
share). Each field ``name`` of the dataclass becomes ``--<prefix>name`` (underscores → dashes) with
its default, its ``metadata["help"]`` and its type; a field whose type is itself a configuration
dataclass (e.g. :class:`~tf_influence.solvers.SolverConfig`) takes JSON, or a bare word for its first
field when that is a string (``--pretrain-solver ekfac`` = ``'{"method": "ekfac"}'``); ``bool`` fields get
``--flag`` / ``--no-flag``; ``int | None`` fields take ``none``; a field without a default is a
required flag; a list field with ``metadata["repeat"]`` is a repeatable flag taking one value each time,
named ``metadata["flag"]`` when given (``--beam-arg=--runner=DataflowRunner --beam-arg=…``). :func:`from_args`
builds the object back, so validation runs once, in the dataclass.

>>> import argparse
>>> from tf_influence.influence import InfluenceArgs
>>> ap = argparse.ArgumentParser()
>>> _ = add_arguments(ap, InfluenceArgs)
>>> ns = ap.parse_args(["--case", "updated", "--hessian-samples", "none",
...                     "--pretrain-solver", '{"method": "ekfac", "damping": 1e-4}'])
>>> args = from_args(InfluenceArgs, ns)
>>> args.case, args.hessian_samples, args.pretrain_solver.method, args.alpha
('updated', None, 'ekfac', 0.01)
>>> from_args(InfluenceArgs, ap.parse_args(["--finetune-solver", "cg_squared"])).finetune_solver.method
'cg_squared'
>>> from_args(InfluenceArgs, ap.parse_args([])) == InfluenceArgs()
True
>>> ap = argparse.ArgumentParser()
>>> _ = add_arguments(ap, InfluenceArgs, prefix="x_", defaults={"hessian_samples": None})
>>> from_args(InfluenceArgs, ap.parse_args([]), prefix="x_").hessian_samples is None
True
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

__all__ = ["add_arguments", "from_args"]


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}{name}".replace("_", "-")


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}".replace("-", "_")


_REQUIRED = object()


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _REQUIRED                           # a field without a default: a required flag


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _parse_json_dataclass(cls):
    first = dataclasses.fields(cls)[0]

    def parse(text: str):
        if not text.lstrip().startswith("{") and typing.get_type_hints(cls).get(first.name) is str:
            text = json.dumps({first.name: text})     # a bare word: the first field (--pretrain-solver ekfac)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"{cls.__name__} JSON: {err}") from None
        try:
            return cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = f"{cls.__name__} JSON"
    return parse


def _json_object(name: str):
    def parse(text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{name} is a JSON object, got {text}")
        return value
    return parse


def _to_json(value):
    if dataclasses.is_dataclass(value):
        return value.to_json() if hasattr(value, "to_json") else json.dumps(dataclasses.asdict(value))
    return value


def add_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "", exclude=(), title: str | None = None,
                  defaults: dict | None = None):
    """Add one flag per field of the dataclass ``cls`` (except ``exclude``) to ``parser``, in an
    argument group titled ``title`` (default: the class name and the first line of its docstring).
    ``defaults``: a CLI's own defaults for some fields (shown in ``--help`` beside the class's)."""
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"defaults for fields {cls.__name__} does not have: {unknown}")
    hints = typing.get_type_hints(cls)
    doc = (cls.__doc__ or "").strip().splitlines()
    group = parser.add_argument_group(title or f"{cls.__name__}" + (f" — {doc[0].rstrip('.')}" if doc else ""))
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        hint, default = hints[f.name], _default(f)
        own = f.name in defaults
        if own:
            default, class_default = defaults[f.name], default
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()  # X | None
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        help_ = f.metadata.get("help", "")
        kwargs = {"dest": _dest(prefix, f.name), "default": default}
        if default is _REQUIRED:
            kwargs = {"dest": _dest(prefix, f.name), "required": True}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif dataclasses.is_dataclass(base):
            kwargs["type"] = _parse_json_dataclass(base)
            help_ += f" (a {base.__name__} as JSON)"
        elif base in (int, float, str):
            kwargs["type"] = _parse_optional(base) if optional else base
            if optional:
                help_ += " ('none' for None)"
        elif base is dict or typing.get_origin(base) is dict:
            kwargs["type"] = _json_object(f.name)
            help_ += " (a JSON object)"
        elif typing.get_origin(base) in (tuple, list) or base in (tuple, list):
            if f.metadata.get("repeat"):      # one value per flag, so a value may start with '--' (--beam-arg=--x=1)
                kwargs["action"] = "append"
            else:
                kwargs["nargs"] = "+"
            element = next(iter(typing.get_args(base)), str)
            if element in (int, float):     # list[int] / tuple[float, ...]: each value converted
                kwargs["type"] = element
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {hint}")
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        shown = (f"{_to_json(default)}; {cls.__name__}'s: {_to_json(class_default)}"
                 if own and class_default is not _REQUIRED else _to_json(default))
        help_ = help_ if default is _REQUIRED else f"{help_} (default: {shown})"
        group.add_argument(_flag(prefix, f.metadata.get("flag", f.name)), help=help_.strip().replace("%", "%%"),
                           **kwargs)
    return group


def from_args(cls, namespace: argparse.Namespace, prefix: str = "", parser: argparse.ArgumentParser | None = None,
              **overrides):
    """The ``cls`` object the flags of :func:`add_arguments` describe (``overrides`` win). With
    ``parser``, a value the dataclass refuses is reported as that parser's usage error."""
    values = {}
    for f in dataclasses.fields(cls):
        dest = _dest(prefix, f.name)
        if f.init and hasattr(namespace, dest):
            values[f.name] = getattr(namespace, dest)
    values.update(overrides)
    if parser is None:
        return cls(**values)
    try:
        return cls(**values)
    except ValueError as err:
        parser.error(str(err))

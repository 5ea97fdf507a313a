"""One way to deprecate: a moved name, a moved module, a renamed keyword — each warns with
``DeprecationWarning`` naming the replacement and the release that removes the old form.

>>> import warnings
>>> __getattr__ = moved_names("example", {"old": ("math", "sqrt")})
>>> with warnings.catch_warnings(record=True) as w:
...     warnings.simplefilter("always")
...     f = __getattr__("old")
>>> f(9.0), "example.old is deprecated: use math.sqrt" in str(w[0].message), "0.4" in str(w[0].message)
(3.0, True, True)
"""

from __future__ import annotations

import importlib
import warnings

#: The release that removes what is deprecated in this one.
REMOVED_IN = "0.4"


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    """``DeprecationWarning``: ``old`` is deprecated, use ``new``; removed in :data:`REMOVED_IN`."""
    warnings.warn(f"{old} is deprecated: use {new} (it is removed in {REMOVED_IN})", DeprecationWarning,
                  stacklevel=stacklevel)


def moved_names(module: str, moves: dict):
    """A module-level ``__getattr__`` for names that moved: ``moves[name] = (new module, new name)``.
    Each access warns and returns the new object; other names raise ``AttributeError`` as usual."""
    def __getattr__(name):
        if name in moves:
            where, new = moves[name]
            warn(f"{module}.{name}", f"{where}.{new}")
            return getattr(importlib.import_module(where), new)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__


def moved_module(old: str, new: str):
    """The module ``new``, after a warning that ``old`` moved there (for a shim module's body:
    ``sys.modules[__name__] = moved_module(__name__, "model_zoo.digits")``)."""
    warn(f"module {old}", f"module {new}", stacklevel=4)
    return importlib.import_module(new)


def renamed_keyword(where: str, kwargs: dict, old: str, new: str, stacklevel: int = 4):
    """Pop ``old`` from ``kwargs`` (a function's ``**kwargs``) with a warning; returns its value, or None when
    it was not given. Giving both the old and the new name is an error."""
    if old not in kwargs:
        return None
    if kwargs.get(new) is not None:
        raise TypeError(f"{where}: give {new}= only ({old}= is its deprecated name)")
    warn(f"{where}({old}=...)", f"{new}=...", stacklevel=stacklevel)
    return kwargs.pop(old)


def typed_options(where: str, cls, args, keywords: dict, allowed=None, stacklevel: int = 5):
    """``args`` (an instance of the options dataclass ``cls``, the one form; default ``cls()``) with the
    deprecated keyword forms of its fields applied, each with a ``DeprecationWarning`` naming
    ``args=cls(field=...)``. A keyword outside ``allowed`` (default: every field of ``cls``) is a
    ``TypeError``, as an unknown keyword of a signature is; ``args`` of another type too.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Opts:
    ...     top_k: int = 10
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     got = typed_options("query", Opts, None, {"top_k": 3})
    >>> got, "query(args=Opts(top_k=...))" in str(w[0].message)
    (Opts(top_k=3), True)
    """
    from dataclasses import fields, replace
    allowed = {f.name for f in fields(cls)} if allowed is None else set(allowed)
    unknown = sorted(k for k in keywords if k not in allowed)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument '{unknown[0]}' (the options are the fields "
                        f"of {cls.__name__}: {sorted(allowed)})")
    if args is not None and not isinstance(args, cls):
        raise TypeError(f"{where}(args=...) must be a {cls.__name__}, got {type(args).__name__}")
    for k in keywords:
        warn(f"{where}({k}=...)", f"{where}(args={cls.__name__}({k}=...))", stacklevel=stacklevel)
    return replace(args or cls(), **keywords)   # replace() re-runs the validation


__all__ = ["REMOVED_IN", "warn", "moved_names", "moved_module", "renamed_keyword", "typed_options"]

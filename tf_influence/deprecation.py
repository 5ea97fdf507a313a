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


__all__ = ["REMOVED_IN", "warn", "moved_names", "moved_module", "renamed_keyword"]

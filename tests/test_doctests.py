"""Every docstring example of the library runs (``python -m doctest`` semantics): an example that
stops matching the code fails here, not in a user's session."""

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import tf_influence

def _is_moved(name: str) -> bool:
    """A deprecated moved module (a shim that warns on import and *is* its new module): tested as the new one."""
    spec = importlib.util.find_spec(name)
    return "moved_module(__name__" in open(spec.origin, encoding="utf-8").read()


MOVED = {m.name for m in pkgutil.walk_packages(tf_influence.__path__, "tf_influence.") if _is_moved(m.name)}
MODULES = sorted(m.name for m in pkgutil.walk_packages(tf_influence.__path__, "tf_influence.") if m.name not in MOVED)
#: Modules of the TFX layer whose docstrings hold runnable examples (the rest need a pipeline).
MODULES += ["tfx_components.example_io"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"


def test_the_examples_are_found():
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for n in MODULES for t in finder.find(importlib.import_module(n)))
    assert len(MODULES) > 20 and examples > 30, (len(MODULES), examples)  # the walk found modules and examples
    assert "tf_influence.kfac.capture" in MOVED and "tf_influence.capture" in MODULES

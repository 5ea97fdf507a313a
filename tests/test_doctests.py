"""Every docstring example of the library runs (``python -m doctest`` semantics): an example that
stops matching the code fails here, not in a user's session."""

import doctest
import importlib
import pkgutil

import pytest

import tf_influence

MODULES = sorted(m.name for m in pkgutil.walk_packages(tf_influence.__path__, "tf_influence."))
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

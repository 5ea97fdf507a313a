"""For Beam's ``--setup_file ./setup.py`` (Dataflow workers install this package from it); the
package metadata lives in pyproject.toml."""

from setuptools import setup

setup()

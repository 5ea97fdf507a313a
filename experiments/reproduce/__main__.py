"""``python -m experiments.reproduce`` (see the package docstring)."""

from experiments.reproduce.cli import main

main()

"""``python -m experiments.presence_lm`` (see the package docstring)."""

from experiments.presence_lm.cli import main

main()

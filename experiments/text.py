"""Moved to :mod:`model_zoo.text` (the pipelines import it from there); this name stays for one release."""

import sys

from model_zoo import text as _moved

sys.modules[__name__] = _moved

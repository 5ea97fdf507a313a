"""Moved to :mod:`model_zoo.digits` (the pipelines import it from there); this name stays for one release."""

import sys

from model_zoo import digits as _moved

sys.modules[__name__] = _moved

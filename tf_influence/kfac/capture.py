"""Moved: per-example capture is :mod:`tf_influence.capture` (shared by K-FAC, ghost norms, the projection and
PRESENCE). This module warns and is removed in 0.4."""

import sys

from ..deprecation import moved_module

sys.modules[__name__] = moved_module(__name__, "tf_influence.capture")

"""Moved to :mod:`model_zoo.cnn` (the pipelines import it from there); this name stays for one release
and warns (:mod:`tf_influence.deprecation`)."""

import sys

from tf_influence.deprecation import moved_module

sys.modules[__name__] = moved_module(__name__, "model_zoo.cnn")

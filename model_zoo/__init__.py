"""The data and model builders shared by the pipelines, experiments and benchmarks: the digits
CNNs shaped like the multi-stage paper's Table A (:mod:`model_zoo.cnn`), the digits data
(:mod:`model_zoo.digits`) and the embedded English corpus with its character LM
(:mod:`model_zoo.text`). Not part of the library wheel (``tf_influence`` and ``tfx_components``)."""

"""The PRESENCE settings as one typed object, passed whole from a pipeline's ``custom_config`` /
a CLI to the trainer: every default lives here once.

>>> from tf_influence.presence.args import PresenceArgs
>>> args = PresenceArgs.from_json('{"tau1": -1.0}')
>>> args.tau1, args.tau2, args.num_microbatches
(-1.0, -1.0, 4)
>>> args.schedule(total_steps=10)(3), args.schedule(total_steps=10)(4)
(-1.0, -1.0)
>>> PresenceArgs(switch_fraction=0.3).schedule(total_steps=10)(3)
1.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..configs import JsonConfig
from .schedules import TwoStageSchedule
from .weights import EPS


@dataclass(frozen=True)
class PresenceArgs(JsonConfig):
    """PRESENCE's reweighted training (Thakkar et al. 2023, Algorithm 2 with eq. 10's schedule).

    Attributes:
      num_microbatches: microbatches per (per-replica) batch.
      si_layers: the layer set K (names or Keras paths); ``None``: the trainer's own choice.
      tau1: τ of the first stage (paper: +1, direct weighting).
      tau2: τ of the second stage (paper: −1, inverse weighting).
      switch_fraction: the first stage's share of the training steps (``I = ⌊fraction · steps⌋``).
      eps: ε of eq. 7 (relative to μ(s)² unless ``relative_eps=False``).
      relative_eps: scale-free ε (default) or the literal absolute constant.
      memory_budget: what one reweighted step may allocate (``PresenceModel(memory_budget=)``; bytes,
        ``"8GB"`` or a fraction of the available memory; ``None``: 70 % of it).
    """

    num_microbatches: int = field(default=4, metadata={"help": "microbatches per (per-replica) batch"})
    si_layers: tuple | None = field(default=None, metadata={
        "help": "the layer set K: layer names or Keras paths (None: the trainer's own choice)"})
    tau1: float = field(default=1.0, metadata={"help": "τ of the first stage (paper: +1, direct weighting)"})
    tau2: float = field(default=-1.0, metadata={"help": "τ of the second stage (paper: -1, inverse weighting)"})
    switch_fraction: float = field(default=0.3, metadata={"help": "the first stage's share of the training steps"})
    eps: float = field(default=EPS, metadata={"help": "ε of eq. 7 (relative to μ(s)² unless --no-relative-eps)"})
    relative_eps: bool = field(default=True, metadata={"help": "scale-free ε (else the literal constant)"})
    memory_budget: str | None = field(default=None, metadata={
        "help": "what one reweighted step may allocate: bytes, '8GB' or a fraction of the available memory (None: "
                "70 % of it); a step whose plan exceeds it is refused before training"})

    def __post_init__(self):
        if int(self.num_microbatches) < 1:
            raise ValueError(f"num_microbatches must be ≥ 1, got {self.num_microbatches}")
        if not 0.0 <= float(self.switch_fraction) <= 1.0:
            raise ValueError(f"switch_fraction must be in [0, 1], got {self.switch_fraction}")
        if self.si_layers is not None:
            layers = (self.si_layers,) if isinstance(self.si_layers, str) else tuple(self.si_layers)
            if not layers or not all(isinstance(s, str) for s in layers):
                raise ValueError(f"si_layers: a non-empty list of layer names / paths, got {self.si_layers!r}")
            object.__setattr__(self, "si_layers", layers)
        from ..memory import check_budget_value
        check_budget_value(self.memory_budget)

    def schedule(self, total_steps: int) -> TwoStageSchedule:
        """Eq. 10 over ``total_steps`` optimizer steps."""
        return TwoStageSchedule(float(self.tau1), float(self.tau2), int(self.switch_fraction * total_steps))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["si_layers"] = list(self.si_layers) if self.si_layers is not None else None
        return d


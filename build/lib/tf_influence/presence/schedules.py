"""Temperature schedules for τ (eq. 10): two-stage, constant direct / inverse, inverse-then-direct."""

from __future__ import annotations





# -- τ schedules (eq. 10) --------------------------------------------------------------------------
class TwoStageSchedule:
    """Eq. 10: ``τ1`` for steps ``i ≤ I`` (1-based), ``τ2`` after (paper: τ1 = 1, τ2 = −1)."""

    def __init__(self, tau1: float = 1.0, tau2: float = -1.0, switch_step: int = 100_000):
        self.tau1, self.tau2, self.switch_step = float(tau1), float(tau2), int(switch_step)

    def __call__(self, step: int) -> float:
        return self.tau1 if step <= self.switch_step else self.tau2

    def __repr__(self):
        return f"TwoStageSchedule(tau1={self.tau1}, tau2={self.tau2}, switch_step={self.switch_step})"


class ConstantSchedule:
    def __init__(self, tau: float):
        self.tau = float(tau)

    def __call__(self, step: int) -> float:
        return self.tau

    def __repr__(self):
        return f"ConstantSchedule({self.tau})"


def direct(tau: float = 1.0):
    """PRESENCE-D: always emphasise high-SI microbatches."""
    return ConstantSchedule(abs(tau))


def inverse(tau: float = 1.0):
    """PRESENCE-I: always de-emphasise high-SI microbatches."""
    return ConstantSchedule(-abs(tau))


def two_stage(switch_step: int, tau1: float = 1.0, tau2: float = -1.0):
    """PRESENCE: direct, then inverse (eq. 10)."""
    return TwoStageSchedule(tau1, tau2, switch_step)


def inverse_then_direct(switch_step: int, tau: float = 1.0):
    """PRESENCE-I-D ablation: inverse first, then direct."""
    return TwoStageSchedule(-abs(tau), abs(tau), switch_step)

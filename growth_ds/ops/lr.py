"""LR schedules and what growth does to them.

A schedule is a pure function of its *schedule step* ``t`` (kept next to the optimizer step in the
training state). Two shapes (``LRSchedule.kind``):

* ``cosine`` -- linear warmup, cosine from the peak to ``min_lr_ratio * peak`` at ``total_steps``.
* ``wsd``    -- warmup-stable-decay (Hägele et al. 2024): linear warmup, the peak held, then a decay
                over the last ``decay_steps`` steps to ``min_lr_ratio * peak`` (linear, or ``1-sqrt``).
                Growth inside the stable phase meets the peak LR; the decay stays at the run's end.

Policies at a growth boundary (``LRPolicy.kind``); each re-plans the schedule so that it ends at the run's
last step (``steps_left`` steps after the growth) and may take a new peak (a per-stage LR):

* ``continue`` -- same position on the schedule (bert2BERT, HyperCloning, Net2Net, MSG).
* ``rewarm``   -- staged training (Shen et al. 2022): jump to ``R = round(step / rho)``, the step
                  where a from-scratch large model has the same loss, and ramp linearly from 0 to
                  the schedule's value at ``R + w`` over ``w`` steps, then follow the schedule.
* ``lemon``    -- LEMON (Wang et al. 2024): same peak LR, a new warmup + decay over a shorter
                  horizon (the steps left, or ``horizon``).
* ``restart``  -- fresh warmup + decay from 0 over the steps left (LiGO, G_stack).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

SCHEDULE_KINDS = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")


@dataclass(frozen=True)
class LRSchedule:
    """LR at schedule step ``t`` in ``[0, total_steps)``; see the module docstring for ``kind``.

    ``decay_steps`` (wsd): length of the final decay; the stable phase is
    ``[warmup_steps, total_steps - decay_steps)``. ``rewarm_start``/``rewarm_steps`` add staged
    training's restart ramp.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1
    rewarm_start: Optional[int] = None
    rewarm_steps: int = 0
    kind: str = "cosine"
    decay_steps: int = 0
    decay_shape: str = "linear"

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")

    @property
    def decay_start(self) -> int:
        """First step of the decay (wsd); the cosine decays from the end of the warmup."""
        if self.kind == "cosine":
            return self.warmup_steps
        return max(self.warmup_steps, self.total_steps - self.decay_steps)

    def base(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.peak_lr * (t + 1) / self.warmup_steps
        floor = self.min_lr_ratio * self.peak_lr
        start = self.decay_start
        if t < start:
            return self.peak_lr
        frac = min(1.0, (t - start) / max(1, self.total_steps - start))
        if self.kind == "cosine":
            return floor + 0.5 * (self.peak_lr - floor) * (1 + math.cos(math.pi * frac))
        keep = 1.0 - frac if self.decay_shape == "linear" else 1.0 - math.sqrt(frac)
        return floor + (self.peak_lr - floor) * keep

    def lr(self, t: int) -> float:
        """LR at schedule step ``t``."""
        if self.rewarm_start is not None and self.rewarm_start <= t < self.rewarm_start + self.rewarm_steps:
            end = self.rewarm_start + self.rewarm_steps
            return (t - self.rewarm_start + 1) / self.rewarm_steps * self.base(end)
        return self.base(t)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LRSchedule":
        return cls(**d)


@dataclass(frozen=True)
class LRPolicy:
    """What happens to the schedule at growth. See the module docstring."""

    kind: str = "continue"
    rho: float = 1.0              # rewarm: S_target = step / rho (calibrate per operator)
    rewarm_steps: int = 200       # rewarm: ramp length (the paper used 150-200)
    horizon: Optional[int] = None  # lemon: length of the new schedule (default: steps left)
    warmup_steps: Optional[int] = None  # lemon/restart: new warmup (default: the schedule's)

    KINDS = ("continue", "rewarm", "lemon", "restart")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"lr policy must be one of {self.KINDS}, got {self.kind!r}")
        if not self.rho > 0:
            raise ValueError(f"lr policy rho must be positive, got {self.rho}")

    def apply(self, schedule: Optional[LRSchedule], t: int, steps_left: Optional[int] = None,
              peak_lr: Optional[float] = None):
        """``(schedule, t) -> (new schedule, new schedule step)``.

        ``steps_left``: training steps from the growth to the run's end (default: the schedule's own,
        ``total_steps - t``); the new schedule reaches its ``total_steps`` exactly then, so its decay
        ends with the run. ``peak_lr``: the grown stage's peak (default: the schedule's). A wsd schedule
        keeps its ``decay_steps`` (clipped to what is left).
        """
        if schedule is None:
            return schedule, t
        left = max(1, schedule.total_steps - t if steps_left is None else int(steps_left))
        peak = schedule.peak_lr if peak_lr is None else float(peak_lr)
        common = dict(peak_lr=peak, decay_steps=min(schedule.decay_steps, left))
        if self.kind == "continue":
            return replace(schedule, total_steps=t + left, **common), t
        if self.kind == "rewarm":
            start = int(round(t / self.rho))
            w = max(1, min(self.rewarm_steps, left))
            return replace(schedule, total_steps=start + left, rewarm_start=start, rewarm_steps=w, **common), start
        warm = schedule.warmup_steps if self.warmup_steps is None else self.warmup_steps
        horizon = left if self.kind == "restart" or self.horizon is None else self.horizon
        return replace(schedule, warmup_steps=min(warm, horizon), total_steps=horizon, rewarm_start=None,
                       rewarm_steps=0, **common), 0

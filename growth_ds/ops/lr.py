"""LR schedules and what growth does to them.

A schedule is a pure function of its *schedule step* ``t`` (kept next to the optimizer step in the
training state). Policies at a growth boundary (``LRPolicy.kind``):

* ``continue`` -- same schedule, same position (bert2BERT, HyperCloning, Net2Net, MSG).
* ``rewarm``   -- staged training (Shen et al. 2022): jump to ``R = round(step / rho)``, the step
                  where a from-scratch large model has the same loss, and ramp linearly from 0 to
                  the schedule's value at ``R + w`` over ``w`` steps, then follow the schedule.
* ``lemon``    -- LEMON (Wang et al. 2024): same peak LR, a new warmup + cosine over a shorter
                  horizon (the steps left, or ``horizon``).
* ``restart``  -- fresh warmup + cosine from 0 (LiGO, G_stack).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to ``peak_lr`` then cosine to ``min_lr_ratio * peak_lr`` at ``total_steps``.

    ``rewarm_start``/``rewarm_steps`` add staged training's restart ramp.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1
    rewarm_start: Optional[int] = None
    rewarm_steps: int = 0

    def base(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.peak_lr * (t + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        frac = min(1.0, (t - self.warmup_steps) / span)
        floor = self.min_lr_ratio * self.peak_lr
        return floor + 0.5 * (self.peak_lr - floor) * (1 + math.cos(math.pi * frac))

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
    horizon: Optional[int] = None  # lemon: length of the new cosine (default: steps left)
    warmup_steps: Optional[int] = None  # lemon/restart: new warmup (default: the schedule's)

    KINDS = ("continue", "rewarm", "lemon", "restart")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"lr policy must be one of {self.KINDS}, got {self.kind!r}")
        if not self.rho > 0:
            raise ValueError(f"lr policy rho must be positive, got {self.rho}")

    def apply(self, schedule: Optional[LRSchedule], t: int):
        """``(schedule, t) -> (new schedule, new schedule step)``."""
        if schedule is None or self.kind == "continue":
            return schedule, t
        if self.kind == "rewarm":
            start = int(round(t / self.rho))
            w = max(1, min(self.rewarm_steps, schedule.total_steps - start))
            return replace(schedule, rewarm_start=start, rewarm_steps=w), start
        warm = schedule.warmup_steps if self.warmup_steps is None else self.warmup_steps
        if self.kind == "lemon":
            horizon = self.horizon if self.horizon is not None else max(1, schedule.total_steps - t)
            return replace(schedule, warmup_steps=min(warm, horizon), total_steps=horizon,
                           rewarm_start=None, rewarm_steps=0), 0
        return replace(schedule, warmup_steps=warm, rewarm_start=None, rewarm_steps=0), 0  # restart

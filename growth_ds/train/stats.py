"""Statistics of a paired-seed comparison, and the saving at a budget from end-of-run losses.

Paired seeds: seed ``k``'s arms share the data split and order, so the per-seed differences are what the
statistics describe (Student's t on the differences: a confidence interval and a one-sided test).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats as _st


@dataclass(frozen=True)
class PairedSummary:
    """Of per-seed values ``x`` (e.g. a saving in %, or scratch loss - staged loss): ``mean``, ``std``
    (sample), the two-sided ``level`` confidence interval ``[lo, hi]`` of the mean (Student's t, ``n - 1``
    degrees of freedom), and ``p``: one-sided p-value of "the mean exceeds ``null``" (t-test)."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float
    p: float
    level: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, unit: str = "", fmt: str = ".1f") -> str:
        ci = f"{self.level:.0%} CI [{self.lo:{fmt}}{unit}, {self.hi:{fmt}}{unit}]"
        return f"mean {self.mean:{fmt}}{unit} ({ci}, n={self.n}), one-sided p={self.p:.2g}"


def paired_summary(values: Sequence[float], level: float = 0.90, null: float = 0.0) -> PairedSummary:
    """Summary of per-seed values (needs at least 2): see :class:`PairedSummary`."""
    x = np.asarray(list(values), dtype=np.float64)
    n = x.size
    if n < 2:
        raise ValueError(f"paired_summary: need at least 2 seeds, got {n}")
    mean, std = float(x.mean()), float(x.std(ddof=1))
    se = std / math.sqrt(n)
    if se == 0.0:
        return PairedSummary(n, mean, 0.0, mean, mean, 0.0 if mean > null else 1.0, level)
    q = float(_st.t.ppf(0.5 + level / 2, n - 1))
    p = float(_st.t.sf((mean - null) / se, n - 1))
    return PairedSummary(n, mean, std, mean - q * se, mean + q * se, p, level)


def flops_to_match(budgets: Sequence[float], end_losses: Sequence[float], target: float):
    """FLOPs at which an arm, trained to completion (schedule fully decayed) at each of ``budgets`` and
    ending at ``end_losses``, reaches ``target``: the end loss interpolated linearly in log FLOPs between
    the two budgets that bracket it. Outside the budgets' range, the nearest two are extrapolated and
    ``extrapolated`` is True. Returns ``(flops, extrapolated)``; ``(None, False)`` when the losses do not
    fall with the budget there (nothing to interpolate)."""
    pts = sorted(zip(budgets, end_losses))
    if len(pts) < 2:
        raise ValueError("flops_to_match: need the arm at 2 or more budgets")
    logs = [(math.log(b), loss) for b, loss in pts]
    for (x0, y0), (x1, y1) in zip(logs, logs[1:]):
        if min(y0, y1) <= target <= max(y0, y1) and y0 != y1:
            return math.exp(x0 + (target - y0) / (y1 - y0) * (x1 - x0)), False
    (x0, y0), (x1, y1) = logs[:2] if target > logs[0][1] else logs[-2:]
    if not y1 < y0:
        return None, False
    return math.exp(x0 + (target - y0) / (y1 - y0) * (x1 - x0)), True


def saving_percent(scratch_flops: float, staged_flops: Optional[float]) -> Optional[float]:
    """``100 (1 - staged / scratch)``: the share of the scratch run's compute the staged arm did not need."""
    return None if staged_flops is None else 100.0 * (1.0 - staged_flops / scratch_flops)

"""What a growth plan does to one parameter, by its role: the maps on its axes, the gain of a norm, and
staged training's block coupling. Pure functions of the plan and the parameter's schema entry; every
executor (the full-tensor reference, ZeRO partitions, tensor-parallel shards, LiGO) reads them here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from growth_ds.models.schema import ParamSpec
from growth_ds.ops.plan import GrowthPlan


def param_axes(spec: ParamSpec) -> List[Tuple[str, str]]:
    """``(space, side)`` per axis of a parameter: which space map acts on the axis and whether as producer
    (``"out"``: the map ``S``) or consumer (``"in"``: the map ``T``). An embedding writes the ``model`` space,
    an output layer reads it; a 2-D weight ``[out, in]`` is ``[(out, "out"), (in, "in")]``; a vector (bias,
    norm gain) is ``[(space, "out")]``."""
    if spec.role == "embedding":
        return [(spec.axes[0], "out"), ("model", "out")]
    if spec.role == "head":
        return [(spec.axes[0], "out"), ("model", "in")]
    if spec.role == "weight":
        return [(spec.axes[0], "out"), (spec.axes[1], "in")]
    return [(spec.axes[0], "out")]  # bias, norm, norm_bias


def norm_scale(plan: GrowthPlan, spec: ParamSpec) -> float:
    """Gain multiplier of a ``model``-space norm (``1.0`` for every other parameter): the model map's
    ``norm_scale`` on a norm gain, and ``1 / n_copies`` on a tied model's final norm (the tied output layer
    reads ``n_copies`` copies of every feature)."""
    model = plan.spaces["model"]
    scale = model.norm_scale if spec.role == "norm" else 1.0
    if spec.final_norm and plan.small.tied_embeddings:
        scale /= max(model.n_copies, 1)
    return scale


@dataclass(frozen=True)
class Coupling:
    """Staged training's block coupling ``K`` of a 2-D weight ``[D_out, D_in]``:
    ``K[i, j] = g`` where ``out_copy[i] = in_copy[j] (mod g)``, else ``0``; ``g`` is the gcd of the two
    spaces' copy counts (> 1). The grown value is ``(S W T) * K``; a moment keeps only ``K != 0``."""

    g: int
    out_copy: torch.Tensor  # [D_out] copy index of each output row
    in_copy: torch.Tensor   # [D_in] copy index of each input column

    def rows(self, i0: int = 0, i1: Optional[int] = None) -> torch.Tensor:
        """Rows ``[i0, i1)`` of ``K``, float64 ``[i1 - i0, D_in]`` (equal to those rows of the whole ``K``)."""
        match = (self.out_copy[i0:i1, None] % self.g) == (self.in_copy[None, :] % self.g)
        return match.to(torch.float64) * self.g


def coupling(plan: GrowthPlan, spec: ParamSpec) -> Optional[Coupling]:
    """The block coupling of a 2-D weight or output layer under ``plan`` (None when ``K`` is all ones)."""
    if plan.coupling != "block" or spec.role not in ("weight", "head"):
        return None
    b = plan.spaces[spec.axes[0]]
    a = plan.spaces["model" if spec.role == "head" else spec.axes[1]]
    g = math.gcd(max(b.n_copies, 1), max(a.n_copies, 1))
    if g == 1:
        return None
    return Coupling(g, b.copy, a.copy)


__all__ = ["Coupling", "coupling", "norm_scale", "param_axes"]

"""Apply a :class:`GrowthPlan` to full tensors: the reference executor every other one is tested against.

For a 2-D weight ``W`` (out space b, in space a) the grown weight is

    W' = (S_b W T_a) * K_ba + N

``S_b``/``T_a`` are the spaces' maps, ``K_ba`` is staged training's block coupling (all ones otherwise),
``N`` is randomness that never changes the function: fan-in noise summing to zero over the copies of an
input (LEMON, HyperCloning), random fan-in of new units whose outputs are read with weight 0 (``zero``),
and random columns reading new residual coordinates that are exactly zero after the norm.
Embeddings map their ``model`` axis with ``S``; the untied output layer reads it with ``T``.

Adam moments (``plan.moments``):

* ``adjoint`` -- a grown entry that is ``a * W[i, j]``, with ``c`` entries copying ``W[i, j]``, gets
  ``m / (c a)`` and ``v / (c a)^2``: the gradient those entries have at the grown point when copies stay
  symmetric (``dL/dW = sum over copies of a * dL/dW'``). This is exactly staged training's rule
  (``m/2, v/4`` on copies, unscaled for the halved final norm, zero off-diagonal) and MSG's rule for
  ``zero`` (old entries unchanged). Entries that are not a copy of one old entry (new units, mean
  rows, zeroed identity-block outputs, whole identity blocks) get zero moments. The step is kept.
* ``reset`` -- zero moments and step 0: the fresh AdamW of bert2BERT, LEMON, HyperCloning, G_stack, LiGO.
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Optional

import torch

from growth_ds.models.schema import ParamSpec, parameter_schema
from growth_ds.ops.plan import GrowthPlan
from growth_ds.ops.spaces import SpaceMap
from growth_ds.ops.state import TrainingState

_LAYER = re.compile(r"^layers\.(\d+)\.")


def keyed_generator(seed: int, name: str, tag: str) -> torch.Generator:
    """A generator keyed by (seed, parameter name, purpose): independent of sharding and order."""
    digest = hashlib.sha256(f"{seed}|{name}|{tag}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


NOISE_BLOCK = 1 << 16  # elements per independently keyed block of a random matrix


def keyed_randn(seed: int, name: str, tag: str, rows: int, cols: int, r0: int = 0,
                r1: Optional[int] = None) -> torch.Tensor:
    """Rows ``[r0, r1)`` of the keyed standard-normal matrix ``[rows, cols]`` (float64).

    The matrix is drawn in blocks of ``max(1, NOISE_BLOCK // cols)`` rows, block ``k`` from its own
    generator keyed by ``(seed, name, tag#k)``, so any row range costs only the blocks it touches: a
    rank growing its own rows (ZeRO shards) never draws the others', and the values do not depend on
    the sharding or the order of the draws."""
    r1 = rows if r1 is None else r1
    per = max(1, NOISE_BLOCK // max(cols, 1))
    out = torch.empty(r1 - r0, cols, dtype=torch.float64)
    for k in range(r0 // per, -(-r1 // per)):
        a, b = k * per, min(rows, (k + 1) * per)
        blk = torch.randn(b - a, cols, generator=keyed_generator(seed, name, f"{tag}#{k}"), dtype=torch.float64)
        s, e = max(a, r0), min(b, r1)
        out[s - r0:e - r0] = blk[s - a:e - a]
    return out


def source_name(plan: GrowthPlan, name: str) -> str:
    """Old parameter a new parameter is built from (depth map applied to the layer index)."""
    m = _LAYER.match(name)
    if not m:
        return name
    return f"layers.{plan.layers[int(m.group(1))].source}." + name[m.end():]


def is_identity_block(plan: GrowthPlan, name: str) -> bool:
    m = _LAYER.match(name)
    return bool(m) and plan.layers[int(m.group(1))].kind == "identity"


def _map_axis(x: torch.Tensor, m: SpaceMap, axis: int, side: str, moment: bool) -> torch.Tensor:
    """Apply a space map along ``axis``. ``side`` is ``out`` (S) or ``in`` (T).

    Values: copies scaled by ``out_coef``/``in_coef``; new coordinates are the mean over old ones
    (out side, ``mean`` residue) or zero. Moments: copies unscaled, new coordinates zero.
    """
    if m.is_identity:
        return x
    keep = m.src >= 0
    y = x.index_select(axis, m.src.clamp(min=0))
    shape = [1] * x.dim()
    shape[axis] = m.new
    if moment:
        coef = keep.to(x.dtype)
    else:
        coef = (m.out_coef if side == "out" else m.in_coef).to(x.dtype)
    y = y * coef.view(shape)
    if not moment and side == "out" and m.residue == "mean" and not bool(keep.all()):
        mean = x.mean(dim=axis, keepdim=True)
        y = torch.where(keep.view(shape), y, mean.expand_as(y))
    return y


def _axes(spec: ParamSpec):
    """``(space, side)`` per axis: which map acts and whether as producer (out) or consumer (in)."""
    if spec.role == "embedding":
        return [(spec.axes[0], "out"), ("model", "out")]
    if spec.role == "head":
        return [(spec.axes[0], "out"), ("model", "in")]
    if spec.role == "weight":
        return [(spec.axes[0], "out"), (spec.axes[1], "in")]
    return [(spec.axes[0], "out")]  # bias, norm, norm_bias


def _coupling(plan: GrowthPlan, spec: ParamSpec) -> Optional[torch.Tensor]:
    """Staged training's block coupling ``K`` for a 2-D weight (None when all ones)."""
    if plan.coupling != "block" or spec.role not in ("weight", "head"):
        return None
    b = plan.spaces[spec.axes[0]]
    a = plan.spaces["model" if spec.role == "head" else spec.axes[1]]
    g = math.gcd(max(b.n_copies, 1), max(a.n_copies, 1))
    if g == 1:
        return None
    match = (b.copy[:, None] % g) == (a.copy[None, :] % g)
    return match.to(torch.float64) * g


def _norm_scale(plan: GrowthPlan, spec: ParamSpec) -> float:
    """Gain multiplier of a model-space norm: sqrt(s), and 1/n on a tied model's final norm."""
    model = plan.spaces["model"]
    scale = model.norm_scale if spec.role == "norm" else 1.0
    if spec.final_norm and plan.small.tied_embeddings:
        scale /= max(model.n_copies, 1)
    return scale


def grow_value(plan: GrowthPlan, name: str, spec: ParamSpec, w: torch.Tensor) -> torch.Tensor:
    """Grown value of parameter ``name`` (new name; ``w`` is its source tensor)."""
    if is_identity_block(plan, name) and spec.residual_out:
        return torch.zeros([plan.spaces[s].new for s in spec.axes], dtype=w.dtype)
    x = w.to(torch.float64)
    axes = _axes(spec)
    for axis, (space, side) in enumerate(axes):
        x = _map_axis(x, plan.spaces[space], axis, side, moment=False)
    if spec.role in ("norm", "norm_bias"):
        m = plan.spaces["model"]
        scale = _norm_scale(plan, spec)
        # new coordinates reach the norm as exactly its mean (or 0), so they leave it as 0 when
        # their shift is 0; their gain is free: use 1
        fill = torch.ones_like(x) if spec.role == "norm" else torch.zeros_like(x)
        x = torch.where(m.src >= 0, x, fill)
        return (x * scale).to(w.dtype)
    K = _coupling(plan, spec)
    if K is not None:
        x = x * K
    if spec.role in ("weight", "head"):
        x = x + _noise(plan, name, spec, w, axes)
    return x.to(w.dtype)


def _noise(plan: GrowthPlan, name: str, spec: ParamSpec, w: torch.Tensor, axes) -> torch.Tensor:
    """The function-preserving random part ``N`` of a grown 2-D weight (float64)."""
    b, a = plan.spaces[axes[0][0]], plan.spaces[axes[1][0]]
    shape = (b.new, a.new)
    N = torch.zeros(shape, dtype=torch.float64)
    a_new = a.src < 0
    if plan.noise == "zero_sum" and plan.noise_std > 0 and not a.is_identity:
        std = plan.noise_std * (float(w.double().std()) if plan.noise_relative else 1.0)
        R = keyed_randn(plan.seed, name, "fan_in_split", *shape) * std
        keep = ~a_new
        group_sum = torch.zeros(b.new, a.old, dtype=torch.float64)
        group_sum.index_add_(1, a.src[keep], R[:, keep])
        cnt = a.counts.to(torch.float64).clamp(min=1)
        N[:, keep] = R[:, keep] - (group_sum / cnt)[:, a.src[keep]]
    if a_new.any() and a.residue in ("zero", "mean") and plan.random_std > 0:
        # columns reading new residual coordinates, which are exactly 0 after the norm: random fan-in
        N[:, a_new] = keyed_randn(plan.seed, name, "residue_columns", b.new, int(a_new.sum())) * plan.random_std
    b_new = b.src < 0
    if b_new.any() and b.residue == "random":
        # new units (zero method): random fan-in, read with weight 0 by every consumer
        rows = keyed_randn(plan.seed, name, "new_units", int(b_new.sum()), a.new) * plan.random_std
        if a_new.any() and a.residue == "random":
            rows[:, a_new] = 0.0
        N[b_new] = rows
    return N


def grow_moment(plan: GrowthPlan, name: str, spec: ParamSpec, m: torch.Tensor, power: int) -> torch.Tensor:
    """Grown ``exp_avg`` (power 1) or ``exp_avg_sq`` (power 2) under the adjoint rule."""
    shape = [plan.spaces[s].new for s in spec.axes]
    if plan.moments == "reset" or is_identity_block(plan, name):
        return torch.zeros(shape, dtype=m.dtype)
    x = m.to(torch.float64)
    axes = _axes(spec)
    adj = torch.ones([], dtype=torch.float64)
    for axis, (space, side) in enumerate(axes):
        sm = plan.spaces[space]
        x = _map_axis(x, sm, axis, side, moment=True)
        view = [1] * len(axes)
        view[axis] = sm.new
        adj = adj * sm.adjoint(side == "out").view(view)
    if spec.role in ("norm", "norm_bias"):
        adj = adj * _norm_scale(plan, spec)
    K = _coupling(plan, spec)
    if K is not None:
        x = x * (K != 0)
    safe = torch.where(adj != 0, adj, torch.ones_like(adj))
    return torch.where(adj != 0, x / safe ** power, torch.zeros_like(x)).to(m.dtype)


def check_state(state: TrainingState, plan: GrowthPlan) -> None:
    """Raise ``ValueError`` if ``state`` is not a state of ``plan.small`` (nothing is modified)."""
    problem = state.shape.arch_mismatch(plan.small)
    if problem:
        raise ValueError(f"{problem} (the state's shape vs the shape the plan grows from)")
    state.validate()


def grow(state: TrainingState, plan: GrowthPlan) -> TrainingState:
    """Grow a whole training state: parameters, Adam moments, step and LR schedule.

    The input is validated first and never modified; the result is a new :class:`TrainingState` of
    ``plan.grown_shape``.
    """
    if isinstance(state, dict):
        state = TrainingState(**state)
    check_state(state, plan)
    schema = parameter_schema(plan.grown_shape)
    params, exp_avg, exp_avg_sq = {}, None, None
    for name, spec in schema.items():
        params[name] = grow_value(plan, name, spec, state.params[source_name(plan, name)])
    if state.exp_avg is not None:
        exp_avg, exp_avg_sq = {}, {}
        for name, spec in schema.items():
            src = source_name(plan, name)
            exp_avg[name] = grow_moment(plan, name, spec, state.exp_avg[src], 1)
            exp_avg_sq[name] = grow_moment(plan, name, spec, state.exp_avg_sq[src], 2)
    step = 0 if plan.moments == "reset" else state.step
    schedule, schedule_step = plan.lr.apply(state.schedule, state.schedule_step)
    return TrainingState(plan.grown_shape, params, exp_avg, exp_avg_sq, step, schedule, schedule_step,
                         dict(state.extra))

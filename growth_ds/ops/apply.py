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

import re

import torch

from growth_ds.models.schema import ParamSpec, parameter_schema
from growth_ds.ops.noise import needs_full_std, noise_window
from growth_ds.ops.plan import GrowthPlan
from growth_ds.ops.roles import coupling, norm_scale, param_axes
from growth_ds.ops.spaces import SpaceMap
from growth_ds.ops.state import TrainingState

_LAYER = re.compile(r"^layers\.(\d+)\.")


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


def grow_value(plan: GrowthPlan, name: str, spec: ParamSpec, w: torch.Tensor) -> torch.Tensor:
    """Grown value of parameter ``name`` (new name; ``w`` is its source tensor)."""
    if is_identity_block(plan, name) and spec.residual_out:
        return torch.zeros([plan.spaces[s].new for s in spec.axes], dtype=w.dtype)
    x = w.to(torch.float64)
    for axis, (space, side) in enumerate(param_axes(spec)):
        x = _map_axis(x, plan.spaces[space], axis, side, moment=False)
    if spec.role in ("norm", "norm_bias"):
        m = plan.spaces["model"]
        scale = norm_scale(plan, spec)
        # new coordinates reach the norm as exactly its mean (or 0), so they leave it as 0 when
        # their shift is 0; their gain is free: use 1
        fill = torch.ones_like(x) if spec.role == "norm" else torch.zeros_like(x)
        x = torch.where(m.src >= 0, x, fill)
        return (x * scale).to(w.dtype)
    K = coupling(plan, spec)
    if K is not None:
        x = x * K.rows()
    if spec.role in ("weight", "head"):
        std = float(w.double().std()) if needs_full_std(plan, spec) else None
        x = x + noise_window(plan, name, spec, full_std=std)
    return x.to(w.dtype)


def grow_moment(plan: GrowthPlan, name: str, spec: ParamSpec, m: torch.Tensor, power: int) -> torch.Tensor:
    """Grown ``exp_avg`` (power 1) or ``exp_avg_sq`` (power 2) under the adjoint rule."""
    shape = [plan.spaces[s].new for s in spec.axes]
    if plan.moments == "reset" or is_identity_block(plan, name):
        return torch.zeros(shape, dtype=m.dtype)
    x = m.to(torch.float64)
    axes = param_axes(spec)
    adj = torch.ones([], dtype=torch.float64)
    for axis, (space, side) in enumerate(axes):
        sm = plan.spaces[space]
        x = _map_axis(x, sm, axis, side, moment=True)
        view = [1] * len(axes)
        view[axis] = sm.new
        adj = adj * sm.adjoint(side == "out").view(view)
    if spec.role in ("norm", "norm_bias"):
        adj = adj * norm_scale(plan, spec)
    K = coupling(plan, spec)
    if K is not None:
        x = x * (K.rows() != 0)
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

"""The function-preserving random part ``N`` of a grown 2-D weight, drawn for any window of it.

``W' = (S_b W T_a) * K + N`` (``growth_ds.ops.apply``). ``N`` has three terms, each keyed by
``(plan.seed, parameter name, term)`` so that its values depend neither on sharding nor on the order of
the draws:

* ``fan_in_split`` -- zero-sum fan-in noise (LEMON, HyperCloning): for every output row, a normal draw
  minus its mean over the copies of each input unit, so the copies' total weight is unchanged; scaled by
  ``plan.noise_std`` (times the std of the whole old weight when ``plan.noise_relative``);
* ``residue_columns`` -- random columns reading new residual coordinates that are exactly zero after the
  norm (``zero``/``mean`` residue), scaled by ``plan.random_std``;
* ``new_units`` -- random fan-in of new output units read with weight 0 by every consumer (``random``
  residue, the ``zero`` method), scaled by ``plan.random_std``; it overwrites the rows it covers.

The last two are scaled by ``plan.random_std`` times the std of the whole old weight when
``plan.random_relative`` (new units drawn at the scale the trained weights reached).

:func:`noise_window` returns any ``[rows, cols]`` window of ``N`` equal, bit for bit, to that window of
the whole matrix; it draws only the keyed row blocks the window touches (:func:`keyed_randn`).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from growth_ds.models.schema import ParamSpec
from growth_ds.ops.plan import GrowthPlan
from growth_ds.ops.roles import param_axes

NOISE_BLOCK = 1 << 16  # elements per independently keyed block of a random matrix
F64 = torch.float64


def keyed_generator(seed: int, name: str, tag: str) -> torch.Generator:
    """A generator keyed by (seed, parameter name, purpose): independent of sharding and order."""
    digest = hashlib.sha256(f"{seed}|{name}|{tag}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def keyed_randn(seed: int, name: str, tag: str, rows: int, cols: int, r0: int = 0,
                r1: Optional[int] = None) -> torch.Tensor:
    """Rows ``[r0, r1)`` of the keyed standard-normal matrix ``[rows, cols]`` (float64).

    The matrix is drawn in blocks of ``max(1, NOISE_BLOCK // cols)`` rows, block ``k`` from its own
    generator keyed by ``(seed, name, tag#k)``, so any row range costs only the blocks it touches and the
    values do not depend on how the rows are split or in which order they are drawn."""
    r1 = rows if r1 is None else r1
    per = max(1, NOISE_BLOCK // max(cols, 1))
    out = torch.empty(r1 - r0, cols, dtype=F64)
    for k in range(r0 // per, -(-r1 // per)):
        a, b = k * per, min(rows, (k + 1) * per)
        blk = torch.randn(b - a, cols, generator=keyed_generator(seed, name, f"{tag}#{k}"), dtype=F64)
        s, e = max(a, r0), min(b, r1)
        out[s - r0:e - r0] = blk[s - a:e - a]
    return out


def has_random_units(plan: GrowthPlan, spec: ParamSpec) -> bool:
    """True when ``N`` of this 2-D weight has a ``residue_columns`` or ``new_units`` term."""
    (b_space, _), (a_space, _) = param_axes(spec)
    b, a = plan.spaces[b_space], plan.spaces[a_space]
    if plan.random_std <= 0:
        return False
    return (a.residue in ("zero", "mean") and bool((a.src < 0).any())) or \
        (b.residue == "random" and bool((b.src < 0).any()))


def needs_full_std(plan: GrowthPlan, spec: ParamSpec) -> bool:
    """True when ``N`` of this parameter scales with the std of the whole old weight (HyperCloning's
    relative noise, or new units' fan-in relative to the trained weights): a sharded executor must reduce
    that one scalar before drawing any window."""
    if spec.role not in ("weight", "head"):
        return False
    a = plan.spaces[param_axes(spec)[1][0]]
    if plan.noise == "zero_sum" and plan.noise_std > 0 and plan.noise_relative and not a.is_identity:
        return True
    return plan.random_relative and has_random_units(plan, spec)


def noise_window(plan: GrowthPlan, name: str, spec: ParamSpec, rows: slice = slice(None),
                 cols: slice = slice(None), full_std: Optional[float] = None) -> torch.Tensor:
    """Window ``N[rows, cols]`` of the random part of grown 2-D parameter ``name`` (float64
    ``[n_rows, n_cols]``, zeros where no term applies), bit-identical to that window of ``N`` drawn whole.

    ``rows``/``cols`` are unit-step slices of the grown ``[D_out, D_in]``. ``full_std`` is the std of the
    whole old weight (unbiased, float64), required when :func:`needs_full_std`. The zero-sum term averages
    each row over the copies of an input unit, so a row window costs one draw of its rows over every column;
    a column window is cut from it."""
    (b_space, _), (a_space, _) = param_axes(spec)
    b, a = plan.spaces[b_space], plan.spaces[a_space]
    i0, i1, _ = rows.indices(b.new)
    n_rows = i1 - i0
    N = torch.zeros(n_rows, a.new, dtype=F64)
    a_new = a.src < 0
    if plan.noise == "zero_sum" and plan.noise_std > 0 and not a.is_identity:
        if plan.noise_relative and full_std is None:
            raise ValueError(f"{name}: relative noise needs the std of the whole old weight")
        std = plan.noise_std * (full_std if plan.noise_relative else 1.0)
        R = keyed_randn(plan.seed, name, "fan_in_split", b.new, a.new, i0, i1)
        R.mul_(std)
        keep = ~a_new
        group_sum = torch.zeros(n_rows, a.old, dtype=F64)
        cnt = a.counts.to(F64).clamp(min=1)
        if bool(keep.all()):  # every column is a copy: the masked form's values without its copies
            group_sum.index_add_(1, a.src, R)
            N = R.sub_(group_sum.div_(cnt).index_select(1, a.src))
        else:
            group_sum.index_add_(1, a.src[keep], R[:, keep])
            N[:, keep] = R[:, keep] - (group_sum / cnt)[:, a.src[keep]]
    random_std = plan.random_std
    if plan.random_relative and has_random_units(plan, spec):
        if full_std is None:
            raise ValueError(f"{name}: new units' fan-in relative to the old weight needs its std")
        random_std = plan.random_std * full_std
    if bool(a_new.any()) and a.residue in ("zero", "mean") and random_std > 0:
        k = int(a_new.sum())
        N[:, a_new] = keyed_randn(plan.seed, name, "residue_columns", b.new, k, i0, i1) * random_std
    b_new = b.src < 0
    if bool(b_new.any()) and b.residue == "random":
        blk = b_new[i0:i1]
        if bool(blk.any()):
            k0 = int(b_new[:i0].sum())
            k1 = k0 + int(blk.sum())
            r = keyed_randn(plan.seed, name, "new_units", int(b_new.sum()), a.new, k0, k1) * random_std
            if bool(a_new.any()) and a.residue == "random":
                r[:, a_new] = 0.0
            N[blk] = r
    return N if cols == slice(None) else N[:, cols]


__all__ = ["NOISE_BLOCK", "has_random_units", "keyed_generator", "keyed_randn", "needs_full_std", "noise_window"]

"""Dense (LiGO-style) growth of ZeRO partitions: per-rank partial products, reduce-scattered to the owners.

A learned linear growth operator (LiGO, Wang et al. 2023) maps weights with dense matrices and a depth mix,
``W'_l = K * (B (sum_j c_j W_j) A) + N`` (:class:`growth_ds.ops.dense.DenseMap`), so every new element
depends on every old one and the sparse exchange of :mod:`growth_ds.distributed.zero` does not apply.
Instead each rank multiplies the old elements *it owns* (its slices of every source, zero elsewhere, as
rows ``r0..r1``) by the maps, ``P_r = B[:, r0:r1] (sum_j c_j W_j,r) A`` (a full ``[D0, D1]`` partial), and one
``reduce_scatter`` sums the partials and leaves every new owner exactly its slice (ZeRO-1/2: its flat
range; ZeRO-3: its ``ceil(numel/ws)``), to which the owner applies its slice of ``K`` and ``N``. Per rank that
is one full new parameter of work space at a time, never the model. Sums are float64 and rounded once; they
equal :func:`growth_ds.ops.dense.apply_dense` up to summation order (not bit for bit, unlike the sparse
executor). Adam moments: zeros and step 0 (LiGO's fresh optimizer), or, with ``keep_moments``, whatever the
caller wrote before (the trainer runs the sparse executor of the initialising plan first for the ``plan``
moment rule).
"""
from __future__ import annotations

from typing import Dict

import torch

import torch.distributed as dist

from growth_ds.distributed import engine_state as dse
from growth_ds.distributed.zero.layout import ZeroLayout
from growth_ds.ops.dense import DenseMap

F64 = torch.float64


def _local_rows(slot, me: int, old_shape):
    """(r0, r1, rows [r1 - r0, d1] float64) of this rank's slice of a 2-D old parameter, zero-padded to
    whole rows; 1-D: (lo, hi, the slice zero-padded to the full length)."""
    lo, hi = slot.bounds[me], slot.bounds[me + 1]
    if len(old_shape) == 1:
        w = torch.zeros(old_shape[0], dtype=F64)
        w[lo:hi] = slot.views[0]
        return 0, old_shape[0], w
    d1 = old_shape[1]
    if hi <= lo:
        return 0, 0, None
    r0, r1 = lo // d1, -(-hi // d1)
    w = torch.zeros((r1 - r0) * d1, dtype=F64)
    w[lo - r0 * d1:hi - r0 * d1] = slot.views[0]
    return r0, r1, w.view(r1 - r0, d1)


def _partial(old: ZeroLayout, me: int, m: DenseMap) -> torch.Tensor:
    """``B (sum_j c_j W_j,r) A`` for this rank's slices ``W_j,r`` of the sources (zeros elsewhere), flat
    float64 (the whole new parameter's size)."""
    first = old.slots[m.sources[0][0]]
    shape = tuple(first.shape)
    new_shape = m.new_shape(shape)
    out = torch.zeros(new_shape, dtype=F64)
    for name, c in m.sources:
        if c == 0.0:
            continue
        slot = old.slots[name]
        if tuple(slot.shape) != shape:
            raise ValueError(f"dense map sources of different shapes: {m.sources[0][0]} {shape}, {name} "
                             f"{tuple(slot.shape)}")
        r0, r1, w = _local_rows(slot, me, shape)
        if w is None:
            continue
        if len(shape) == 1:
            out += c * (m.B.to(F64) @ w if m.B is not None else w)
            continue
        left = m.B.to(F64)[:, r0:r1] @ w if m.B is not None else \
            torch.zeros(shape[0], shape[1], dtype=F64).index_copy_(0, torch.arange(r0, r1), w)
        out += c * (left @ m.A.to(F64) if m.A is not None else left)
    return out.reshape(-1)


def grow_dense_engine(old_engine, new_engine, maps: Dict[str, DenseMap], keep_moments: bool = False) -> None:
    """Fill ``new_engine``'s partitions with the dense maps of ``old_engine``'s parameters, one parameter at
    a time (a collective: every rank calls it with the same ``maps``, name of every new parameter ->
    :class:`~growth_ds.ops.dense.DenseMap`). Moments zero and step 0 unless ``keep_moments``."""
    old, new = ZeroLayout(old_engine, need_state=False), ZeroLayout(new_engine)
    me, world = new.rank, new.world
    missing = sorted(set(new.slots) - set(maps))
    if missing:
        raise ValueError(f"dense maps: no map for new parameter {missing[0]}")
    for name, slot in new.slots.items():
        m = maps[name]
        full = _partial(old, me, m)
        if full.numel() != slot.numel:
            raise ValueError(f"{name}: the dense map makes {full.numel()} elements, the parameter has {slot.numel}")
        width = max(slot.bounds[r + 1] - slot.bounds[r] for r in range(world))
        buf = torch.zeros(world, width, dtype=F64)
        for r in range(world):
            a, b = slot.bounds[r], slot.bounds[r + 1]
            buf[r, :b - a] = full[a:b]
        del full
        if world > 1:
            buf = buf.to(new.comm_device)  # (host under gloo, the GPU under NCCL)
            mine = torch.empty(width, dtype=F64, device=new.comm_device)
            dist.reduce_scatter_tensor(mine, buf.view(-1), group=new.group)
            mine = mine.cpu()
        else:
            mine = buf[0].clone()
        del buf
        lo, hi = slot.bounds[me], slot.bounds[me + 1]
        slot.views[0].copy_(m.finish(mine[:hi - lo], lo, hi))
        if not keep_moments:
            slot.views[1].zero_()
            slot.views[2].zero_()
    if not keep_moments:
        dse.set_step(new_engine, 0)
    dse.refresh_low_precision(new_engine)


__all__ = ["DenseMap", "grow_dense_engine"]

"""Dense (LiGO-style) growth of ZeRO partitions: per-rank partial products, reduce-scattered to the owners.

A learned linear growth operator (LiGO, Wang et al. 2023) maps a 2-D weight with dense matrices,
``W' = B W A`` (``B: [D0, d0]``, ``A: [d1, D1]``), so every new element depends on every old one and the
sparse exchange of :mod:`growth_ds.distributed.zero` does not apply. Instead each rank multiplies the old
elements *it owns* (its slice, zero elsewhere, as rows ``r0..r1``) by the maps,
``P_r = B[:, r0:r1] W_r A`` (a full ``[D0, D1]`` partial), and one ``reduce_scatter`` sums the partials
and leaves every new owner exactly its slice (ZeRO-1/2: its flat range; ZeRO-3: its ``ceil(numel/ws)``).
Per rank that is one full new parameter of work space at a time, never the model. 1-D parameters take
``B`` only. Sums are float64 and rounded once; they equal ``B W A`` up to summation order (not bit for
bit, unlike the sparse executor). The growth-ds operator core has no learned (dense) method yet, so the
maps are given per parameter by the caller (:class:`DenseMap`); Adam moments follow LiGO's fresh
optimizer (zeros, step 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from growth_ds.distributed.zero import ZeroLayout, dist
from growth_ds.train import deepspeed_engine as dse

F64 = torch.float64


@dataclass
class DenseMap:
    """New parameter = ``B @ W_source @ A`` (``A`` None for 1-D parameters or an identity in-map)."""

    source: str
    B: Optional[torch.Tensor]   # [D0, d0] float64 (None: identity)
    A: Optional[torch.Tensor]   # [d1, D1] float64 (None: identity)


def _partial(slot, me: int, m: DenseMap, old_shape) -> torch.Tensor:
    """``B W_r A`` for this rank's slice ``W_r`` of the old parameter (zeros elsewhere), flat float64."""
    lo, hi = slot.bounds[me], slot.bounds[me + 1]
    if len(old_shape) == 1:
        w = torch.zeros(old_shape[0], dtype=F64)
        w[lo:hi] = slot.views[0]
        return (m.B @ w if m.B is not None else w).reshape(-1)
    d0, d1 = old_shape
    D0 = m.B.shape[0] if m.B is not None else d0
    D1 = m.A.shape[1] if m.A is not None else d1
    if hi <= lo:
        return torch.zeros(D0 * D1, dtype=F64)
    r0, r1 = lo // d1, -(-hi // d1)
    w = torch.zeros((r1 - r0) * d1, dtype=F64)
    w[lo - r0 * d1:hi - r0 * d1] = slot.views[0]
    w = w.view(r1 - r0, d1)
    left = m.B[:, r0:r1] @ w if m.B is not None else torch.zeros(D0, d1, dtype=F64).index_copy_(
        0, torch.arange(r0, r1), w)
    return (left @ m.A if m.A is not None else left).reshape(-1)


def grow_dense_engine(old_engine, new_engine, maps: Dict[str, DenseMap]) -> None:
    """Fill ``new_engine``'s partitions with ``B W A`` of ``old_engine``'s parameters, one parameter at a time.

    Every rank must call this with the same ``maps`` (name of every new parameter -> :class:`DenseMap`).
    Moments are zero and the step 0 (LiGO trains the grown model with a fresh optimizer).
    """
    old, new = ZeroLayout(old_engine, need_state=False), ZeroLayout(new_engine)
    me, world = new.rank, new.world
    for name, slot in new.slots.items():
        m = maps[name]
        src = old.slots[m.source]
        full = _partial(src, me, m, src.shape)
        if full.numel() != slot.numel:
            raise ValueError(f"{name}: the dense map makes {full.numel()} elements, the parameter has {slot.numel}")
        width = max(slot.bounds[r + 1] - slot.bounds[r] for r in range(world))
        buf = torch.zeros(world, width, dtype=F64)
        for r in range(world):
            a, b = slot.bounds[r], slot.bounds[r + 1]
            buf[r, :b - a] = full[a:b]
        del full
        mine = torch.empty(width, dtype=F64)
        if world > 1:
            dist.reduce_scatter_tensor(mine, buf.view(-1), group=new.group)
        else:
            mine.copy_(buf[0])
        del buf
        k = slot.bounds[me + 1] - slot.bounds[me]
        slot.views[0].copy_(mine[:k])
        slot.views[1].zero_()
        slot.views[2].zero_()
    dse.set_step(new_engine, 0)
    dse.refresh_low_precision(new_engine)


__all__ = ["DenseMap", "grow_dense_engine"]

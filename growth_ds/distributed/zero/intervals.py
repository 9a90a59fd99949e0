"""Interval math of ZeRO-sharded growth, pure Python and torch (no communication).

* A parameter is addressed by the flat index of its row-major flattening.
* ``bounds`` (``ws + 1`` non-decreasing ints, ``bounds[0] == 0``, ``bounds[ws] == numel``) says which
  rank holds which elements: rank ``r`` holds flat ``[bounds[r], bounds[r + 1])``. Both DeepSpeed layouts
  are of this form: ZeRO-1/2 cut the flat buffer of a param group into equal partitions (a parameter's
  intersection with a partition is contiguous), ZeRO-3 cuts every parameter into ``ceil(numel / ws)``.
* An *interval list* is a sorted list of disjoint, non-empty ``(start, stop)`` flat ranges.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

Interval = Tuple[int, int]


def runs_to_intervals(idx: torch.Tensor, width: int = 1) -> List[Interval]:
    """Sorted unique indices -> merged intervals of ``[i * width, (i + 1) * width)``."""
    if idx.numel() == 0:
        return []
    idx = idx.to(torch.long)
    brk = torch.nonzero(idx[1:] != idx[:-1] + 1).flatten() + 1
    starts = torch.cat([idx[:1], idx[brk]]).tolist()
    stops = torch.cat([idx[brk - 1] + 1, idx[-1:] + 1]).tolist()
    return [(s * width, e * width) for s, e in zip(starts, stops)]


def interval_index(ivs: Sequence[Interval], base: int = 0) -> torch.Tensor:
    """``cat(arange(s - base, e - base) for s, e in ivs)`` in a few vectorised ops."""
    if not ivs:
        return torch.empty(0, dtype=torch.long)
    t = torch.tensor(ivs, dtype=torch.long)
    lens = t[:, 1] - t[:, 0]
    offs = torch.cumsum(lens, 0) - lens
    return torch.arange(int(lens.sum())) + torch.repeat_interleave(t[:, 0] - base - offs, lens)


def clip_intervals(ivs: Sequence[Interval], lo: int, hi: int) -> List[Interval]:
    """The parts of ``ivs`` inside ``[lo, hi)``."""
    out = []
    for s, e in ivs:
        s2, e2 = max(s, lo), min(e, hi)
        if s2 < e2:
            out.append((s2, e2))
    return out


def intervals_numel(ivs: Sequence[Interval]) -> int:
    return sum(e - s for s, e in ivs)


def rank_range(bounds: Sequence[int], rank: int) -> Interval:
    return bounds[rank], bounds[rank + 1]


def chunk_range(start: int, stop: int, row: int, max_elems: int) -> List[Interval]:
    """Split ``[start, stop)`` into pieces of at most ``max(max_elems, row)`` elements whose inner cuts
    fall on multiples of ``row`` (so every piece but the first and last covers whole rows)."""
    if stop <= start:
        return []
    rows = max(1, max_elems // max(row, 1))
    out, s = [], start
    while s < stop:
        e = min(stop, (s // row + rows) * row)
        out.append((s, e))
        s = e
    return out


def owner_pieces(ivs: Sequence[Interval], bounds: Sequence[int], world: int) -> List[List[Interval]]:
    """``ivs`` split by owning rank: entry ``r`` holds the parts inside ``[bounds[r], bounds[r + 1])``."""
    return [clip_intervals(ivs, bounds[r], bounds[r + 1]) for r in range(world)]


__all__ = ['Interval', 'chunk_range', 'clip_intervals', 'interval_index', 'intervals_numel', 'owner_pieces', 'rank_range', 'runs_to_intervals']

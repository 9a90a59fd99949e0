"""What a rank holds of the old state for one piece of a new parameter: views of old flat ranges
(:class:`OldData`), looked up by old row (:class:`RowView`), and the whole-parameter reductions a designated
rank computes once (:class:`Reductions`).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from growth_ds.distributed.zero.intervals import Interval, interval_index

class OldData:
    """Old elements a rank holds for one piece: ``intervals`` (old flat, sorted, merged: what the piece
    needs) as *chunks* ``(start, stop, views, offset)`` in old flat order: chunk flat ``[start, stop)`` is
    ``views[c][offset:offset + stop - start]`` for channel ``c`` (0 the value, 1 ``exp_avg``, 2
    ``exp_avg_sq``; ``views`` a sequence of 1-D tensors, made contiguous here if one is not). Chunks let the
    executor compute straight from its own partitions and from what each owner sent, with no copy.
    ``OldData(intervals, data)`` wraps one dense ``[channels, n]`` tensor (or ``channels`` 1-D ones);
    :attr:`data` assembles one (a copy) for the paths that need it."""

    def __init__(self, intervals: List[Interval], data: Optional[Sequence[torch.Tensor]] = None,
                 chunks: Optional[List[tuple]] = None, channels: Optional[int] = None, contiguous: bool = False,
                 hosts: Optional[List[Optional[Sequence[np.ndarray]]]] = None):
        """``contiguous``: the caller guarantees every chunk view is 1-D and contiguous (not checked).
        ``hosts``: per chunk, its ``views`` as numpy arrays of the same (host, float32) memory, or None."""
        self.intervals = intervals
        self.hosts = hosts
        if data is not None:
            data = list(data.unbind(0)) if isinstance(data, torch.Tensor) else list(data)
        if chunks is None:
            chunks, pos = [], 0
            for a, b in intervals:
                chunks.append((a, b, data, pos))
                pos += b - a
        elif not contiguous:
            for j, (a, b, v, o) in enumerate(chunks):
                if any(t.dim() != 1 or t.stride(0) != 1 for t in v):
                    chunks[j] = (a, b, [t.reshape(-1).contiguous() for t in v], o)
        self.chunks = chunks
        self.starts = [ch[0] for ch in chunks]
        if channels is None:
            channels = len(data) if data is not None else min((len(ch[2]) for ch in chunks), default=0)
        self.channels = channels
        self._data = data
        self._has_zero: Optional[bool] = None

    @property
    def device(self) -> torch.device:
        """Where the old elements are (host memory when there are none)."""
        if self._data is not None and len(self._data):
            return self._data[0].device
        return self.chunks[0][2][0].device if self.chunks else torch.device("cpu")

    def to_host(self) -> "OldData":
        """The same old elements as one contiguous host tensor per channel (a copy)."""
        return OldData(self.intervals, [t.cpu() for t in self.data], channels=self.channels)

    @property
    def data(self) -> Sequence[torch.Tensor]:
        """Per channel, the needed old elements as one contiguous 1-D tensor."""
        if self._data is None:
            self._data = [torch.cat([v[c][o:o + b - a] for a, b, v, o in self.chunks]) if self.chunks
                          else torch.empty(0) for c in range(self.channels)]
        return self._data

    def host_data(self, c: int) -> Optional[np.ndarray]:
        """Channel ``c`` of :attr:`data` as a numpy array when every chunk is float32 in host memory (a view
        when there is one chunk, else one concatenation), else None."""
        if self.hosts is not None and all(h is not None for h in self.hosts):  # (no tensor-to-numpy per call)
            parts = [h[c][o:o + b - a] for h, (a, b, _, o) in zip(self.hosts, self.chunks)]
            return None if not parts else parts[0] if len(parts) == 1 else np.concatenate(parts)
        parts = []
        for a, b, v, o in self.chunks:
            t = v[c]
            if t.device.type != "cpu" or t.dtype != torch.float32:
                return None
            parts.append(t.numpy()[o:o + b - a])
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def row_spans(self, r0: int, r1: int, d1: int) -> Optional[List[tuple]]:
        """Where old rows ``[r0, r1)`` (of width ``d1``) lie, for every channel at once: ``(first row, k, views,
        offset)`` for ``k`` whole rows inside one chunk (rows ``views[c][offset:offset + k * d1]``), and ``(row,
        1, None, [(views, offset, n), ...])`` for a row that spans chunks (an owner boundary inside the row);
        None if some element was not received."""
        out, lo, hi = [], r0 * d1, r1 * d1
        chunks = self.chunks
        j = bisect.bisect_right(self.starts, lo) - 1
        pos = lo
        while pos < hi:
            if j < 0 or j >= len(chunks):
                return None
            a, b, v, o = chunks[j]
            if not a <= pos < b:
                return None
            if pos % d1 == 0 and b - pos >= d1:  # whole rows inside this chunk
                k = (min(b, hi) - pos) // d1
                out.append((pos // d1, k, v, o + pos - a))
                pos += k * d1
            else:  # a row across chunks
                row = pos // d1
                end = (row + 1) * d1
                parts = []
                while pos < end:
                    if j >= len(chunks):
                        return None
                    a, b, v, o = chunks[j]
                    if not a <= pos < b:
                        return None
                    n = min(b, end) - pos
                    parts.append((v, o + pos - a, n))
                    pos += n
                    if pos >= b:
                        j += 1
                out.append((row, 1, None, parts))
                continue
            if pos >= b:
                j += 1
        return out

    def has_zero(self) -> bool:
        """Whether any needed old value (channel 0) is an exact zero (one pass, cached)."""
        if self._has_zero is None:
            self._has_zero = any(int(torch.count_nonzero(v[0][o:o + b - a])) < b - a for a, b, v, o in self.chunks)
        return self._has_zero


@dataclass
class Reductions:
    """Whole-parameter reductions of the old value, computed once by a designated rank."""

    col_mean: Optional[torch.Tensor] = None   # [d_in] float64: x.mean(dim=0) of the old 2-D value
    std: Optional[float] = None               # float(w.double().std())


class RowView:
    """Old rows received for one piece, looked up by old row index."""

    def __init__(self, old: Optional[OldData], d1: int):
        self.d1 = d1
        self.data = None
        if old is None or not old.intervals:
            self.row_ids = torch.empty(0, dtype=torch.long)
            return
        self.row_ids = interval_index([(s // d1, e // d1) for s, e in old.intervals])
        self.data = [old.data[c].view(-1, d1) for c in range(len(old.data))]

    def positions(self, want: torch.Tensor):
        """Positions of old rows ``want`` in what was received (``None``: exactly the received rows, in
        order). Rows not received map to some received row: callers only ask for rows that the
        reference multiplies by 0 or replaces."""
        n = self.row_ids.numel()
        if n == want.numel() and bool((self.row_ids == want).all()):
            return None
        if n == 0:
            return torch.zeros(want.numel(), dtype=torch.long)
        return torch.searchsorted(self.row_ids, want).clamp(max=n - 1)

    def get(self, c: int, pos) -> torch.Tensor:
        if self.data is None:
            return torch.zeros(1 if pos is None else pos.numel(), self.d1, dtype=torch.float32)
        return self.data[c] if pos is None else self.data[c].index_select(0, pos)


__all__ = ['OldData', 'Reductions', 'RowView']

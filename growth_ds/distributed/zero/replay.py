"""The float64 replay of the reference executor on a block of new rows: the specification every faster path of
:class:`~growth_ds.distributed.zero.param_growth.ParamGrowth` must equal bit for bit.

For new rows ``[i0, i1)`` of a 2-D parameter it gathers the old rows ``src_b(i0..i1)``, maps them along both
axes in float64 exactly as ``growth_ds.ops.apply.grow_value`` / ``grow_moment`` do on the whole tensor (the
same operations in the same order, so the same roundings), adds the coupling and the noise window
(``growth_ds.ops.roles``, ``growth_ds.ops.noise``) and rounds once to float32. 1-D parameters run the
reference itself on the whole old vector.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from growth_ds.distributed.zero.old_data import OldData, Reductions, RowView
from growth_ds.ops.apply import grow_moment, grow_value
from growth_ds.ops.noise import noise_window

F64 = torch.float64


class Replay:
    """Mixed into :class:`~growth_ds.distributed.zero.param_growth.ParamGrowth` (reads its derived fields)."""

    def compute(self, start: int, stop: int, old: Optional[OldData], red: Optional[Reductions] = None,
                value: bool = True, moments: bool = True) -> List[Optional[torch.Tensor]]:
        """New flat ``[start, stop)`` of value, ``exp_avg``, ``exp_avg_sq`` (float32; ``None`` = zeros, or not
        asked for: ``value`` / ``moments`` False)."""
        if self.mode == "none":
            return [None, None, None]
        if self.mode == "full":
            return self._compute_full(start, stop, old)
        i0, i1 = self.rows_of(start, stop)
        lo = start - i0 * self.D1
        hi = lo + stop - start
        rows = RowView(old, self.d1)
        pos = rows.positions(torch.arange(i0, i1) if self.a0.identity else self.a0.map.src[i0:i1].clamp(min=0))
        K = self.K.rows(i0, i1) if self.K is not None else None
        out: List[Optional[torch.Tensor]] = [None, None, None]
        if value and not self.value_zero:
            out[0] = self._value_rows(i0, i1, rows, pos, K, red).reshape(-1)[lo:hi]
        if moments and not self.moment_zero:
            adj = torch.ones([], dtype=F64) * self.a0.adj(i0, i1).view(-1, 1)
            adj = adj * self.a1.adj(0, self.D1).view(1, -1)
            nz = adj != 0
            safe = torch.where(nz, adj, torch.ones_like(adj))
            Kmask = (K != 0) if K is not None else None
            for c, power in ((1, 1), (2, 2)):
                x = self._axis0(rows, pos, c, i0, i1, moment=True)
                if not self.a1.identity:
                    x = x.index_select(1, self.a1.full()[0]) * self.a1.keep.to(F64).view(1, -1)
                if Kmask is not None:
                    x = x * Kmask
                x = torch.where(nz, x / safe ** power, torch.zeros_like(x))
                out[c] = x.to(torch.float32).reshape(-1)[lo:hi]
        return out

    def _compute_full(self, start, stop, old: OldData) -> List[Optional[torch.Tensor]]:
        full = old.data
        w = full[0].reshape(self.old_shape)
        out: List[Optional[torch.Tensor]] = [None, None, None]
        if not self.value_zero:
            out[0] = grow_value(self.plan, self.name, self.spec, w).reshape(-1)[start:stop]
        if not self.moment_zero:
            for c, power in ((1, 1), (2, 2)):
                out[c] = grow_moment(self.plan, self.name, self.spec, full[c].reshape(self.old_shape),
                                     power).reshape(-1)[start:stop]
        return out

    def _axis0(self, rows: "RowView", pos, c: int, i0: int, i1: int, moment: bool) -> torch.Tensor:
        """Axis-0 map of rows ``[i0, i1)`` (before the mean replacement), float64 ``[i1 - i0, d1]``."""
        x = rows.get(c, pos).to(F64)
        if self.a0.identity:
            return x
        coef = self.a0.keep[i0:i1].to(F64) if moment else self.a0.coef[i0:i1]
        return x * coef.view(-1, 1)

    def _value_rows(self, i0, i1, rows: "RowView", pos, K, red: Optional[Reductions]) -> torch.Tensor:
        x = self._axis0(rows, pos, 0, i0, i1, moment=False)
        if self.a0.mean:
            keep = self.a0.keep[i0:i1]
            if not bool(keep.all()):
                x = torch.where(keep.view(-1, 1), x, red.col_mean.view(1, -1).expand_as(x))
        if not self.a1.identity:
            y = x.index_select(1, self.a1.full()[0]) * self.a1.coef.view(1, -1)
            if self.a1.mean:
                y = torch.where(self.a1.keep.view(1, -1), y, x.mean(dim=1, keepdim=True).expand_as(y))
            x = y
        if K is not None:
            x = x * K
        if self.noisy:
            x = x + noise_window(self.plan, self.name, self.spec, slice(i0, i1),
                                 full_std=red.std if red is not None else None)
        return x.to(torch.float32)


__all__ = ["Replay"]

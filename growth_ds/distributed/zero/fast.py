"""The float32 fast paths of :class:`~growth_ds.distributed.zero.param_growth.ParamGrowth`, each equal bit for bit
to the float64 replay (:mod:`growth_ds.distributed.zero.replay`) and taken only where that is provable:

* one multiply per element (``fast_value``/``fast_moment``): every factor of the element is 0 or a power of two
  and nothing else (mean rows, noise) enters, so the float64 product is exact and both paths round the same
  real number once; falls back to the replay otherwise;
* strided block copies for tiled maps (duplication, staged training, depth copies): whole runs of old rows
  and columns copied with their one factor (:meth:`FastPaths._block_rows`); falls back to the row gather of
  :meth:`FastPaths._fast_rows` when the runs do not tile;
* several parameters of one kind over one range at once (:meth:`FastPaths.stack_into`, every layer's
  ``attn.q`` under ZeRO-3); falls back to one parameter at a time when their slices do not lie at a stride;
* 1-D parameters by one gather and one multiply per channel (:class:`VectorGrowth`); falls back to the
  reference on the whole vector when a channel's factors are not powers of two.

Signed zeros: the reference adds its (all-zero) noise matrix to weights, so an exactly-zero product is +0
there; the fast paths normalise zeros where the old value holds one (``old_has_zero``).
"""
from __future__ import annotations

import bisect
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from growth_ds.distributed.zero.old_data import OldData, RowView

F64 = torch.float64


class TileRows(NamedTuple):
    """A row group of a tiled map (:meth:`FastPaths._group`): ``gr`` blocks of ``nr`` new rows, ``step`` rows
    apart, the first at new row ``r0`` past the range's first; their row factor ``f0`` and copy index ``k0``
    (staged training's coupling)."""

    r0: int
    step: int
    gr: int
    nr: int
    f0: float
    k0: int


_SCALARS: Dict[Tuple[float, float], torch.Tensor] = {}


def strided_runs(dsts: Sequence[torch.Tensor], dbase: List[int], xbase: List[int]) -> List[Tuple[int, int, int, int]]:
    """Members ``[a, b)`` whose outputs (in one storage) and old rows each lie at one non-negative stride
    (``do > 0``, ``dx >= 0``): ``(a, b, do, dx)``, greedily, in member order (one op per run)."""
    store = [t.untyped_storage().data_ptr() for t in dsts]
    out, a, M = [], 0, len(dbase)
    while a < M:
        b, do, dx = a + 1, 0, 0
        if b < M and store[b] == store[a]:
            do, dx = dbase[b] - dbase[a], xbase[b] - xbase[a]
            if do > 0 and dx >= 0:
                b += 1
                while b < M and dbase[b] - dbase[b - 1] == do and xbase[b] - xbase[b - 1] == dx and \
                        store[b] == store[a]:
                    b += 1
            else:
                do, dx = 0, 0
        out.append((a, b, do, dx))
        a = b
    return out


def _scalar(f: float) -> torch.Tensor:
    """``f`` as a 0-dim float32 CPU tensor, cached: ``torch.mul(x, t)`` computes what ``torch.mul(x, f)`` does
    on a float32 ``x`` (the factor in float32, one rounding) without wrapping a Python number on every call,
    which is half of a small multiply's cost here."""
    key = (f, math.copysign(1.0, f))  # (+0.0 == -0.0 as keys; as factors they differ)
    t = _SCALARS.get(key)
    if t is None:
        t = torch.tensor(f, dtype=torch.float32)
        if len(_SCALARS) < 4096:
            _SCALARS[key] = t
    return t


def all_pow2(a: np.ndarray) -> bool:
    """Every element is 0 or a positive power of two."""
    a = a.astype(np.float64, copy=False)
    mant, _ = np.frexp(a)
    return bool(((a == 0) | ((a > 0) & (mant == 0.5))).all())


class VectorGrowth:
    """A 1-D parameter's growth (biases, norms; ``ops.apply.grow_value`` / ``grow_moment`` on one axis, out
    side) as, per channel, ``new = old[idx] * mult`` in float32, then ``new[fix] = value``: one gather and
    one multiply instead of the reference's float64 ops. Built only where it is the reference bit for bit:
    every factor is 0 or a power of two (so the float64 product is exact and both round the same real number
    once); ``mult[c]`` is None for a channel where it is not (mean rows of a bias, a non-power-of-two norm
    gain): the reference runs there.

    Value: ``old[src] * coef`` (norms: times the gain ``scale``, new coordinates ``fill * scale``, 1 for a
    gain, 0 for a shift). Moments: ``old[src] * keep / adj**power`` (``adj`` the out-side adjoint, times
    ``scale`` on norms), +0 where ``adj == 0``."""

    def __init__(self, m, role: str, scale: float):
        src = m.src.numpy()
        keep = src >= 0
        self._idx = np.maximum(src, 0)
        self.mult: List[Optional[np.ndarray]] = [None, None, None]
        self.ones = [False, False, False]
        self.fix: List[Optional[Tuple[np.ndarray, np.ndarray]]] = [None, None, None]
        self._on: Dict[torch.device, tuple] = {}  # (idx, mult, fix) as tensors on a device (torch path)
        norm = role in ("norm", "norm_bias")
        s_ok = all_pow2(np.array([scale], dtype=np.float64))
        coef = m.out_coef.to(F64).numpy()
        mean_rows = m.residue == "mean" and not bool(keep.all()) and not m.is_identity
        if all_pow2(coef) and (s_ok if norm else not mean_rows):
            mult = coef * scale if norm else coef
            fix = None
            if norm and not bool(keep.all()):
                fill = 1.0 if role == "norm" else 0.0
                fix = (~keep, (np.full(m.new, fill, dtype=np.float64) * scale).astype(np.float32))
            self._set(0, mult, fix)
        adj0 = m.adjoint(True).to(F64).numpy()
        adj = adj0 * scale if norm else adj0
        if all_pow2(adj0) and (s_ok or not norm):
            nz = adj != 0
            for c in (1, 2):
                mult = np.where(nz, keep.astype(np.float64) / np.where(nz, adj, 1.0) ** c, 0.0)
                self._set(c, mult, None if bool(nz.all()) else (~nz, np.zeros(m.new, dtype=np.float32)))

    def _set(self, c: int, mult: np.ndarray, fix) -> None:
        m32 = mult.astype(np.float32)
        if np.array_equal(m32.astype(np.float64), mult):  # (a factor outside float32's range is not exact)
            self.mult[c], self.ones[c], self.fix[c] = m32, bool((mult == 1).all()), fix

    def apply(self, c: int, old, start: int, stop: int, out: torch.Tensor) -> None:
        """New ``[start, stop)`` of channel ``c`` from the whole old vector ``old`` (a tensor, or a numpy array
        of host memory) into ``out``. On the CPU through numpy views of the same memory (the same float32
        gather and multiply, at a fraction of torch's per-op cost on vectors this small), elsewhere torch."""
        if out.device.type == "cpu" and out.dtype == torch.float32 and (
                isinstance(old, np.ndarray) or old.device.type == "cpu" and old.dtype == torch.float32):
            self.apply_host(c, old if isinstance(old, np.ndarray) else old.numpy(), start, stop, out.numpy())
            return
        idx, mult, fix = self._tensors(out.device)
        old = torch.from_numpy(old) if isinstance(old, np.ndarray) else old
        torch.index_select(old.to(out.device), 0, idx[start:stop], out=out)
        if not self.ones[c]:
            out.mul_(mult[c][start:stop])
        if fix[c] is not None:
            mask = fix[c][0][start:stop]
            out[mask] = fix[c][1][start:stop][mask]

    def apply_host(self, c: int, old: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
        """:meth:`apply` on float32 numpy arrays (host memory)."""
        old.take(self._idx[start:stop], out=out, mode="clip")  # (indices are in range; "clip" writes in place)
        if not self.ones[c]:
            np.multiply(out, self.mult[c][start:stop], out=out)
        if self.fix[c] is not None:
            mask = self.fix[c][0][start:stop]
            out[mask] = self.fix[c][1][start:stop][mask]

    def _tensors(self, device: torch.device) -> tuple:
        if device not in self._on:
            t = lambda a: None if a is None else torch.from_numpy(a).to(device)  # noqa: E731
            self._on[device] = (t(self._idx), [t(m) for m in self.mult],
                                [None if f is None else (t(f[0]), t(f[1])) for f in self.fix])
        return self._on[device]


class FastPaths:
    """Mixed into :class:`~growth_ds.distributed.zero.param_growth.ParamGrowth` (reads its derived fields)."""

    def _vector_into(self, start: int, stop: int, old: Optional[OldData], views: Sequence[torch.Tensor]) -> None:
        """A 1-D parameter's new ``[start, stop)``: :class:`VectorGrowth` where a channel is exact in float32,
        else the reference on the whole old vector."""
        vec = self.vec
        ref = None
        on_host = views[0].device.type == "cpu" and views[0].dtype == torch.float32
        for c in range(3):
            if self.zero[c]:
                views[c].zero_()
            elif vec.mult[c] is None:
                if ref is None:
                    ref = self._compute_full(start, stop, old)
                views[c].copy_(ref[c])
            else:
                host = old.host_data(c)
                if host is not None and on_host:  # (numpy throughout: no torch dispatch per small op)
                    vec.apply_host(c, host, start, stop, views[c].numpy())
                else:
                    vec.apply(c, host if host is not None else old.data[c], start, stop, views[c])

    def _runs(self, chans: Tuple[int, ...]):
        """The map as blocks for channels ``chans``: ``(row runs, their new starts, column tiles)`` (see
        :meth:`SpaceSide.block_runs`); None when either axis has too many runs (rows are then gathered)."""
        if chans not in self._block_runs:
            rows = self.a0.block_runs(chans, self.K_g, self.D0)
            cols = self.a1.block_runs(chans, self.K_g, self.D1)
            tiles: List[list] = []  # column runs that repeat one old range side by side: (new start, copies)
            for ns, os_, n, f, k in cols or []:
                t = tiles[-1] if tiles else None
                if t is not None and t[1:3] == [os_, n] and t[4:6] == [f, k] and ns == t[0] + t[3] * n:
                    t[3] += 1
                else:
                    tiles.append([ns, os_, n, 1, f, k])
            self._block_runs[chans] = None if rows is None or cols is None else (rows, [r[0] for r in rows], tiles)
        return self._block_runs[chans]

    def _block_rows(self, i0: int, i1: int, old: Optional[OldData], chans: Tuple[int, ...],
                    dsts: Dict[int, Tuple[torch.Tensor, int]]) -> Tuple[int, ...]:
        """Rows ``[i0, i1)`` of channels ``chans`` into ``dsts[c] = (t, off)``: row ``i0 + r`` is ``t[off + r * D1:
        off + (r + 1) * D1]`` (``t`` 1-D, contiguous). Written as one strided multiply
        (or copy) per (row run, column run) block, straight from the old rows where they are (partitions, a
        peer's segment): one pass over each output. Runs that repeat the same old range (duplication tiles)
        are one broadcast op, which reads each old row once per tile while it is in cache. Where the old
        rows lie is worked out once for every channel. Returns the channels written: none when the map has
        too many runs or an old row is missing, all but the value when (weights) an old value is an exact
        zero, whose sign the reference normalises (the caller then takes the gathering path)."""
        if old is None or not old.chunks:
            return ()
        runs = self._runs(chans)
        if runs is None:  # too many runs over all channels together: channel by channel
            return tuple(c for c in chans if len(chans) > 1 and self._block_rows(i0, i1, old, (c,), dsts))
        if 0 in chans and self.noisy and (self.old_has_zero if self.old_has_zero is not None else old.has_zero()):
            chans = tuple(c for c in chans if c != 0)
            if not chans:
                return ()
        rruns, rstarts, cruns = runs
        spans = self._spans(i0, i1, old, rruns, rstarts)
        if spans is None:
            return ()
        groups = self._group(spans)
        one = [(0, 1, 0, 0)]  # (a single member: see strided_runs)
        for c in chans:
            dst, doff = dsts[c]
            dbase = [dst.storage_offset() + doff]
            for r0, step, gr, js in groups:
                (_, nr, v, o), _, f0s, k0 = spans[js[0]]
                if v is None:  # a row across chunks: assembled
                    x, xbase = torch.cat([w[c][q:q + n] for w, q, n in o]), [0]
                else:
                    x = v[c]
                    xbase = [x.storage_offset() + o]
                self._tile_ops(c, [dst], dbase, x, xbase, one, TileRows(r0, step, gr, nr, f0s[c], k0), cruns)
        return chans

    def stack_into(self, start: int, stop: int, members: Sequence[Tuple["FastPaths", OldData, Sequence[torch.Tensor]]]
                   ) -> bool:
        """:meth:`compute_into` of new flat ``[start, stop)`` for several parameters of this kind at once
        (``members``: ``(growth, old data, views)``, e.g. every layer's ``attn.q``), each block op run once for
        all of them where their outputs and old rows lie at a constant stride in the same memory (ZeRO-3 lays
        a kind's layers out that way: the same op with a leading layer dimension). The same elementwise
        arithmetic as :meth:`_block_rows`, so the same bits; fewer ops and no per-parameter index work.
        Returns False, having written nothing that the per-parameter path would not rewrite, where the
        float32 block path does not cover the range (partial rows, many runs, rows across chunks, an old
        value with an exact zero, members whose old rows are laid out differently): the caller then takes
        :meth:`compute_into` for each member."""
        if any(v.device.type != "cpu" for _, _, views in members for v in views):
            return False  # (accelerator slices: one piece at a time, through compute_on_host)
        if self.mode != "rows" or not (self.fast_value and self.fast_moment) or start % self.D1 or stop % self.D1:
            return False
        chans = tuple(c for c in range(3) if not self.zero[c])
        if not chans:
            return False
        runs = self._runs(chans)
        if runs is None:
            return False
        if 0 in chans and self.noisy and any(g.old_has_zero is not False for g, _, _ in members):
            return False
        rruns, rstarts, cruns = runs
        i0, i1 = start // self.D1, stop // self.D1
        spans = []  # per member, where its old rows lie (_spans)
        for _, old, _ in members:
            sp = self._spans(i0, i1, old, rruns, rstarts) if old is not None and old.chunks else None
            if sp is None:
                return False
            spans.append(sp)
        first = spans[0]
        for sp in spans:  # every member's old rows split the same way, whole rows in one chunk, in the same memory
            if len(sp) != len(first) or any(q[0][2] is None or q[0][2] is not p[0][2] or q[0][:2] != p[0][:2]
                                            for p, q in zip(first, sp)):
                return False
        groups = self._group(first)
        # a group of row blocks reading the same old rows holds for every member whose old offsets move by one
        # amount across it
        if any(len({sp[j][0][3] - first[j][0][3] for j in js}) > 1
               for _, _, _, js in groups if len(js) > 1 for sp in spans[1:]):
            return False
        for _, _, views in members:  # zero channels (identity blocks, the reset rule)
            for c in range(3):
                if self.zero[c]:
                    views[c].zero_()
        for c in chans:
            dsts = [views[c] for _, _, views in members]
            dbase = [t.storage_offset() for t in dsts]
            for r0, step, gr, js in groups:
                (_, nr, v, _), _, f0s, k0 = first[js[0]]
                x = v[c]
                xbase = [x.storage_offset() + sp[js[0]][0][3] for sp in spans]
                self._tile_ops(c, dsts, dbase, x, xbase, strided_runs(dsts, dbase, xbase),
                               TileRows(r0, step, gr, nr, f0s[c], k0), cruns)
        return True

    def _spans(self, i0: int, i1: int, old: OldData, rruns, rstarts) -> Optional[List[tuple]]:
        """Where the old rows of new rows ``[i0, i1)`` lie, along the row runs: ``(span, base, factors, copy)``
        per :meth:`OldData.row_spans` span, ``base`` the old row of new row ``i0`` along the span's row run;
        None if an old row was not received."""
        out = []
        k = max(bisect.bisect_right(rstarts, i0) - 1, 0)
        while k < len(rruns) and rruns[k][0] < i1:
            ns, os_, n, f0, k0 = rruns[k]
            a, b = max(ns, i0), min(ns + n, i1)
            sp = old.row_spans(os_ + a - ns, os_ + b - ns, self.d1)
            if sp is None:
                return None
            base = os_ + a - ns - (a - i0)
            out.extend((x, base, f0, k0) for x in sp)
            k += 1
        return out

    @staticmethod
    def _group(spans: List[tuple]) -> List[Tuple[int, int, int, List[int]]]:
        """:meth:`_spans` as row groups ``(first new row - i0, step, count, span indices)``: the row blocks that
        read the same old rows at a regular stride (duplication tiles) are one group, one op per channel and
        column tile; any other block is a group of its own."""
        keyed: Dict[tuple, list] = {}
        for j, (sp, base, f0, k0) in enumerate(spans):
            key = (id(sp[2]), sp[3], sp[1], f0, k0) if sp[2] is not None else (j,)  # (a row across chunks: alone)
            keyed.setdefault(key, []).append((sp[0] - base, j))
        groups = []
        for items in keyed.values():
            nr = spans[items[0][1]][0][1]
            step = items[1][0] - items[0][0] if len(items) > 1 else nr
            if step >= nr and all(q[0] - p[0] == step for p, q in zip(items[:-1], items[1:])):
                groups.append((items[0][0], step, len(items), [j for _, j in items]))
            else:
                groups.extend((r0, nr, 1, [j]) for r0, j in items)
        return groups

    def _tile_ops(self, c: int, dsts: Sequence[torch.Tensor], dbase: List[int], x: torch.Tensor, xbase: List[int],
                  members: List[Tuple[int, int, int, int]], rows: "TileRows", cruns) -> None:
        """Channel ``c`` of one row group (``rows``, read from old rows at ``xbase`` in ``x``): per column tile,
        one strided multiply (a copy at factor 1, a +0 fill where the reference writes one) for each run
        ``(a, b, do, dx)`` of members (:func:`strided_runs`), whose outputs start at ``dbase`` in ``dsts``."""
        D1, d1 = self.D1, self.d1
        r0, step, gr, nr, f0, k0 = rows
        noisy = c == 0 and self.noisy
        for ns, os_, n, gc, f1s, k1 in cruns:  # (column tiles)
            f1 = f1s[c]
            f = f0 * f1 if k0 == k1 else 0.0  # staged coupling: K = g on matching copies, else 0
            if k0 == k1 and self.K_g != 1 and c == 0:
                f *= self.K_g
            # +0: the reference adds its zero noise (weights) or writes 0 where adj = 0
            zero = f == 0.0 and (noisy or c > 0 and (f0 == 0.0 or f1 == 0.0))
            for a, b, do, dx in members:
                out = dsts[a].as_strided((b - a, gr, nr, gc, n), (do, step * D1, D1, n, 1), dbase[a] + r0 * D1 + ns)
                if zero:
                    out.zero_()
                    continue
                src = x.as_strided((b - a, gr, nr, gc, n), (dx, 0, d1, 0, 1), xbase[a] + os_)
                if f == 1.0:
                    out.copy_(src)
                else:  # (a factor of 0 elsewhere keeps the sign of the old value, as the reference does)
                    torch.mul(src, _scalar(f), out=out)

    def _fast_rows(self, i0, i1, rows: "RowView", pos, K, c: int, dst: Optional[torch.Tensor]) -> torch.Tensor:
        """One channel of rows ``[i0, i1)`` in float32 with a single rounding per element: the gathered old
        value times a power-of-two factor. Column runs (duplication tiles the columns) are copied and scaled
        in one pass each."""
        x = rows.get(c, pos)  # [r, d1]
        if c == 0:
            m0, m1 = self.a0.coef[i0:i1], self.a1.coef
        else:
            power = 1 if c == 1 else 2
            m0, m1 = self.a0.inv_pow(power), self.a1.inv_pow(power)
            m0 = torch.ones(i1 - i0, dtype=F64) if m0 is None else m0[i0:i1]
            m1 = torch.ones(self.D1, dtype=F64) if m1 is None else m1
        ones0 = self.a0.identity or bool((m0 == 1).all())
        ones1 = self.a1.identity or bool((m1 == 1).all())
        out = dst if dst is not None else torch.empty(i1 - i0, self.D1, dtype=torch.float32)
        # the reference adds its (all-zero) noise matrix to weights: an exactly-zero product becomes +0, while
        # a product that only rounds to zero keeps its sign; remember where the old value itself is zero
        fix_zeros = c == 0 and self.noisy
        zero_x = (x == 0) if fix_zeros and bool((x == 0).any()) else None
        runs = [(0, 0, self.D1)] if self.a1.identity else self.a1.runs()
        if K is None and (ones0 or ones1) and runs is not None:
            col0 = None if ones0 else m0.to(torch.float32).view(-1, 1)
            for d, src, n in runs:
                seg, o = x[:, src:src + n], out[:, d:d + n]
                if ones0 and ones1:
                    o.copy_(seg)
                elif not ones0:
                    torch.mul(seg, col0, out=o)
                else:
                    part = m1[d:d + n]
                    if bool((part == part[0]).all()):
                        torch.mul(seg, float(part[0]), out=o)
                    else:
                        torch.mul(seg, part.to(torch.float32).view(1, -1), out=o)
        else:
            if self.a1.identity:
                out.copy_(x)
            else:
                torch.index_select(x, 1, self.a1.full()[0], out=out)
            mult = m0.view(-1, 1) * m1.view(1, -1)
            if K is not None:
                mult = mult * (K if c == 0 else (K != 0))
            out.mul_(mult.to(torch.float32))
            if fix_zeros and K is not None:
                out.masked_fill_(K == 0, 0.0)
        z0, z1 = m0 == 0, m1 == 0
        if c == 0 and fix_zeros and zero_x is not None:
            out.masked_fill_(zero_x if self.a1.identity else zero_x.index_select(1, self.a1.full()[0]), 0.0)
        if c > 0 or fix_zeros:  # +0 where the factor is 0 (moments: the reference writes zeros there)
            if bool(z0.any()):
                out[z0] = 0.0
            if bool(z1.any()):
                out[:, z1] = 0.0
        return out


__all__ = ["FastPaths", "VectorGrowth", "all_pow2", "strided_runs"]

"""The arithmetic of one new parameter, on any range of its new flat elements: which old elements it
reads (:meth:`ParamGrowth.needs`) and how it computes them (:meth:`ParamGrowth.compute_into`), bit-identical
to the reference executor ``growth_ds.ops.apply`` on the whole tensor.

:class:`ParamGrowth` holds what is derived from the plan (the maps on both axes, the coupling, which
reductions and fast paths apply) and the index math (:meth:`~ParamGrowth.needs`); its arithmetic comes in two
named parts: the float64 replay of the reference, which *is* the specification
(:mod:`growth_ds.distributed.zero.replay`), and the float32 fast paths, each taken only where it provably
gives the same bits and falling back to the replay otherwise (:mod:`growth_ds.distributed.zero.fast`).
:meth:`ParamGrowth.compute_into` chooses between them.

How a new element is made (see :mod:`growth_ds.ops.apply`)
----------------------------------------------------------
For a 2-D parameter ``W'[i', j'] = ((W[src_b(i'), src_a(j')] * c_b(i')) * c_a(j')) * K[i', j'] + N[i', j']``
in float64, cast to float32. So a block of new rows ``[i0, i1)`` needs exactly the old rows
``src_b(i0..i1)`` (:meth:`ParamGrowth.needs` returns them as intervals); the rest is elementwise.
Three parts are not a gather of a few old elements and are handled so that the result stays
bit-identical to the reference:

* **mean rows** (``residue == "mean"`` on the out side of axis 0: GPT-2's ``model`` space grown by a
  non-integer factor, for ``attn.o`` / ``mlp.down``): the reference takes ``x.mean(dim=0)`` over the
  whole old parameter, and a float64 column reduction is *not* reproducible from a subset of columns
  (the summation order differs), so one designated rank receives the whole old parameter, computes the
  same reduction on the same shape, and shares the ``[d_in]`` result (:meth:`ParamGrowth.reduce`). The
  axis-1 mean of embeddings is a per-row reduction, the same reduction over the same row on any rank, so
  it is computed locally on the rows a rank needs.
* **relative noise** (HyperCloning's ``std`` of the whole old weight): the same, one scalar.
* **random parts** (fan-in splits, random columns and new units) are drawn as the reference draws them,
  by :func:`growth_ds.ops.noise.keyed_randn`: row blocks of about 64K elements, each from a generator
  keyed by ``(seed, parameter name, purpose, block)``, so a rank draws only the blocks of its own rows
  and never materialises (or skips through) a whole random matrix.

1-D parameters (biases, norms) are tiny: a rank owning part of one receives the whole old vector
(``mode == "full"``) and computes its part as one gather and one multiply per channel
(:class:`~growth_ds.distributed.zero.fast.VectorGrowth`) where that is exact, else runs the reference itself.
"""
from __future__ import annotations

import bisect
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from growth_ds.distributed.zero.intervals import Interval, runs_to_intervals
from growth_ds.distributed.zero.old_data import OldData, Reductions, RowView
from growth_ds.distributed.zero.fast import FastPaths, VectorGrowth, all_pow2
from growth_ds.distributed.zero.replay import Replay
from growth_ds.models.schema import ParamSpec
from growth_ds.ops.apply import is_identity_block, source_name
from growth_ds.ops.noise import needs_full_std
from growth_ds.ops.plan import GrowthPlan
from growth_ds.ops.roles import coupling, norm_scale, param_axes

F64 = torch.float64


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


class SpaceSide:
    """One space map used on one side (out: ``S``, in: ``T``), shared by every parameter that maps an axis
    that way. Holds O(D) bytes; the float64 vectors an axis needs in full are built lazily once. The index
    math (runs, power-of-two checks) runs on numpy views of the map's vectors: these are small vectors and
    a numpy op on a small vector costs far less than a torch dispatch; the arithmetic paths get
    torch tensors sharing the same memory (:attr:`keep`, :attr:`coef`, :meth:`full`, :meth:`inv_pow`)."""

    def __init__(self, m, side: str):
        self.map, self.side = m, side
        self.identity = m.is_identity
        self._src = m.src.numpy()  # int64, -1 for a new coordinate
        self._keep = self._src >= 0
        self.all_keep = bool(self._keep.all())
        self._coef = np.ascontiguousarray((m.out_coef if side == "out" else m.in_coef).to(F64).numpy())
        self.keep, self.coef = torch.from_numpy(self._keep), torch.from_numpy(self._coef)
        self.mean = (not self.identity) and side == "out" and m.residue == "mean" and not self.all_keep
        self._full: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self._full_t: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._inv: dict = {}

    def adj(self, i0: int, i1: int) -> torch.Tensor:
        """``SpaceMap.adjoint(side == "out")[i0:i1]`` (same arithmetic; 1 on an identity map)."""
        if self.identity:
            return torch.ones(i1 - i0, dtype=F64)
        return self.full()[1][i0:i1]

    def _full_np(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._full is None:
            cnt = self.map.counts.to(F64).numpy()
            keep = self._keep
            adj = np.zeros(self.map.new, dtype=np.float64)
            adj[keep] = cnt[self._src[keep]] * self._coef[keep]
            self._full = (np.maximum(self._src, 0), adj)
        return self._full

    def full(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(clamped src, adjoint) over all new coordinates: 16 bytes per coordinate, built once."""
        if self._full_t is None:
            self._full_t = tuple(torch.from_numpy(a) for a in self._full_np())
        return self._full_t

    def runs(self, max_runs: int = 64) -> Optional[List[Tuple[int, int, int]]]:
        """The clamped source index as runs of consecutive old coordinates: ``(new start, old start, length)``
        covering all new coordinates (duplication: one run per copy); None if there are more than
        ``max_runs`` (then the columns are gathered by index)."""
        if "runs" not in self._inv:
            src = self._full_np()[0]
            brk = (np.flatnonzero(src[1:] != src[:-1] + 1) + 1).tolist()
            starts = [0] + brk
            stops = brk + [src.size]
            runs = [(a, o, b - a) for a, b, o in zip(starts, stops, src[starts].tolist())]
            self._inv["runs"] = runs if len(runs) <= max_runs else None
        return self._inv["runs"]

    def _factors(self, c: int) -> np.ndarray:
        """Channel ``c``'s float64 factor per new coordinate: ``coef`` for values, ``1 / adjoint**c`` for
        moments (0 where the adjoint is 0); all ones on an identity map."""
        if self.identity:
            return np.ones(self.map.new, dtype=np.float64)
        return self._coef if c == 0 else self._inv_pow(c)

    def block_runs(self, chans: Tuple[int, ...], couple: int, D: int, max_runs: int = 64):
        """This axis as runs ``(new start, old start, length, factors, copy)``: consecutive old coordinates
        under one factor per channel (``factors[c]`` for each ``c`` in ``chans``: ``coef`` for values,
        ``1 / adjoint**c`` for moments, 0 where the adjoint is, all ones on an identity map) and one copy index
        modulo ``couple`` (staged training's block coupling; 0 when ``couple == 1``), so one run serves every
        channel. Duplication gives one run per copy; None if more than ``max_runs``. Cached: every parameter
        that maps an axis this way shares it."""
        key = ("block", chans, couple)
        if key not in self._inv:
            copy = self.map.copy.numpy() % couple if couple != 1 else np.zeros(D, dtype=np.int64)
            if self.identity and not (copy != copy[0]).any():  # (e.g. the vocabulary: one run, all ones)
                self._inv[key] = [(0, 0, D, (1.0, 1.0, 1.0), int(copy[0]))]
                return self._inv[key]
            src = np.arange(D) if self.identity else self._full_np()[0]
            ms = [self._factors(c) for c in range(3)]
            brk = (src[1:] != src[:-1] + 1) | (copy[1:] != copy[:-1])
            for c in chans:
                brk |= ms[c][1:] != ms[c][:-1]
            brk = np.flatnonzero(brk)
            runs = None
            if brk.size < max_runs:
                starts = [0] + (brk + 1).tolist()
                stops = starts[1:] + [D]
                fs = list(zip(*[m[starts].tolist() for m in ms]))
                runs = [(a, o, b - a, f, k) for a, b, o, f, k in zip(starts, stops, src[starts].tolist(), fs,
                                                                     copy[starts].tolist())]
            self._inv[key] = runs
        return self._inv[key]

    def pow2(self, what: str) -> bool:
        """Whether every ``coef`` (or adjoint, ``what == "adj"``) is 0 or a power of two (cached)."""
        key = ("pow2", what)
        if key not in self._inv:
            self._inv[key] = True if self.identity else all_pow2(self._coef if what == "coef" else self._full_np()[1])
        return self._inv[key]

    def kept_runs(self, max_runs: int = 256) -> Optional[Tuple[List[Tuple[int, int, int, bool]], List[int]]]:
        """All new coordinates as runs ``(new start, old start, length, kept)`` and the runs' new starts: kept
        runs copy consecutive old coordinates, the others are new (``src < 0``); None if more than
        ``max_runs`` (cached)."""
        if "kept" not in self._inv:
            src, keep = self._src, self._keep
            brk = np.flatnonzero((keep[1:] != keep[:-1]) | (keep[1:] & (src[1:] != src[:-1] + 1))) + 1
            runs = None
            if brk.size < max_runs:
                starts = [0] + brk.tolist()
                stops = starts[1:] + [src.size]
                runs = [(a, o, b - a, k) for a, b, o, k in zip(starts, stops, src[starts].tolist(),
                                                               keep[starts].tolist())]
            self._inv["kept"] = None if runs is None else (runs, [r[0] for r in runs])
        return self._inv["kept"]

    def _inv_pow(self, power: int) -> np.ndarray:
        key = f"inv{power}"
        if key not in self._inv:
            adj = self._full_np()[1]
            nz = adj != 0
            self._inv[key] = np.where(nz, 1.0 / np.where(nz, adj, 1.0) ** power, 0.0)
        return self._inv[key]

    def inv_pow(self, power: int) -> Optional[torch.Tensor]:
        """``1 / adjoint**power`` where the adjoint is non-zero, else 0 (float64; exact when the adjoint is a
        power of two, which the fast path checks); None on an identity map (all ones)."""
        return None if self.identity else torch.from_numpy(self._inv_pow(power))


class PlanCache:
    """Shared, per-plan derived data (one per executor run), so per-parameter state is O(1)."""

    def __init__(self, plan: GrowthPlan):
        self.plan = plan
        self._sides: Dict[Tuple[str, str], SpaceSide] = {}
        self._vectors: Dict[tuple, VectorGrowth] = {}
        self._growths: Dict[tuple, ParamGrowth] = {}

    def growth(self, name: str, spec: ParamSpec) -> "ParamGrowth":
        """``ParamGrowth(plan, name, spec)``, cheaply: parameters of one kind (the same spec but for the layer,
        and the same identity-block status: every copied layer's ``attn.q``) share everything derived from the
        plan (space sides, fast-path checks, block runs, needed-row intervals); only names differ."""
        key = tuple(v for k, v in vars(spec).items() if k != "layer") + (is_identity_block(self.plan, name),)
        proto = self._growths.get(key)
        if proto is None:
            proto = self._growths[key] = ParamGrowth(self.plan, name, spec, self)
            proto.kind = len(self._growths) - 1
            return proto
        return proto.renamed(name, spec)

    def side(self, space: str, side: str) -> SpaceSide:
        key = (space, side)
        if key not in self._sides:
            self._sides[key] = SpaceSide(self.plan.spaces[space], side)
        return self._sides[key]

    def vector(self, spec: ParamSpec) -> "VectorGrowth":
        """The :class:`VectorGrowth` of a 1-D parameter (shared by every parameter of that kind)."""
        norm = spec.role in ("norm", "norm_bias")
        scale = norm_scale(self.plan, spec) if norm else 1.0
        key = (spec.axes[0], spec.role if norm else "bias", scale)
        if key not in self._vectors:
            self._vectors[key] = VectorGrowth(self.plan.spaces[spec.axes[0]], key[1], scale)
        return self._vectors[key]


class ParamGrowth(FastPaths, Replay):
    """How new parameter ``name`` is made from its source, any block of new rows at a time.

    ``mode``: ``none`` (value and moments are exact zeros: needs nothing), ``full`` (1-D: the whole old
    parameter, reference applied), ``rows`` (2-D: old rows gathered by index, arithmetic replayed).
    ``channels``: 1 when the moments are zero (reset rule, identity blocks), else 3.
    """

    def __init__(self, plan: GrowthPlan, name: str, spec: ParamSpec, cache: Optional[PlanCache] = None):
        self.plan, self.name, self.spec = plan, name, spec
        self.source = source_name(plan, name)
        self.new_shape = tuple(plan.spaces[s].new for s in spec.axes)
        self.old_shape = tuple(plan.spaces[s].old for s in spec.axes)
        self.new_numel, self.old_numel = _numel(self.new_shape), _numel(self.old_shape)
        ident = is_identity_block(plan, name)
        self.value_zero = ident and spec.residual_out
        self.moment_zero = plan.moments == "reset" or ident
        self.channels = 1 if self.moment_zero else 3
        self.zero = (self.value_zero, self.moment_zero, self.moment_zero)  # per channel: exactly zero
        if self.value_zero and self.moment_zero:
            self.mode = "none"
        elif len(spec.axes) == 1:
            self.mode = "full"
        else:
            self.mode = "rows"
        self.reductions: Tuple[str, ...] = ()
        self.old_has_zero: Optional[bool] = None  # whether the old value holds an exact 0 (None: check pieces)
        self.kind: Optional[int] = None  # PlanCache.growth: parameters of one kind share it (None: its own kind)
        cache = cache or PlanCache(plan)
        self._block_runs: dict = {}  # (shared by every parameter of the kind: PlanCache.growth)
        self._needs: Dict[Interval, List[Interval]] = {}
        self.vec = cache.vector(spec) if self.mode == "full" else None
        if self.mode != "rows":
            return
        (s0, side0), (s1, side1) = param_axes(spec)
        self.a0, self.a1 = cache.side(s0, side0), cache.side(s1, side1)
        self.d0, self.d1 = self.old_shape
        self.D0, self.D1 = self.new_shape
        self.noisy = spec.role in ("weight", "head")
        # staged training's block coupling (ops.roles.coupling), row by row
        self.K = coupling(plan, spec)
        self.K_g = 1 if self.K is None else self.K.g
        red = []
        if self.a0.mean and not self.value_zero:
            red.append("col_mean")
        if self.noisy and not self.value_zero and needs_full_std(plan, spec):
            red.append("std")
        self.reductions = tuple(red)
        self.fast_value, self.fast_moment = self._fast_paths(plan)

    def renamed(self, name: str, spec: ParamSpec) -> "ParamGrowth":
        """The same growth for parameter ``name`` of the same kind (see :meth:`PlanCache.growth`): a shallow copy
        sharing the derived data and its caches."""
        g = object.__new__(ParamGrowth)  # (a shallow copy without copy.copy's generic protocol)
        g.__dict__.update(self.__dict__)
        g.name, g.spec, g.source, g.old_has_zero = name, spec, source_name(self.plan, name), None
        return g

    def _fast_paths(self, plan: GrowthPlan) -> Tuple[bool, bool]:
        """Whether values / moments can be computed in float32 with one multiply per element and still equal
        the float64 reference bit for bit: true when every factor is zero or a power of two (then the float64
        product is exact and both paths round the same real number once) and nothing else (mean rows,
        noise) enters. Net2Net/bert2BERT duplication, staged training, depth copies: typically yes. A channel
        that is exactly zero (identity blocks, the reset rule) is always fast."""
        a, b = self.a1, self.a0
        noise = self.noisy and (
            (plan.noise == "zero_sum" and plan.noise_std > 0 and not a.identity)
            or (not a.all_keep and a.map.residue in ("zero", "mean") and plan.random_std > 0)
            or (not b.all_keep and b.map.residue == "random"))
        k_ok = self.K_g & (self.K_g - 1) == 0  # (a positive int)
        value = self.value_zero or (not b.mean and not a.mean and not noise and k_ok and b.pow2("coef")
                                    and a.pow2("coef"))
        moment = self.moment_zero or (k_ok and b.pow2("adj") and a.pow2("adj"))
        return value, moment

    def compute_into(self, start: int, stop: int, old: Optional[OldData], red: Optional[Reductions],
                     views: Sequence[torch.Tensor]) -> None:
        """Write new flat ``[start, stop)`` of value, ``exp_avg``, ``exp_avg_sq`` into ``views`` (float32,
        length ``stop - start`` each). Same results as :meth:`compute`; takes the float32 fast path where
        it is exact: whole rows are written in place, a partial row at either end through a one-row buffer;
        1-D parameters as one gather and one multiply per channel (:class:`VectorGrowth`). Slices on an
        accelerator are computed on the host (:meth:`compute_on_host`)."""
        if any(v.device.type != "cpu" for v in views) or (old is not None and old.device.type != "cpu"):
            self.compute_on_host(start, stop, old, red, views)
            return
        if self.vec is not None:
            self._vector_into(start, stop, old, views)
            return
        if self.mode == "rows" and (self.fast_value or self.fast_moment):
            D1 = self.D1
            slow = None if self.fast_value and self.fast_moment else \
                self.compute(start, stop, old, red, value=not self.fast_value, moments=not self.fast_moment)
            chans = []
            for c in range(3):
                if self.zero[c]:
                    views[c].zero_()
                elif not (self.fast_value if c == 0 else self.fast_moment):
                    views[c].copy_(slow[c])
                else:
                    chans.append(c)
            if not chans:
                return
            chans = tuple(chans)
            a, b = -(-start // D1), stop // D1  # whole rows [a, b)
            parts = []  # (row0, row1, offset of the written elements in the piece, first column, columns)
            if a > b:  # inside one row
                parts.append((b, b + 1, 0, start - b * D1, stop - start))
            else:
                if start < a * D1:
                    parts.append((a - 1, a, 0, start - (a - 1) * D1, a * D1 - start))
                if b > a:
                    parts.append((a, b, a * D1 - start, 0, (b - a) * D1))
                if stop > b * D1:
                    parts.append((b, b + 1, b * D1 - start, 0, stop - b * D1))
            gathered = None  # the gathering path's (received rows, positions of rows [i0, i1), K), on first need
            for r0, r1, off, col, n in parts:
                whole = col == 0 and n == (r1 - r0) * D1
                dsts = {c: (views[c], off) if whole else (torch.empty((r1 - r0) * D1, dtype=torch.float32), 0)
                        for c in chans}
                done = self._block_rows(r0, r1, old, chans, dsts)
                for c in chans:
                    if c not in done:
                        if gathered is None:
                            i0, i1 = self.rows_of(start, stop)
                            rows = RowView(old, self.d1)
                            want = torch.arange(i0, i1) if self.a0.identity else \
                                self.a0.map.src[i0:i1].clamp(min=0)
                            gathered = (i0, i1, rows, rows.positions(want),
                                        self.K.rows(i0, i1) if self.K is not None else None)
                        i0, i1, rows, pos_all, K = gathered
                        pos = None if pos_all is None and (r0, r1) == (i0, i1) else \
                            (torch.arange(r0 - i0, r1 - i0) if pos_all is None else pos_all[r0 - i0:r1 - i0])
                        Kp = None if K is None else K[r0 - i0:r1 - i0]
                        t, o = dsts[c]
                        self._fast_rows(r0, r1, rows, pos, Kp, c, t[o:o + (r1 - r0) * D1].view(r1 - r0, D1))
                    if not whole:
                        views[c][off:off + n].copy_(dsts[c][0][col:col + n])
            return
        out = self.compute(start, stop, old, red)
        for c in range(3):
            if out[c] is None:
                views[c].zero_()
            else:
                views[c].copy_(out[c])


    def compute_on_host(self, start: int, stop: int, old: Optional[OldData], red: Optional[Reductions],
                        views: Sequence[torch.Tensor]) -> None:
        """:meth:`compute_into` for slices on an accelerator: the piece's old elements are copied to host memory,
        computed there by exactly the CPU arithmetic (so the bits equal the reference's), and the float32
        result is copied into ``views``. Host work space: one piece's old elements and its new elements."""
        host_old = None if old is None else old.to_host()
        host_red = None if red is None else Reductions(
            col_mean=None if red.col_mean is None else red.col_mean.cpu(), std=red.std)
        host_views = [torch.empty(v.shape, dtype=v.dtype) for v in views]
        self.compute_into(start, stop, host_old, host_red, host_views)
        for v, h in zip(views, host_views):
            v.copy_(h)

    # -- which old elements --------------------------------------------------------------------
    def rows_of(self, start: int, stop: int) -> Tuple[int, int]:
        """New rows ``[i0, i1)`` covering new flat range ``[start, stop)``."""
        return start // self.D1, -(-stop // self.D1)

    def needs(self, start: int, stop: int) -> List[Interval]:
        """Old flat intervals (sorted, merged) that new flat range ``[start, stop)`` is computed from (cached,
        shared by the parameters of a kind: do not modify)."""
        key = (start, stop)
        if key not in self._needs:
            self._needs[key] = self._find_needs(start, stop)
        return self._needs[key]

    def _find_needs(self, start: int, stop: int) -> List[Interval]:
        if stop <= start or self.mode == "none":
            return []
        if self.mode == "full":
            return [(0, self.old_numel)]
        i0, i1 = self.rows_of(start, stop)
        if self.a0.identity:
            return [(i0 * self.d1, i1 * self.d1)]
        kept = self.a0.kept_runs()
        if kept is not None:  # a few runs (duplication): interval arithmetic, no tensors
            runs, starts = kept
            rows, new_rows = [], False
            k = bisect.bisect_right(starts, i0) - 1
            while k < len(runs) and runs[k][0] < i1:
                ns, os_, n, kept = runs[k]
                a, b = max(ns, i0), min(ns + n, i1)
                if kept:
                    rows.append((os_ + a - ns, os_ + b - ns))
                else:
                    new_rows = True
                k += 1
            if new_rows and not self.a0.mean and not self.value_zero:
                rows.append((0, 1))  # (see below)
            merged: List[Interval] = []
            for a, b in sorted(rows):
                if merged and a <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], b))
                else:
                    merged.append((a, b))
            return [(a * self.d1, b * self.d1) for a, b in merged]
        keep = self.a0.keep[i0:i1]
        rows = self.a0.map.src[i0:i1][keep]
        if not bool(keep.all()) and not self.a0.mean and not self.value_zero:
            # new rows (src = -1) are old row 0 times 0 in the reference (src.clamp(0)); the sign of that
            # zero survives where no noise is added (embeddings), so fetch row 0 as well
            rows = torch.cat([rows, torch.zeros(1, dtype=torch.long)])
        return runs_to_intervals(torch.unique(rows), self.d1)

    # -- whole-parameter reductions (designated rank) ------------------------------------------
    def reduce(self, old_value: torch.Tensor) -> Reductions:
        """``old_value``: the whole old value, flat float32. Same ops, same shapes as the reference."""
        w = old_value.reshape(self.old_shape)
        out = Reductions()
        if "col_mean" in self.reductions:
            out.col_mean = w.to(F64).mean(dim=0, keepdim=True).reshape(-1)
        if "std" in self.reductions:
            out.std = float(w.double().std())
        return out

    # -- computing a piece ---------------------------------------------------------------------


def assemble(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[channels, n_r]`` parts from owners in rank order (= old flat order)."""
    parts = [p for p in parts if p.shape[1]]
    if not parts:
        return torch.empty(0)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def grow_rows_reference(growth: ParamGrowth, start: int, stop: int, old_full: List[torch.Tensor],
                        into: Optional[Sequence[torch.Tensor]] = None) -> List[Optional[torch.Tensor]]:
    """Single-process driver (tests): compute new flat ``[start, stop)`` from full old tensors
    (``[value, exp_avg, exp_avg_sq]``) through exactly the path the distributed executor takes
    (:meth:`ParamGrowth.compute`, or :meth:`ParamGrowth.compute_into` writing ``into``)."""
    ivs = growth.needs(start, stop)
    ch = growth.channels
    flat = [t.reshape(-1) for t in old_full[:ch]]
    data = torch.stack([torch.cat([f[s:e] for s, e in ivs]) if ivs else f[:0] for f in flat])
    red = growth.reduce(flat[0]) if growth.reductions else None
    if into is not None:
        growth.compute_into(start, stop, OldData(ivs, data), red, into)
        return list(into)
    return growth.compute(start, stop, OldData(ivs, data), red)


__all__ = ['ParamGrowth', 'PlanCache', 'SpaceSide', 'assemble', 'grow_rows_reference']

"""The arithmetic of one new parameter, on any range of its new flat elements: which old elements it
reads (:meth:`ParamGrowth.needs`) and how it computes them (:meth:`ParamGrowth.compute_into`), bit-identical
to the reference executor ``growth_ds.ops.apply`` on the whole tensor.

The specification is the float64 replay of the reference on a block of new rows (:meth:`ParamGrowth.compute`,
:meth:`ParamGrowth._value_rows`); the float32 fast paths (``fast_value``/``fast_moment``: one multiply per
element by a power of two, strided block copies of tiled maps, several parameters of one kind at once in
:meth:`ParamGrowth.stack_into`) are taken only where they provably give the same bits, and fall back to the
replay otherwise.

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
  (measured), so one designated rank receives the whole old parameter, computes the same reduction
  on the same shape, and shares the ``[d_in]`` result (:meth:`ParamGrowth.reduce`). The axis-1 mean
  of embeddings is a per-row reduction, which is reproducible row by row (measured), so it is
  computed locally on the rows a rank needs.
* **relative noise** (HyperCloning's ``std`` of the whole old weight): the same, one scalar.
* **random parts** (fan-in splits, random columns and new units) are drawn as the reference draws them,
  by :func:`growth_ds.ops.noise.keyed_randn`: row blocks of about 64K elements, each from a generator
  keyed by ``(seed, parameter name, purpose, block)``, so a rank draws only the blocks of its own rows
  and never materialises (or skips through) a whole random matrix.

1-D parameters (biases, norms) are tiny: a rank owning part of one receives the whole old vector
(``mode == "full"``) and computes its part as one gather and one multiply per channel
(:class:`VectorGrowth`) where that is exact, else runs the reference itself.
"""
from __future__ import annotations

import bisect
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from growth_ds.distributed.zero.intervals import Interval, runs_to_intervals
from growth_ds.distributed.zero.old_data import OldData, Reductions, RowView
from growth_ds.models.schema import ParamSpec
from growth_ds.ops.apply import grow_moment, grow_value, is_identity_block, source_name
from growth_ds.ops.noise import needs_full_std, noise_window
from growth_ds.ops.plan import GrowthPlan
from growth_ds.ops.roles import coupling, norm_scale, param_axes

F64 = torch.float64


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


class SpaceSide:
    """One space map used on one side (out: ``S``, in: ``T``), shared by every parameter that maps an axis
    that way. Holds O(D) bytes; the float64 vectors an axis needs in full are built lazily once. The index
    math (runs, power-of-two checks) runs on numpy views of the map's vectors: these are small vectors and
    every torch op costs 5-10 us here, which added up to milliseconds per growth; the arithmetic paths get
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
            self._inv[key] = True if self.identity else _pow2(self._coef if what == "coef" else self._full_np()[1])
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
        s_ok = _pow2(np.array([scale], dtype=np.float64))
        coef = m.out_coef.to(F64).numpy()
        mean_rows = m.residue == "mean" and not bool(keep.all()) and not m.is_identity
        if _pow2(coef) and (s_ok if norm else not mean_rows):
            mult = coef * scale if norm else coef
            fix = None
            if norm and not bool(keep.all()):
                fill = 1.0 if role == "norm" else 0.0
                fix = (~keep, (np.full(m.new, fill, dtype=np.float64) * scale).astype(np.float32))
            self._set(0, mult, fix)
        adj0 = m.adjoint(True).to(F64).numpy()
        adj = adj0 * scale if norm else adj0
        if _pow2(adj0) and (s_ok or not norm):
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


class ParamGrowth:
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
        g = object.__new__(ParamGrowth)  # (copy.copy, without its generic protocol: ~20x faster)
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
        1-D parameters as one gather and one multiply per channel (:class:`VectorGrowth`)."""
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
                if host is not None and on_host:  # (numpy throughout: ~1 us per op where torch takes ~10)
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
                self._tile_ops(c, [dst], dbase, x, xbase, one, r0, step, gr, nr, f0s[c], k0, cruns)
        return chans

    def stack_into(self, start: int, stop: int, members: Sequence[Tuple["ParamGrowth", OldData, Sequence[torch.Tensor]]]
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
                self._tile_ops(c, dsts, dbase, x, xbase, strided_runs(dsts, dbase, xbase), r0, step, gr, nr,
                               f0s[c], k0, cruns)
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
                  members: List[Tuple[int, int, int, int]], r0: int, step: int, gr: int, nr: int, f0: float, k0: int,
                  cruns) -> None:
        """Channel ``c`` of one row group (:meth:`_group`: ``gr`` blocks of ``nr`` rows, ``step`` rows apart, the
        first at new row ``r0`` past the range's first, all read from old rows at ``xbase`` in ``x``; row-run
        factor ``f0``, copy ``k0``): per column tile, one strided multiply (a copy at factor 1, a +0 fill where the
        reference writes one) for each run ``(a, b, do, dx)`` of members (:func:`strided_runs`), whose outputs
        start at ``dbase`` in ``dsts``."""
        D1, d1 = self.D1, self.d1
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


def _pow2(a: np.ndarray) -> bool:
    """Every element is 0 or a positive power of two."""
    a = a.astype(np.float64, copy=False)
    mant, _ = np.frexp(a)
    return bool(((a == 0) | ((a > 0) & (mant == 0.5))).all())


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


__all__ = ['ParamGrowth', 'PlanCache', 'SpaceSide', 'VectorGrowth', 'assemble', 'grow_rows_reference', 'strided_runs']

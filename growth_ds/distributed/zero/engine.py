"""``grow_engine``: grow a DeepSpeed engine's whole training state into a grown engine, rank by rank, no
gather. Negotiate (one all-gather: transport, zero flags, buffer sizes) -> run the rounds (exchange,
reductions, compute) -> finish (step, counters, low-precision weights).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from growth_ds.distributed import engine_state as dse
from growth_ds.distributed import host_copy
from growth_ds.distributed.zero.exchange import Exchange, fetch_whole, share_reductions
from growth_ds.distributed.zero.intervals import chunk_range
from growth_ds.distributed.zero.layout import ZeroLayout
from growth_ds.distributed.zero.old_data import OldData, Reductions
from growth_ds.distributed.zero.param_growth import ParamGrowth, PlanCache
from growth_ds.distributed.zero.schedule import (Clips, RoundPlan, auto_bucket, make_schedule, plan_round,
                                                 transient_elems)
from growth_ds.distributed.zero.shm import ShmOffer, ShmTransport, all_gather_fn
from growth_ds.distributed.zero.stats import GrowthStats
from growth_ds.models.schema import parameter_schema
from growth_ds.ops.apply import grow_moment, grow_value, source_name
from growth_ds.ops.plan import GrowthPlan

KILL_ENV = "GROWTH_DS_KILL_IN_GROWTH"  # "RANK:ROUND": SIGKILL that rank at that round (fault-tolerance tests)


def kill_round() -> Optional[tuple]:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    r, k = spec.split(":")
    return int(r), int(k)


def zero_flags(growths: Sequence[ParamGrowth], old: ZeroLayout) -> Tuple[List[str], List[int]]:
    """Whether each old value that a noisy weight grows from holds an exact zero anywhere (the float32 fast
    path of a weight must then normalise signed zeros as the reference does): every rank scans its own old
    slices once (instead of every piece scanning the old rows it received). Returns the source names and
    this rank's flags (1 = a zero), to be reduced over ranks with MAX and given to :func:`set_zero_flags`."""
    sources = sorted({g.source for g in growths if g.mode == "rows" and g.noisy})
    flats = {id(old.slots[n].flats[0]): old.slots[n] for n in sources}
    # (np.all: one vectorised scan that stops at the first zero; -0.0 counts as a zero, as it must)
    if all(sl.host is not None for sl in flats.values()) and all(np.all(sl.host[0]) for sl in flats.values()):
        return sources, [0] * len(sources)  # (trained weights: no zero anywhere)
    flags = []
    for n in sources:
        slot = old.slots[n]
        if slot.host is not None:  # (numpy on host memory: no torch dispatch)
            flags.append(int(not np.all(slot.host[0][slot.offset:slot.offset + slot.local])))
        else:
            flags.append(int(int(torch.count_nonzero(slot.views[0])) < slot.local))
    return sources, flags


def set_zero_flags(growths: Sequence[ParamGrowth], sources: List[str], flags: List[int]) -> None:
    has = dict(zip(sources, flags))
    for g in growths:
        if g.source in has:
            g.old_has_zero = bool(has[g.source])


def shm_refresh_plan(engine, layout: ZeroLayout, max_param: int) -> Optional[int]:
    """Bytes per round of the shared-memory refresh of a ZeRO-1/2 engine's low-precision weights, or None
    when DeepSpeed's own refresh must run (ZeRO-3, whose refresh is a local copy; another optimizer; other
    groups). A function of global metadata only, so every rank runs the same rounds; a round's two
    segment halves stay under 3/4 of the largest fp32 parameter, as the exchange's do."""
    zo = engine.optimizer
    need = ("parallel_partitioned_bit16_groups", "single_partition_of_fp32_groups", "real_dp_process_group")
    if layout.stage == 3 or not all(hasattr(zo, a) for a in need) or not zo.parallel_partitioned_bit16_groups:
        return None
    for parts, grp in zip(zo.parallel_partitioned_bit16_groups, zo.real_dp_process_group):
        if len(parts) != layout.world or dist.get_world_size(group=grp) != layout.world or \
                dist.get_rank(group=grp) != layout.rank:
            return None
    return max(4096, (3 * max_param // 8) // 1024 * 1024) * 4


def shm_refresh(engine, layout: ZeroLayout, transport: ShmTransport, chunk_bytes: int) -> None:
    """ZeRO-1/2 low-precision weights from the new fp32 masters, as DeepSpeed's ``update_lp_params`` does
    (own partition from the master, then an all-gather of every partition into every rank's flat buffer),
    with the all-gather through the shared segments: each round every rank publishes one chunk of its
    partition and copies every peer's chunk straight into its own flat buffer."""
    zo = engine.optimizer
    me = layout.rank
    for parts, master in zip(zo.parallel_partitioned_bit16_groups, zo.single_partition_of_fp32_groups):
        host_copy.copy_(parts[me].data, master.data)
        size = parts[me].element_size()
        step = chunk_bytes // size
        for a in range(0, parts[me].numel(), step):
            b = min(parts[me].numel(), a + step)
            nbytes = (b - a) * size
            n32 = -(-nbytes // 4)
            transport.buffer(n32).view(torch.uint8)[:nbytes].copy_(parts[me].data[a:b].view(torch.uint8))
            transport.publish([0 if q == me else n32 for q in range(layout.world)])
            for p in range(layout.world):
                if p != me:
                    parts[p].data[a:b].view(torch.uint8).copy_(transport.shared(p).view(torch.uint8)[:nbytes])
            transport.next_round()


def compute_round(requests, data: Dict[int, OldData], growths: Sequence[ParamGrowth], new: ZeroLayout,
                   reductions: Dict[int, Reductions], compute_elems: int, stats: GrowthStats) -> None:
    """This rank's pieces of a round into its new slices (``data``: their old elements, consumed). Pieces of one
    kind over one range (every layer's ``attn.q`` under ZeRO-3) are computed together
    (:meth:`ParamGrowth.stack_into`); the rest one by one, the exact slow path ``compute_elems`` new elements
    at a time (its float64 work space; the float32 fast path writes in place)."""
    me = new.rank

    def views(g: ParamGrowth, s: int, e: int) -> List[torch.Tensor]:  # new flat [s, e) of g, every channel
        slot = new.slots[g.name]
        lo = slot.bounds[me] - slot.offset  # (flat index of partition element 0)
        return [f[s - lo:e - lo] for f in slot.flats]

    stacks: Dict[tuple, list] = {}
    for i, req in enumerate(requests):
        if req.rank == me and req.kind == "piece":
            g = growths[req.param]
            stacks.setdefault((req.param,) if g.kind is None else (g.kind, req.start, req.stop), []).append(i)
    for members in stacks.values():
        if len(members) > 1:
            req = requests[members[0]]
            group = [(g, data[i], views(g, req.start, req.stop)) for i in members for g in [growths[requests[i].param]]]
            if group[0][0].stack_into(req.start, req.stop, group):
                for i in members:
                    del data[i]
                stats.new_elements += len(members) * (req.stop - req.start)
                stats.pieces += len(members)
                stats.stacked_pieces += len(members)
                continue
            del group
        for i in members:
            req = requests[i]
            g = growths[req.param]
            olddata = data.pop(i)
            slow = g.mode == "rows" and not (g.fast_value and g.fast_moment)
            for s, e in chunk_range(req.start, req.stop, g.D1, compute_elems) if slow else [(req.start, req.stop)]:
                g.compute_into(s, e, olddata, reductions.get(req.param), views(g, s, e))
            del olddata
            stats.new_elements += req.stop - req.start
            stats.pieces += 1


@dataclass
class _Setup:
    """What one rank derives from global metadata before any transfer (the same on every rank, except
    ``sources``' flags and the buffers, which are this rank's)."""

    old: ZeroLayout
    new: ZeroLayout
    growths: List[ParamGrowth]
    new_bounds: List[List[int]]
    max_param: int             # elements of the largest new parameter
    bucket_elems: int
    auto_bucket: bool          # the bucket may be halved until the exchange buffers fit
    whole_rounds: bool         # some parameter needs a whole-parameter reduction round
    on_cpu: bool               # the old partitions live in host memory
    sources: List[str]         # old weights whose zero flags every rank must agree on
    flags: List[int]           # this rank's zero flags of ``sources``
    lp_chunk: Optional[int]    # bytes per round of the shared-memory refresh (None: DeepSpeed's refresh)
    clips: Clips

    def schedule(self, bucket: int) -> Tuple[list, Dict[int, RoundPlan]]:
        """The rounds at ``bucket`` and this rank's :class:`RoundPlan` of every exchange round."""
        rounds = make_schedule(self.growths, self.new_bounds, self.new.world, bucket)
        return rounds, {k: plan_round(r.requests, self.growths, self.old, self.clips) for k, r in enumerate(rounds)
                        if r.requests[0].kind != "full"}

    def segment_elems(self, plans: Dict[int, RoundPlan]) -> int:
        """Elements of one half of this rank's shared segment: its largest send (or refresh chunk)."""
        return max([p.send_total for p in plans.values()] + [self.lp_chunk // 4 if self.lp_chunk else 0])


@dataclass
class Agreement:
    """What every rank agreed on in the negotiation: the transport, the schedule, the zero flags."""

    transport: Optional[ShmTransport]  # the same-host shared segments, or None: the collective
    prefetch: bool
    bucket_elems: int
    rounds: list
    plans: Dict[int, RoundPlan]
    flags: List[int]                   # MAX over ranks of every rank's zero flags


@dataclass
class _Proposal:
    """One rank's row of the negotiation's all-gather (int64 fields, in this order)."""

    shm: List[int]          # :attr:`ShmOffer.row` (zeros when this rank offers no shared memory)
    buffers_shm: int        # exchange buffers with the shared segments (:func:`transient_elems`)
    buffers_collective: int  # exchange buffers with the all-to-all
    flags: List[int]

    def row(self) -> List[int]:
        return self.shm + [self.buffers_shm, self.buffers_collective] + self.flags

    @classmethod
    def from_row(cls, row: List[int]) -> "_Proposal":
        k = ShmOffer.ROW
        return cls(row[:k], row[k], row[k + 1], row[k + 2:])


def _setup(old_engine, new_engine, plan: GrowthPlan, bucket_elems: Optional[int], prefetch: bool,
           refresh: bool) -> _Setup:
    """Validate both engines against the plan and derive everything from metadata (no communication)."""
    old, new = ZeroLayout(old_engine, need_state=False), ZeroLayout(new_engine, need_state=True)
    if (old.world, old.rank) != (new.world, new.rank):
        raise ValueError(f"old and new engines differ in data-parallel layout: rank {old.rank}/{old.world} vs "
                         f"{new.rank}/{new.world}")
    schema = parameter_schema(plan.grown_shape)
    old.check(plan.small, "the old")
    new.check(plan.grown_shape, "the new", schema)
    cache = PlanCache(plan)
    growths = [cache.growth(name, spec) for name, spec in schema.items()]
    max_param = max(g.new_numel for g in growths)
    auto = bucket_elems is None
    if auto:
        # from global metadata only: the schedule must be the same on every rank
        bucket_elems = auto_bucket(max_param, -(-sum(g.new_numel for g in growths) // new.world), prefetch)
    sources, flags = zero_flags(growths, old)
    return _Setup(old, new, growths, [new.slots[g.name].bounds for g in growths], max_param, bucket_elems, auto,
                  any(g.reductions for g in growths), all(p.device.type == "cpu" for p in old.partitions),
                  sources, flags, shm_refresh_plan(new_engine, new, max_param) if refresh else None, Clips())


def _negotiate(su: _Setup, prefetch: bool) -> Agreement:
    """One all-gather decides everything the ranks must agree on: the transport (shared memory only when
    every rank offers it; never for plans with whole-parameter rounds, whose one old parameter must be the
    only thing held then), the zero flags (MAX) and whether the exchange buffers fit (MAX); with an
    automatic bucket, halve it until the worst rank's buffers stay under 3/4 of the largest parameter."""
    old = su.old
    bucket = su.bucket_elems
    rounds, plans = su.schedule(bucket)
    offer = None if su.whole_rounds else ShmOffer(old.world, su.on_cpu, su.segment_elems(plans))
    transport: Optional[ShmTransport] = None
    try:
        mine = _Proposal(offer.row if offer is not None else [0] * ShmOffer.ROW,
                         transient_elems(rounds, plans, old.rank, True, False),
                         transient_elems(rounds, plans, old.rank, False, prefetch), su.flags)
        if old.world > 1:
            row = mine.row()
            every = torch.empty(old.world * len(row), dtype=torch.int64, device=old.comm_device)
            all_gather_fn(dist)(every, torch.tensor(row, dtype=torch.int64, device=old.comm_device), group=old.group)
            props = [_Proposal.from_row(r) for r in every.view(old.world, len(row)).tolist()]
        else:
            props = [mine]
        shm = offer is not None and offer.agreed([p.shm for p in props])
        prefetch = prefetch and not shm
        worst = max(p.buffers_shm if shm else p.buffers_collective for p in props)
        flags = [max(p.flags[i] for p in props) for i in range(len(su.sources))]
        limit = 3 * su.max_param // 4
        while su.auto_bucket and worst > limit and bucket > 4096:  # rare: halve the bucket until the buffers fit
            bucket = max(4096, bucket // 2)
            rounds, plans = su.schedule(bucket)
            if shm:
                offer.resize(su.segment_elems(plans))
            need = torch.tensor([transient_elems(rounds, plans, old.rank, shm, prefetch)], device=old.comm_device)
            if old.world > 1:
                dist.all_reduce(need, op=dist.ReduceOp.MAX, group=old.group)
            worst = int(need)
        if shm:
            transport = offer.open(dist, old.group, old.rank, [p.shm for p in props], old.comm_device)
    finally:
        if offer is not None and transport is None:
            offer.withdraw()  # (an opened transport removes the names itself, after the first round)
    return Agreement(transport, prefetch, bucket, rounds, plans, flags)


def _run_rounds(su: _Setup, ag: Agreement, stats: GrowthStats) -> None:
    """Every round: exchange (or a whole-parameter reduction), share the reductions, compute this rank's
    pieces into its new slices. With ``prefetch``, the next round's all-to-all overlaps this compute."""
    old, new, growths = su.old, su.new, su.growths
    compute_elems = max(4096, min(ag.bucket_elems // 8, su.max_param // 64))  # float64 work of the exact slow path
    kill = kill_round()
    reductions: Dict[int, Reductions] = {}
    me = new.rank
    pending: Optional[Exchange] = None
    plans = dict(ag.plans)
    for k, rnd in enumerate(ag.rounds):
        if kill is not None and kill == (me, k):
            os.kill(os.getpid(), signal.SIGKILL)
        t1 = time.perf_counter()
        ex = None
        if rnd.requests[0].kind == "full":  # a reduction round holds exactly one request
            data = {0: fetch_whole(rnd.requests[0], growths, old, stats)}
            if data[0] is None:
                data.clear()
        else:
            ex = pending if pending is not None else Exchange(plans.pop(k), growths, old, stats, ag.transport, su.clips)
            pending = None
            data = ex.finish()
        share_reductions(rnd.requests, growths, data, old, reductions)
        if ag.prefetch and ag.transport is None and k + 1 < len(ag.rounds) and \
                ag.rounds[k + 1].requests[0].kind != "full":
            pending = Exchange(plans.pop(k + 1), growths, old, stats, ag.transport, su.clips)  # overlaps the compute
        t2 = time.perf_counter()
        compute_round(rnd.requests, data, growths, new, reductions, compute_elems, stats)
        del data
        t3 = time.perf_counter()
        if ex is not None:
            ex.release()
            ex = None
        stats.seconds_exchange += t2 - t1 + time.perf_counter() - t3
        stats.seconds_compute += t3 - t2


def _finish(old_engine, new_engine, plan: GrowthPlan, su: _Setup, ag: Agreement, stats: GrowthStats,
            refresh: bool) -> None:
    """The Adam step (0 under the reset rule), DeepSpeed's step counters, and the low-precision weights."""
    stats.step = 0 if plan.moments == "reset" else dse.get_step(old_engine)
    dse.set_step(new_engine, stats.step)
    for attr in ("global_steps", "global_samples", "skipped_steps"):
        if hasattr(old_engine, attr):
            setattr(new_engine, attr, getattr(old_engine, attr))
    if refresh:
        t1 = time.perf_counter()
        if ag.transport is not None and su.lp_chunk is not None:
            shm_refresh(new_engine, su.new, ag.transport, su.lp_chunk)
        else:
            dse.refresh_low_precision(new_engine)
        stats.seconds_refresh = time.perf_counter() - t1
        stats.lp_element_size = su.new.lp_element_size


def grow_engine(old_engine, new_engine, plan: GrowthPlan, *, bucket_elems: Optional[int] = None,
                prefetch: bool = False, refresh: bool = True) -> GrowthStats:
    """Grow ``old_engine``'s whole training state into ``new_engine``, rank by rank, no gather.

    Contract (same as the gather path in ``StagedTrainer.grow``): ``new_engine`` is a DeepSpeed engine of
    ``plan.grown_shape`` with the same ZeRO stage family and data-parallel group, built (ZeRO-3: under
    ``zero.Init``) and with its Adam state materialised. Every rank must call this (it is a collective).
    Fills, on every rank, its slices of the fp32 masters, ``exp_avg``, ``exp_avg_sq``; sets the Adam step
    (0 under the reset rule), DeepSpeed's step counters, and refreshes the low-precision weights (ZeRO-1/2
    on one host: all-gathered through the shared segments, :func:`shm_refresh`; else DeepSpeed's own way).
    ``old_engine`` is only read. ``bucket_elems``: new elements per rank per round (default
    :func:`~growth_ds.distributed.zero.schedule.auto_bucket`, halved until the exchange buffers every rank
    measures fit in 3/4 of the largest fp32 parameter); ``prefetch``: start the next round's all-to-all
    before computing this one (two buckets in flight, half the size each; pays off when a core or a network
    link is free to overlap the transfer; ignored with the shared-memory transport, whose rounds are read in
    place). Returns this rank's :class:`GrowthStats`.

    Steps: :func:`_setup` (validation and metadata) -> :func:`_negotiate` (one all-gather: an
    :class:`Agreement`) -> :func:`_run_rounds` -> :func:`_finish`.
    """
    t0 = time.perf_counter()
    su = _setup(old_engine, new_engine, plan, bucket_elems, prefetch, refresh)
    ag = _negotiate(su, prefetch)
    set_zero_flags(su.growths, su.sources, ag.flags)
    stats = GrowthStats(rounds=len(ag.rounds), full_rounds=sum(r.requests[0].kind == "full" for r in ag.rounds))
    if ag.transport is not None:
        stats.transport = "shm"
    stats.extra["bucket_elems"] = ag.bucket_elems
    stats.seconds_setup = time.perf_counter() - t0
    try:
        _run_rounds(su, ag, stats)
        _finish(old_engine, new_engine, plan, su, ag, stats, refresh)
    finally:
        if ag.transport is not None:
            ag.transport.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def gather_grow(old_engine, new_engine, plan: GrowthPlan) -> None:
    """The gather path (test oracle and stage-0 fallback): one full old parameter at a time is gathered
    on every rank, grown with the reference, and every rank stores its own slices."""
    dse.link_optimizer_state(old_engine)
    old_p, new_p = dse.named_params(old_engine), dse.named_params(new_engine)
    for name, spec in parameter_schema(plan.grown_shape).items():
        src = old_p[source_name(plan, name)]
        dse.set_full(new_engine, new_p[name], grow_value(plan, name, spec, dse.get_full(old_engine, src)))
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            dse.set_full(new_engine, new_p[name],
                         grow_moment(plan, name, spec, dse.get_full(old_engine, src, key), power), key)
    dse.set_step(new_engine, 0 if plan.moments == "reset" else dse.get_step(old_engine))
    dse.refresh_low_precision(new_engine)


def is_partitioned(engine) -> bool:
    """True when ``engine`` runs a ZeRO-1/2/3 optimizer (partitioned fp32 masters and Adam state)."""
    zo = engine.optimizer
    return hasattr(zo, "fp32_partitioned_groups_flat") or hasattr(zo, "single_partition_of_fp32_groups")


def grow_any(old_engine, new_engine, plan: GrowthPlan, **kw) -> Optional[GrowthStats]:
    """:func:`grow_engine` under ZeRO 1-3, :func:`gather_grow` otherwise (stage 0)."""
    if is_partitioned(old_engine):
        return grow_engine(old_engine, new_engine, plan, **kw)
    gather_grow(old_engine, new_engine, plan)
    return None


__all__ = ['KILL_ENV', 'compute_round', 'gather_grow', 'grow_any', 'grow_engine', 'is_partitioned']

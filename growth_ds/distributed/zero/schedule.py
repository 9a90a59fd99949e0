"""The schedule of a ZeRO growth, from global metadata only (identical on every rank, built before any
transfer): each rank's new ranges cut into pieces (:class:`Request`), dealt into rounds (:class:`Round`),
and per round what this rank sends to whom and receives from whom (:class:`RoundPlan`: named
:class:`Send` records and counts) and the buffers that takes (:func:`transient_elems`). The runtime
(:mod:`growth_ds.distributed.zero.exchange`) only executes these plans.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Sequence, Tuple

from growth_ds.distributed.zero.intervals import Interval, chunk_range, clip_intervals, intervals_numel, rank_range
from growth_ds.distributed.zero.layout import Slot, ZeroLayout
from growth_ds.distributed.zero.param_growth import ParamGrowth

DEFAULT_BUCKET_ELEMS = 1 << 24


@dataclass
class Request:
    """Rank ``rank`` needs old ``intervals`` (``channels`` of them) of growth ``param`` to compute new
    flat ``[start, stop)`` (``kind == "piece"``) or a whole-parameter reduction (``kind == "full"``)."""

    param: int
    rank: int
    kind: str
    start: int
    stop: int
    intervals: List[Interval]
    channels: int


@dataclass
class Round:
    """One bucket: every request is served by one all-to-all."""

    requests: List[Request] = field(default_factory=list)
    load: List[int] = field(default_factory=list)   # new elements (+ reduction inputs) per rank

    def reductions(self) -> List[Request]:
        return [r for r in self.requests if r.kind == "full"]


def make_schedule(growths: Sequence[ParamGrowth], new_bounds: Sequence[Sequence[int]], world: int,
                  bucket_elems: int) -> List[Round]:
    """Deterministic rounds (identical on every rank: a function of global metadata only).

    First one round per whole-parameter reduction (a ``full`` request for the designated rank,
    ``index % world``, which then holds that one old parameter and nothing else). Then each rank's range of
    each new parameter is cut into row-aligned pieces of at most ``bucket_elems`` elements, queued per rank
    kind by kind (the parameters of one :attr:`ParamGrowth.kind`, e.g. every layer's ``attn.q``, one after
    another, so a round holds several of them: :meth:`ParamGrowth.stack_into`), and dealt into rounds: a
    round takes from every rank's queue until that rank's load would pass ``bucket_elems`` (always at least
    one piece). So every round keeps every rank busy, also under ZeRO-1/2, where most parameters lie on one
    rank.
    """
    rounds: List[Round] = []
    for p, g in enumerate(growths):
        if g.reductions:
            d = p % world
            rnd = Round(load=[0] * world)
            rnd.requests.append(Request(p, d, "full", 0, 0, [(0, g.old_numel)], 1))
            rnd.load[d] = g.old_numel
            rounds.append(rnd)
    queues: List[List[Tuple[int, int, int]]] = [[] for _ in range(world)]
    first: Dict[int, int] = {}  # kind -> its first parameter
    for p, g in enumerate(growths):
        if g.kind is not None:
            first.setdefault(g.kind, p)
    order = sorted(range(len(growths)), key=lambda p: (first.get(growths[p].kind, p), p))
    for p in order:
        g = growths[p]
        row = g.D1 if g.mode == "rows" else max(g.new_numel, 1)
        for r in range(world):
            s, e = rank_range(new_bounds[p], r)
            pieces = chunk_range(s, e, row, bucket_elems) if g.mode != "full" else ([(s, e)] if e > s else [])
            queues[r].extend((p, a, b) for a, b in pieces)
    pos = [0] * world
    while any(pos[r] < len(queues[r]) for r in range(world)):
        rnd = Round(load=[0] * world)
        for r in range(world):
            q = queues[r]
            while pos[r] < len(q):
                p, a, b = q[pos[r]]
                if rnd.load[r] and rnd.load[r] + b - a > bucket_elems:
                    break
                g = growths[p]
                rnd.requests.append(Request(p, r, "piece", a, b, g.needs(a, b), g.channels))
                rnd.load[r] += b - a
                pos[r] += 1
        rounds.append(rnd)
    return rounds


class Clips:
    """:func:`clip_intervals` with its element count, memoised per call of :func:`grow_engine`: the pieces of
    one kind share their interval lists (:meth:`ParamGrowth.needs`), so most (intervals, owner range) pairs
    repeat from layer to layer."""

    def __init__(self):
        self._memo: Dict[tuple, tuple] = {}

    def __call__(self, ivs, lo: int, hi: int) -> Tuple[list, int]:
        hit = self._memo.get((id(ivs), lo, hi))
        if hit is None or hit[0] is not ivs:  # (the list itself is kept: its id is never reused meanwhile)
            pieces = clip_intervals(ivs, lo, hi)
            hit = self._memo[id(ivs), lo, hi] = (ivs, pieces, intervals_numel(pieces))
        return hit[1], hit[2]


class Send(NamedTuple):
    """Old elements this rank owns that request ``index`` of a round needs (one channel's worth: the
    request's ``channels`` are packed one plane after another)."""

    index: int              # the request's position in its round
    request: Request
    slot: Slot              # the old parameter on this rank
    lo: int                 # flat index of this rank's first element of that parameter
    pieces: List[Interval]  # old flat ranges inside [lo, slot.bounds[rank + 1])
    numel: int              # elements in ``pieces``


@dataclass(frozen=True)
class RoundPlan:
    """This rank's part of one exchange round, fixed before any transfer.

    ``sends[q]``: what goes to rank ``q`` in request order (this rank's own requests are listed under its
    own rank and read in place, never sent); ``send_counts[q]``: elements over every channel (0 for this
    rank). ``mine``: ``(index, request)`` of this rank's requests; ``recv[index, p]``: elements per channel
    that owner ``p`` holds of request ``index``; ``recv_counts[p]``: elements over every channel this rank
    receives from ``p`` (0 for itself)."""

    sends: List[List[Send]]
    send_counts: List[int]
    mine: List[Tuple[int, Request]]
    recv: Dict[Tuple[int, int], int]
    recv_counts: List[int]

    @property
    def send_total(self) -> int:
        return sum(self.send_counts)


def plan_round(requests: Sequence[Request], growths: Sequence[ParamGrowth], old: ZeroLayout, clips: Clips
               ) -> RoundPlan:
    """The :class:`RoundPlan` of a round of ``requests`` (pieces; not a whole-parameter round)."""
    me, world = old.rank, old.world
    sends: List[List[Send]] = [[] for _ in range(world)]
    for i, req in enumerate(requests):
        slot = old.slots[growths[req.param].source]
        lo = slot.bounds[me]
        pieces, n = clips(req.intervals, lo, slot.bounds[me + 1])
        if pieces:
            sends[req.rank].append(Send(i, req, slot, lo, pieces, n))
    send_counts = [0 if q == me else sum(s.numel * s.request.channels for s in sends[q]) for q in range(world)]
    mine = [(i, req) for i, req in enumerate(requests) if req.rank == me]
    recv: Dict[Tuple[int, int], int] = {}
    recv_counts = [0] * world
    for i, req in mine:
        bounds = old.slots[growths[req.param].source].bounds
        for p in range(world):
            n = recv[i, p] = clips(req.intervals, bounds[p], bounds[p + 1])[1]
            if p != me:
                recv_counts[p] += n * req.channels
    return RoundPlan(sends, send_counts, mine, recv, recv_counts)


def auto_bucket(max_param_numel: int, local_new_numel: int, prefetch: bool = False) -> int:
    """First guess of the bucket (new elements per rank per round): a quarter of the largest new parameter
    and an eighth of a rank's share of the new model (``local_new_numel``, the same on every rank), halved
    when two rounds are in flight; at least 4096 and at most ``DEFAULT_BUCKET_ELEMS``. :func:`grow_engine` then halves it until the exchange buffers it measures fit
    (:func:`transient_elems`)."""
    b = min(max_param_numel // 4, local_new_numel // 8) // (2 if prefetch else 1)
    return int(min(DEFAULT_BUCKET_ELEMS, max(4096, b)))


def transient_elems(rounds: Sequence[Round], plans: Dict[int, RoundPlan], me: int, shm: bool, prefetch: bool
                    ) -> int:
    """Elements this rank holds for the exchange in its worst round (``plans``: the :class:`RoundPlan` of
    every exchange round by index): the shared segment (two halves of its largest send), or the
    all-to-all's send + receive buffers (twice with prefetch)."""
    worst = 0
    for k, rnd in enumerate(rounds):
        if k not in plans:
            continue
        send = plans[k].send_total
        recv = sum(intervals_numel(r.intervals) * r.channels for r in rnd.requests if r.rank == me)
        worst = max(worst, 2 * send if shm else (send + recv) * (2 if prefetch else 1))
    return worst


__all__ = ['Clips', 'DEFAULT_BUCKET_ELEMS', 'Request', 'Round', 'Send', 'auto_bucket', 'make_schedule', 'RoundPlan', 'plan_round', 'transient_elems']

"""ZeRO-sharded growth: every rank grows its own DeepSpeed partitions of the weights and Adam state.

    new = build the grown engine (ZeRO-3: under zero.Init) ; dse.materialise_optimizer_state(new, batch)
    grow_engine(old, new, plan)          # fp32 masters, exp_avg, exp_avg_sq, step, low-precision weights

No rank ever gathers a parameter. DeepSpeed fixes where every element lives (:class:`ZeroLayout`):
ZeRO-1/2 split the flat fp32 buffer of each param group into equal contiguous partitions, ZeRO-3 splits
every parameter into ``ceil(numel / ws)`` elements per rank. For each new parameter each rank knows,
from global metadata alone, which new elements it owns, which old elements those are made of
(:class:`growth_ds.distributed.zero_index.ParamGrowth`) and who owns them, so the exchange needs no
request round: old owners pack exactly the elements every rank needs, and one
``all_to_all_single`` per bucket (a *round*, :func:`~growth_ds.distributed.zero_index.make_schedule`)
moves them. Each rank then replays the reference arithmetic (``growth_ds.ops.apply``) on its rows and
writes its own slices: in float32, in place, where every factor is a power of two (duplication, staged
training, depth copies: provably the same bits), else in float64 a few rows at a time. Pieces of one kind
over one range (every layer's ``attn.q`` under ZeRO-3, queued together by the schedule) are packed and
computed together: one strided op for all of them where their slices lie at a stride. The result is
bit-identical to ``growth_ds.ops.grow`` on the full state, at any world size, ZeRO stage and bucket size
(tests/test_zero_growth.py).

Memory per rank, besides the two engines' own partitions: the exchange buffers of one bucket
(``bucket_elems`` new elements; their old sources in 1 or 3 channels are computed from in place), by
default sized so that the buffers every rank measures stay under 3/4 of the largest fp32 parameter; float64
work space for rows the exact slow path computes; O(sum of space sizes) index vectors, plus, only for
parameters that need a whole-parameter reduction (GPT-2 mean rows of a non-integer ``d_model`` growth, HyperCloning's relative noise), that one old parameter in float64 on one
designated rank, in a round of its own. Never the model.

Old and new engine may differ in ZeRO stage (1, 2 or 3) and precision; they share the data-parallel group.
"""
from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from growth_ds.distributed import host_copy
from growth_ds.models.schema import parameter_schema
from growth_ds.ops.apply import grow_moment, grow_value, source_name
from growth_ds.ops.plan import GrowthPlan
from growth_ds.train import deepspeed_engine as dse
from growth_ds.distributed.zero_shm import ShmOffer, ShmTransport, _all_gather
from growth_ds.distributed.zero_index import (OldData, ParamGrowth, PlanCache, Reductions,
                                              chunk_range, clip_intervals, interval_index, intervals_numel,
                                              make_schedule)

dist = dse.dist
KEYS = ("fp32", "exp_avg", "exp_avg_sq")
DEFAULT_BUCKET_ELEMS = 1 << 24
KILL_ENV = "GROWTH_DS_KILL_IN_GROWTH"  # "RANK:ROUND": SIGKILL that rank at that round (fault-tolerance tests)
FEW_RUNS = 8  # a packed request of at most this many old intervals is copied interval by interval, else gathered


# ---- where DeepSpeed keeps each element --------------------------------------------------------


@dataclass
class Slot:
    """One parameter of one engine: rank ``r`` holds flat ``[bounds[r], bounds[r + 1])``, this rank's part
    at ``[offset, offset + bounds[rank + 1] - bounds[rank])`` of ``flats``: DeepSpeed's 1-D fp32 master,
    ``exp_avg`` and ``exp_avg_sq`` partitions. ``views`` are those slices (writable). ``host``: the exchange
    copies many small pieces, which numpy does for ~1 us each where a torch copy costs ~10 us here."""

    name: str
    shape: tuple
    numel: int
    bounds: List[int]
    flats: List[torch.Tensor]
    offset: int
    local: int
    host: Optional[List[np.ndarray]] = None  # ``flats`` as numpy arrays of the same memory (float32 on the CPU)

    @functools.cached_property
    def views(self) -> List[torch.Tensor]:
        return [f.narrow(0, self.offset, self.local) for f in self.flats]


def _host_arrays(flats: List[torch.Tensor]) -> Optional[List[np.ndarray]]:
    """``flats`` as numpy arrays of the same memory when all are float32 in host memory, else None."""
    if all(f.device.type == "cpu" and f.dtype == torch.float32 for f in flats):
        return [f.numpy() for f in flats]
    return None


class ZeroLayout:
    """The ZeRO partition layout of an engine (stage 1, 2 or 3), read from DeepSpeed's optimizer."""

    def __init__(self, engine, need_state: bool = True):
        zo = engine.optimizer
        self.engine = engine
        self.base = dse.base_optimizer(engine)
        names = getattr(engine, "param_names", None)  # (DeepSpeed's own {param: name}: no module walk)
        if not isinstance(names, dict) or any(p not in names for g in self._groups(zo) for p in g):
            names = {p: n for n, p in engine.module.named_parameters()}
        if hasattr(zo, "fp32_partitioned_groups_flat"):
            self.stage = 3
        elif hasattr(zo, "single_partition_of_fp32_groups") and hasattr(zo, "bit16_groups_flat"):
            self.stage = 2 if getattr(zo, "partition_gradients", False) else 1
        else:
            raise NotImplementedError(f"{type(zo).__name__}: ZeRO-sharded growth needs a ZeRO stage 1, 2 or 3 "
                                      f"optimizer; use gather_grow for stage 0")
        self.group = zo.dp_process_group
        self.rank = dist.get_rank(group=self.group)
        self.world = dist.get_world_size(group=self.group)
        # collective buffers live on comm_device (host under gloo, the GPU under NCCL); computed data on the
        # partitions' device (the GPU, or host memory under ZeRO-Offload)
        self.comm_device = dse.comm_device(self.group) if self.world > 1 else torch.device("cpu")
        self.slots: Dict[str, Slot] = {}
        self.partitions: List[torch.Tensor] = []
        lp = zo.fp16_partitioned_groups_flat if self.stage == 3 else zo.bit16_groups_flat
        self.lp_element_size = lp[0].element_size() if len(lp) else 0  # low-precision weights (bf16/fp16/fp32)
        self._zero_state: Dict[int, torch.Tensor] = {}
        if self.stage == 3:
            for sg, params in enumerate(zo.fp16_groups):
                part = zo.fp32_partitioned_groups_flat[sg]
                state = self._state(part, need_state)
                self.partitions.append(part)
                flats = [part.detach()] + [state[key] for key in KEYS[1:]]
                host = _host_arrays(flats)
                for p in params:
                    _, off, pn = zo.grad_position[zo.get_param_id(p)]
                    n = int(p.ds_numel)
                    bounds = [min(r * pn, n) for r in range(self.world)] + [n]
                    k = bounds[self.rank + 1] - bounds[self.rank]
                    self.slots[names[p]] = Slot(names[p], tuple(p.ds_shape), n, bounds, flats, off, k, host)
        else:
            for g, params in enumerate(zo.round_robin_bit16_groups):
                flat, part = zo.bit16_groups_flat[g], zo.single_partition_of_fp32_groups[g]
                ps = zo.partition_size[g]
                state = self._state(part, need_state)
                self.partitions.append(part)
                flats = [part.detach()] + [state[key] for key in KEYS[1:]]
                host = _host_arrays(flats)
                for p in params:
                    off = (p.data_ptr() - flat.data_ptr()) // p.element_size()
                    n = p.numel()
                    bounds = [min(max(r * ps - off, 0), n) for r in range(self.world)] + [n]
                    lo, hi = bounds[self.rank], bounds[self.rank + 1]
                    loc = off + lo - self.rank * ps if hi > lo else 0
                    self.slots[names[p]] = Slot(names[p], tuple(p.shape), n, bounds, flats, loc, hi - lo, host)
        self.device = self.partitions[0].device if self.partitions else torch.device("cpu")  # (of the partitions)

    @staticmethod
    def _groups(zo) -> list:
        return zo.fp16_groups if hasattr(zo, "fp32_partitioned_groups_flat") else \
            getattr(zo, "round_robin_bit16_groups", [])

    def _state(self, part: torch.Tensor, need: bool) -> Dict[str, torch.Tensor]:
        st = self.base.state.get(part, {})
        if "exp_avg" in st and "exp_avg_sq" in st:
            return st
        if need:
            raise ValueError("the grown engine has no Adam state yet: call "
                             "growth_ds.train.deepspeed_engine.materialise_optimizer_state(engine, batch) first")
        zeros = self._zero_state.setdefault(part.numel(), torch.zeros(part.numel(), dtype=torch.float32))
        return {"exp_avg": zeros, "exp_avg_sq": zeros}  # never stepped: zero moments

    def local_numel(self) -> int:
        return sum(s.bounds[self.rank + 1] - s.bounds[self.rank] for s in self.slots.values())

    def check(self, shape, label: str, schema=None) -> None:
        """``ValueError`` naming the first parameter whose name or shape does not fit ``shape`` (``schema``: its
        ``parameter_schema``, if the caller has it)."""
        schema = schema if schema is not None else parameter_schema(shape)
        dims = {}
        for name, spec in schema.items():
            if name not in self.slots:
                raise ValueError(f"{label} engine has no parameter {name!r} (expected for {shape.describe()})")
            want = tuple(dims[a] if a in dims else dims.setdefault(a, shape.space_dim(a)) for a in spec.axes)
            if tuple(self.slots[name].shape) != want:
                raise ValueError(f"{label} engine parameter {name}: shape {tuple(self.slots[name].shape)} does not "
                                 f"match {want} of {shape.describe()}")
        extra = [n for n in self.slots if n not in schema]
        if extra:
            raise ValueError(f"{label} engine has parameters the growth plan does not know: {extra[:4]}")


# ---- the executor ------------------------------------------------------------------------------


@dataclass
class GrowthStats:
    """What one rank did: rounds (all-to-alls), bytes moved, new elements written, seconds."""

    rounds: int = 0
    full_rounds: int = 0  # rounds that hold one whole old parameter (GPT-2 mean rows, HyperCloning's noise)
    bytes_sent: int = 0
    bytes_received: int = 0
    new_elements: int = 0
    old_elements: int = 0
    seconds: float = 0.0
    seconds_exchange: float = 0.0
    seconds_compute: float = 0.0
    seconds_setup: float = 0.0    # index math, schedule, transport set-up
    seconds_refresh: float = 0.0  # low-precision weights from the new masters
    seconds_pack: float = 0.0     # (part of exchange) copying sent elements into the send buffer / segment
    seconds_wait: float = 0.0     # (part of exchange) shared memory: waiting for every rank to have packed
    step: int = 0
    pieces: int = 0          # pieces this rank computed (a range of one new parameter)
    stacked_pieces: int = 0  # of which computed together with others of their kind (ParamGrowth.stack_into)
    transport: str = "collective"  # or "shm" (same host, zero_shm)
    lp_element_size: int = 0  # bytes per element of the low-precision weights refreshed (0: not refreshed)
    extra: Dict[str, float] = field(default_factory=dict)

    @property
    def master_state_bytes(self) -> int:
        """Bytes of fp32 master + exp_avg + exp_avg_sq this rank wrote."""
        return self.new_elements * 4 * 3

    @property
    def new_state_bytes(self) -> int:
        """Bytes of new state this rank wrote: its slices of the fp32 master, exp_avg, exp_avg_sq and (when
        refreshed) the low-precision weights (ZeRO-1/2 then all-gather those; that copy is not counted)."""
        return self.new_elements * (4 * 3 + self.lp_element_size)


def _kill_round() -> Optional[tuple]:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    r, k = spec.split(":")
    return int(r), int(k)


class _Clips:
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


class _Exchange:
    """One all-to-all of a round: every rank sends the old elements it owns that each request needs.
    Started asynchronously (the constructor), so the next round's transfer can overlap this round's
    compute; :meth:`finish` returns ``{request index: OldData}`` for this rank's requests."""

    def __init__(self, requests, growths: Sequence[ParamGrowth], old: ZeroLayout, stats: GrowthStats,
                 transport: Optional[ShmTransport], outgoing, clips: _Clips):
        """``outgoing``: :func:`_outgoing` of this round (computed up front to size the buffers)."""
        self.old, self.stats, self.transport, self.clips = old, stats, transport, clips
        me, world = old.rank, old.world
        outgoing, send_counts = outgoing
        # what this rank needs from itself is read from its own partitions in finish(), never sent
        self.local = {i: (slot, lo, pieces) for i, req, slot, lo, pieces, _ in outgoing[me]}
        total = sum(send_counts)
        t0 = time.perf_counter()
        self.device = old.device
        self.send = send = transport.buffer(total) if transport is not None else \
            torch.empty(total, dtype=torch.float32, device=old.comm_device if world > 1 else self.device)
        send_np = send.numpy() if send.device.type == "cpu" else None
        base = 0
        for q in range(world):  # what goes to q, channel-major (_planes): three planes, then one
            if q == me:
                continue
            items = outgoing[q]
            na = sum(it[5] for it in items if it[1].channels == 3)
            pos = [base, base + 3 * na]  # where the next request's channel 0 goes, per plane
            j = 0
            while j < len(items):
                i, req, slot, lo, pieces, n = items[j]
                ch = req.channels
                at, step = (pos[0], na) if ch == 3 else (pos[1], n)
                k = j + 1
                if send_np is None or slot.host is None:
                    _pack(send.as_strided((ch, n), (step, 1), send.storage_offset() + at), ch, slot, lo, pieces)
                else:
                    k = _stackable(items, j)
                    if k - j > 1:  # requests of one kind from slots at one stride: one copy per run and channel
                        _pack_host_stacked(send_np, at, step, n, items[j:k])
                    else:
                        _pack_host(np.ndarray((ch, n), np.float32, send_np, 4 * at, (4 * step, 4)), slot, lo, pieces)
                pos[ch != 3] += n * (k - j)
                j = k
            base += send_counts[q]
        self.mine = [(i, req) for i, req in enumerate(requests) if req.rank == me]
        self.counts = {}  # (request index, owner) -> elements
        recv_counts = [0] * world
        self.bounds = {}
        for i, req in self.mine:
            bounds = self.bounds[i] = old.slots[growths[req.param].source].bounds
            for p in range(world):
                n = clips(req.intervals, bounds[p], bounds[p + 1])[1]
                self.counts[i, p] = n
                if p != me:
                    recv_counts[p] += n * req.channels
        self.recv_counts, self.work, self.recv = recv_counts, None, None
        t1 = time.perf_counter()
        stats.seconds_pack += t1 - t0
        if transport is not None:
            transport.publish(send_counts)  # also the "every rank has packed" point
            stats.seconds_wait += time.perf_counter() - t1
        elif world == 1:
            self.recv = send
        else:
            self.recv = torch.empty(sum(recv_counts), dtype=torch.float32, device=old.comm_device)
            self.work = dist.all_to_all_single(self.recv, send, recv_counts, send_counts, group=old.group,
                                               async_op=True)
        stats.bytes_sent += 4 * (sum(send_counts) - send_counts[me])
        stats.bytes_received += 4 * (sum(recv_counts) - recv_counts[me])

    def _incoming(self, p: int) -> torch.Tensor:
        """What owner ``p`` sent this rank, flat."""
        if self.transport is None:
            start = sum(self.recv_counts[:p])
            return self.recv[start:start + self.recv_counts[p]]
        part = self.transport.incoming(p)
        if part.numel() != self.recv_counts[p]:
            raise RuntimeError(f"rank {p} packed {part.numel()} elements for rank {self.old.rank}, "
                               f"which expects {self.recv_counts[p]}")
        return part

    def _planes(self, p: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """What owner ``p`` sent, as per-channel views: an owner packs, for each destination, channel-major
        planes: channels 0, 1 and 2 of every 3-channel request (one after another, each request at the same
        position in all three), then channel 0 of every 1-channel request. So a request's data is a position
        in a round's four views (no per-request views)."""
        inc = self._incoming(p)
        na = sum(self.counts[i, p] for i, req in self.mine if req.channels == 3)
        return [inc[c * na:(c + 1) * na] for c in range(3)], [inc[3 * na:]]

    def finish(self) -> Dict[int, OldData]:
        """Wait for the transfer; ``{request index: OldData}`` for this rank's requests, with no copy: its
        chunks are views into this rank's own partitions and into what each owner sent (the receive
        buffer, or the owner's shared segment), valid until :meth:`release`."""
        if self.work is not None:
            self.work.wait()
            if self.recv.device != self.device:  # (NCCL with host partitions: ZeRO-Offload)
                self.recv = self.recv.to(self.device)
        self.send = None
        me, world = self.old.rank, self.old.world
        planes = [None if p == me else self._planes(p) for p in range(world)]
        # the same memory as numpy arrays (host float32), for the paths that compute through numpy (the planes of
        # an owner are views of one tensor)
        hplanes = [None if pl is None or pl[1][0].device.type != "cpu" or pl[1][0].dtype != torch.float32
                   else tuple([t.numpy() for t in part] for part in pl) for pl in planes]
        cursor = [[0, 0] for _ in range(world)]  # per owner, per plane
        out = {}
        for i, req in self.mine:
            chunks, hosts = [], []
            for p in range(world):  # owners in rank order = old flat order
                n = self.counts[i, p]
                if not n:
                    continue
                self.stats.old_elements += n
                if p == me:  # straight from this rank's partitions
                    slot, lo, pieces = self.local[i]
                    chunks.extend((a, b, slot.flats, a - lo + slot.offset) for a, b in pieces)
                    hosts.extend([slot.host] * len(pieces))
                    continue
                k = req.channels != 3
                part, pos = planes[p][k], cursor[p][k]
                hpart = hplanes[p][k] if hplanes[p] is not None else None
                cursor[p][k] += n
                for a, b in self.clips(req.intervals, *self.bounds[i][p:p + 2])[0]:
                    chunks.append((a, b, part, pos))
                    hosts.append(hpart)
                    pos += b - a
            out[i] = OldData(req.intervals, chunks=chunks, channels=req.channels, contiguous=True,  # (1-D, rows)
                             hosts=hosts)
        return out

    def release(self) -> None:
        """This rank is done with the round's data (views into shared segments included)."""
        self.recv = None
        if self.transport is not None:
            self.transport.next_round()


def _outgoing(requests, growths: Sequence[ParamGrowth], old: ZeroLayout, clips: _Clips):
    """``(per destination [(request index, request, slot, lo, pieces, elements)], per destination element
    count)``: the old elements this rank owns that each request of a round needs. Its own requests are
    listed but not counted (they are never sent)."""
    me, world = old.rank, old.world
    outgoing: List[List[tuple]] = [[] for _ in range(world)]
    for i, req in enumerate(requests):
        slot = old.slots[growths[req.param].source]
        lo = slot.bounds[me]
        pieces, n = clips(req.intervals, lo, slot.bounds[me + 1])
        if pieces:
            outgoing[req.rank].append((i, req, slot, lo, pieces, n))
    counts = [0 if q == me else sum(it[5] * it[1].channels for it in outgoing[q]) for q in range(world)]
    return outgoing, counts


def _stackable(items, j: int) -> int:
    """End of the run of ``items[j:]`` (entries of :func:`_outgoing` to one destination) that
    :func:`_pack_host_stacked` packs at once: the same channels, pieces (relative to the slice) and host
    arrays, slots at one non-negative stride in them (every layer of a kind under ZeRO-3)."""
    _, req, slot, lo, pieces, n = items[j]
    if len(pieces) > FEW_RUNS:
        return j + 1
    rel = None  # pieces relative to the slice, built only if some member's slice starts elsewhere
    k, stride = j + 1, None
    while k < len(items):
        _, req2, slot2, lo2, pieces2, n2 = items[k]
        d = slot2.offset - items[k - 1][2].offset  # (old element a of a piece lies at a - lo + slot.offset)
        if req2.channels != req.channels or slot2.host is not slot.host or n2 != n or d < 0 or \
                (stride is not None and d != stride):
            break
        if pieces2 is not pieces:
            if lo2 == lo:
                same = pieces2 == pieces
            else:
                rel = rel or [(a - lo, b - lo) for a, b in pieces]
                same = [(a - lo2, b - lo2) for a, b in pieces2] == rel
            if not same:
                break
        stride = d
        k += 1
    return k


def _pack_host_stacked(send: np.ndarray, at: int, step: int, n: int, items) -> None:
    """:func:`_pack_host` of a run from :func:`_stackable`: member ``m`` goes ``m * n`` elements after the first,
    in every plane; its old elements lie a fixed stride after the previous member's in the same arrays."""
    _, req, slot, lo, pieces, _ = items[0]
    base = slot.offset - lo
    stride = items[1][2].offset - slot.offset
    L, pos = len(items), 0
    for s, e in pieces:
        for c in range(req.channels):
            host = slot.host[c]
            dst = np.ndarray((L, e - s), np.float32, send, 4 * (at + c * step + pos), (4 * n, 4))
            np.copyto(dst, np.ndarray((L, e - s), np.float32, host, 4 * (s + base), (4 * stride, 4)))
        pos += e - s


def _pack(seg: torch.Tensor, channels: int, slot: Slot, lo: int, pieces) -> torch.Tensor:
    """Copy old flat ``pieces`` (this rank's, its slice starting at ``lo``) of each channel into ``seg``
    ``[channels, n]``, in order. Returns ``seg``."""
    if len(pieces) <= 2:
        for c in range(channels):
            pos = 0
            for s, e in pieces:
                seg[c, pos:pos + e - s].copy_(slot.flats[c][s - lo + slot.offset:e - lo + slot.offset])
                pos += e - s
    else:  # many short runs (permuted heads, GQA groups): one gather per channel
        idx = interval_index(pieces, lo - slot.offset)
        for c in range(channels):
            torch.index_select(slot.flats[c], 0, idx, out=seg[c])
    return seg


def _pack_host(seg: np.ndarray, slot: Slot, lo: int, pieces) -> None:
    """:func:`_pack` on numpy views of host memory (``seg`` ``[channels, n]``)."""
    base = slot.offset - lo
    if len(pieces) <= FEW_RUNS:
        for c in range(seg.shape[0]):
            flat, row, pos = slot.host[c], seg[c], 0
            for s, e in pieces:
                row[pos:pos + e - s] = flat[s + base:e + base]
                pos += e - s
    else:  # many short runs (permuted heads, GQA groups): one gather per channel
        idx = interval_index(pieces, -base).numpy()
        for c in range(seg.shape[0]):
            np.take(slot.host[c], idx, out=seg[c], mode="clip")  # (in range; "clip" writes out in place)


def _fetch_whole(req, growths, old: ZeroLayout, stats: GrowthStats) -> Optional[torch.Tensor]:
    """A reduction round: the designated rank ``req.rank`` receives the whole old value of one parameter
    in float64, straight into one buffer (point to point, owners convert their own slice). Returns
    ``[1, numel]`` float64 on the designated rank, None elsewhere."""
    slot = old.slots[growths[req.param].source]
    me, d = old.rank, req.rank
    lo, hi = slot.bounds[me], slot.bounds[me + 1]
    dev = old.comm_device
    if me != d:
        if hi > lo:
            dist.send(slot.views[0].to(dev, torch.float64), dst=dist.get_global_rank(old.group, d), group=old.group)
            stats.bytes_sent += 8 * (hi - lo)
        return None
    full = torch.empty(1, slot.numel, dtype=torch.float64, device=dev)
    full[0, lo:hi] = slot.views[0]
    works = []
    for p in range(old.world):
        a, b = slot.bounds[p], slot.bounds[p + 1]
        if p != me and b > a:
            works.append(dist.irecv(full[0, a:b], src=dist.get_global_rank(old.group, p), group=old.group))
            stats.bytes_received += 8 * (b - a)
    for w in works:
        w.wait()
    return full.cpu()  # (reduced on the host, as the reference does)


def _share_reductions(requests, growths, data, old: ZeroLayout, cache: Dict[int, Reductions]) -> None:
    """Designated ranks reduce whole old parameters; results reach every rank through one all_gather."""
    full = [(i, r) for i, r in enumerate(requests) if r.kind == "full"]
    if not full:
        return
    sizes = []
    for _, req in full:
        g = growths[req.param]
        sizes.append((g.d1 if "col_mean" in g.reductions else 0) + (1 if "std" in g.reductions else 0))
    vec = torch.zeros(sum(sizes), dtype=torch.float64, device=old.comm_device)
    off = 0
    for (i, req), n in zip(full, sizes):
        if req.rank == old.rank:
            red = growths[req.param].reduce(data.pop(i)[0])
            parts = ([red.col_mean] if red.col_mean is not None else []) + \
                ([torch.tensor([red.std], dtype=torch.float64)] if red.std is not None else [])
            vec[off:off + n] = torch.cat(parts)
        off += n
    if old.world > 1:
        gathered = [torch.empty_like(vec) for _ in range(old.world)]
        dist.all_gather(gathered, vec, group=old.group)
    else:
        gathered = [vec]
    off = 0
    for (_, req), n in zip(full, sizes):
        g, v = growths[req.param], gathered[req.rank][off:off + n]
        red = Reductions()
        if "col_mean" in g.reductions:
            red.col_mean = v[:g.d1].to(old.device, copy=True)
        if "std" in g.reductions:
            red.std = float(v[-1])
        cache[req.param] = red
        off += n


def auto_bucket(max_param_numel: int, local_new_numel: int, prefetch: bool = False) -> int:
    """First guess of the bucket (new elements per rank per round): a quarter of the largest new parameter
    and an eighth of a rank's share of the new model (``local_new_numel``, the same on every rank), halved
    when two rounds are in flight; at least 4096 and at most ``DEFAULT_BUCKET_ELEMS``. :func:`grow_engine` then halves it until the exchange buffers it measures fit
    (:func:`_transient`)."""
    b = min(max_param_numel // 4, local_new_numel // 8) // (2 if prefetch else 1)
    return int(min(DEFAULT_BUCKET_ELEMS, max(4096, b)))


def _transient(rounds, outgoing, me: int, shm: bool, prefetch: bool) -> int:
    """Elements this rank holds for the exchange in its worst round: the shared segment (two halves of its
    largest send), or the all-to-all's send + receive buffers (twice with prefetch)."""
    worst = 0
    for k, rnd in enumerate(rounds):
        if k not in outgoing:
            continue
        send = sum(outgoing[k][1])
        recv = sum(intervals_numel(r.intervals) * r.channels for r in rnd.requests if r.rank == me)
        worst = max(worst, 2 * send if shm else (send + recv) * (2 if prefetch else 1))
    return worst


def _zero_flags(growths: Sequence[ParamGrowth], old: ZeroLayout) -> Tuple[List[str], List[int]]:
    """Whether each old value that a noisy weight grows from holds an exact zero anywhere (the float32 fast
    path of a weight must then normalise signed zeros as the reference does): every rank scans its own old
    slices once (instead of every piece scanning the old rows it received). Returns the source names and
    this rank's flags (1 = a zero), to be reduced over ranks with MAX and given to :func:`_set_zero_flags`."""
    sources = sorted({g.source for g in growths if g.mode == "rows" and g.noisy})
    flats = {id(old.slots[n].flats[0]): old.slots[n] for n in sources}
    # (np.all: a vectorised scan, ~4x faster than count_nonzero here; -0.0 counts as a zero, as it must)
    if all(sl.host is not None for sl in flats.values()) and all(np.all(sl.host[0]) for sl in flats.values()):
        return sources, [0] * len(sources)  # (trained weights: no zero anywhere)
    flags = []
    for n in sources:
        slot = old.slots[n]
        if slot.host is not None:  # (numpy: ~1 us per call instead of ~10)
            flags.append(int(not np.all(slot.host[0][slot.offset:slot.offset + slot.local])))
        else:
            flags.append(int(int(torch.count_nonzero(slot.views[0])) < slot.local))
    return sources, flags


def _set_zero_flags(growths: Sequence[ParamGrowth], sources: List[str], flags: List[int]) -> None:
    has = dict(zip(sources, flags))
    for g in growths:
        if g.source in has:
            g.old_has_zero = bool(has[g.source])


def _shm_refresh_plan(engine, layout: ZeroLayout, max_param: int) -> Optional[int]:
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


def _shm_refresh(engine, layout: ZeroLayout, transport: ShmTransport, chunk_bytes: int) -> None:
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


def _compute_round(requests, data: Dict[int, OldData], growths: Sequence[ParamGrowth], new: ZeroLayout,
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


def grow_engine(old_engine, new_engine, plan: GrowthPlan, *, bucket_elems: Optional[int] = None,
                prefetch: bool = False, refresh: bool = True) -> GrowthStats:
    """Grow ``old_engine``'s whole training state into ``new_engine``, rank by rank, no gather.

    Contract (same as the gather path in ``StagedTrainer.grow``): ``new_engine`` is a DeepSpeed engine of
    ``plan.grown_shape`` with the same ZeRO stage family and data-parallel group, built (ZeRO-3: under
    ``zero.Init``) and with its Adam state materialised. Every rank must call this (it is a collective).
    Fills, on every rank, its slices of the fp32 masters, ``exp_avg``, ``exp_avg_sq``; sets the Adam step
    (0 under the reset rule), DeepSpeed's step counters, and refreshes the low-precision weights (ZeRO-1/2
    on one host: all-gathered through the shared segments, :func:`_shm_refresh`; else DeepSpeed's own way).
    ``old_engine`` is only read. ``bucket_elems``: new elements per rank per round (default
    :func:`auto_bucket`, halved until the exchange buffers every rank measures fit in 3/4 of the largest
    fp32 parameter); ``prefetch``: start the next round's all-to-all before computing this one (two
    buckets in flight, half the size each; pays off when a core or a network link is free to overlap the
    transfer, not on a CPU box with one core per rank; ignored with the shared-memory transport, whose
    rounds are read in place). Returns this rank's :class:`GrowthStats`.
    """
    t0 = time.perf_counter()
    old, new = ZeroLayout(old_engine, need_state=False), ZeroLayout(new_engine, need_state=True)
    if (old.world, old.rank) != (new.world, new.rank):
        raise ValueError(f"old and new engines differ in data-parallel layout: rank {old.rank}/{old.world} vs "
                         f"{new.rank}/{new.world}")
    schema = parameter_schema(plan.grown_shape)
    old.check(plan.small, "the old")
    new.check(plan.grown_shape, "the new", schema)
    cache = PlanCache(plan)
    clips = _Clips()
    growths = [cache.growth(name, spec) for name, spec in schema.items()]
    new_bounds = [new.slots[g.name].bounds for g in growths]
    max_param = max(g.new_numel for g in growths)
    auto = bucket_elems is None
    if auto:
        # from global metadata only: the schedule must be the same on every rank
        bucket_elems = auto_bucket(max_param, -(-sum(g.new_numel for g in growths) // new.world), prefetch)
    full = any(g.reductions for g in growths)  # whole-parameter rounds (the same at any bucket)
    on_cpu = all(p.device.type == "cpu" for p in old.partitions)  # (moments live with their partitions)
    sources, flags = _zero_flags(growths, old)
    lp_chunk = _shm_refresh_plan(new_engine, new, max_param) if refresh else None
    limit = 3 * max_param // 4  # the exchange buffers every rank measures must stay under this (auto bucket)

    def schedule(bucket):
        rounds = make_schedule(growths, new_bounds, new.world, bucket)
        return rounds, {k: _outgoing(r.requests, growths, old, clips) for k, r in enumerate(rounds)
                        if r.requests[0].kind != "full"}

    def capacity(outgoing):  # elements of this rank's shared segment half
        return max([sum(counts) for _, counts in outgoing.values()] + [lp_chunk // 4 if lp_chunk else 0])

    rounds, outgoing = schedule(bucket_elems)
    # same host: shared memory instead of an all-to-all; not for plans with whole-parameter rounds, whose one
    # old parameter must be the only thing held then (a persistent segment would add to it). One all-gather
    # decides everything every rank must agree on: the transport, the zero flags (MAX) and whether the
    # exchange buffers fit (MAX).
    offer = None if full else ShmOffer(old.world, on_cpu, capacity(outgoing))
    transport: Optional[ShmTransport] = None
    try:
        mine = (offer.row if offer is not None else [0] * ShmOffer.ROW) + \
            [_transient(rounds, outgoing, old.rank, True, False),
             _transient(rounds, outgoing, old.rank, False, prefetch)] + flags
        if old.world > 1:
            every = torch.empty(old.world * len(mine), dtype=torch.int64, device=old.comm_device)
            _all_gather(dist)(every, torch.tensor(mine, dtype=torch.int64, device=old.comm_device), group=old.group)
            rows = every.view(old.world, len(mine)).tolist()
        else:
            rows = [mine]
        k = ShmOffer.ROW
        shm = offer is not None and offer.agreed([r[:k] for r in rows])
        prefetch = prefetch and not shm
        worst = max(r[k if shm else k + 1] for r in rows)
        flags = [max(r[k + 2 + i] for r in rows) for i in range(len(sources))]
        while auto and worst > limit and bucket_elems > 4096:  # rare: halve the bucket until the buffers fit
            bucket_elems = max(4096, bucket_elems // 2)
            rounds, outgoing = schedule(bucket_elems)
            if shm:
                offer.resize(capacity(outgoing))
            need = torch.tensor([_transient(rounds, outgoing, old.rank, shm, prefetch)], device=old.comm_device)
            if old.world > 1:
                dist.all_reduce(need, op=dist.ReduceOp.MAX, group=old.group)
            worst = int(need)
        transport = offer.open(dist, old.group, old.rank, [r[:k] for r in rows], old.comm_device) if shm \
            else None
    finally:
        if offer is not None and transport is None:
            offer.withdraw()  # (an opened transport removes the names itself, after the first round)
    _set_zero_flags(growths, sources, flags)
    stats = GrowthStats(rounds=len(rounds), full_rounds=sum(r.requests[0].kind == "full" for r in rounds))
    if shm:
        stats.transport = "shm"
    else:
        lp_chunk = None
    stats.extra["bucket_elems"] = bucket_elems
    compute_elems = max(4096, min(bucket_elems // 8, max_param // 64))  # float64 work of the exact slow path
    stats.seconds_setup = time.perf_counter() - t0
    kill = _kill_round()
    reductions: Dict[int, Reductions] = {}
    me = new.rank
    pending: Optional[_Exchange] = None
    try:
        for k, rnd in enumerate(rounds):
            if kill is not None and kill == (me, k):
                os.kill(os.getpid(), signal.SIGKILL)
            t1 = time.perf_counter()
            ex = None
            if rnd.requests[0].kind == "full":  # a reduction round holds exactly one request
                data = {0: _fetch_whole(rnd.requests[0], growths, old, stats)}
                if data[0] is None:
                    data.clear()
            else:
                ex = pending if pending is not None else \
                    _Exchange(rnd.requests, growths, old, stats, transport, outgoing.pop(k), clips)
                pending = None
                data = ex.finish()
            _share_reductions(rnd.requests, growths, data, old, reductions)
            if prefetch and transport is None and k + 1 < len(rounds) and rounds[k + 1].requests[0].kind != "full":
                pending = _Exchange(rounds[k + 1].requests, growths, old, stats, transport,  # overlaps this compute
                                    outgoing.pop(k + 1), clips)
            t2 = time.perf_counter()
            _compute_round(rnd.requests, data, growths, new, reductions, compute_elems, stats)
            del data
            t3 = time.perf_counter()
            if ex is not None:
                ex.release()
                ex = None
            stats.seconds_exchange += t2 - t1 + time.perf_counter() - t3
            stats.seconds_compute += t3 - t2
        stats.step = 0 if plan.moments == "reset" else dse.get_step(old_engine)
        dse.set_step(new_engine, stats.step)
        for attr in ("global_steps", "global_samples", "skipped_steps"):
            if hasattr(old_engine, attr):
                setattr(new_engine, attr, getattr(old_engine, attr))
        if refresh:
            t1 = time.perf_counter()
            if lp_chunk is not None:
                _shm_refresh(new_engine, new, transport, lp_chunk)
            else:
                dse.refresh_low_precision(new_engine)
            stats.seconds_refresh = time.perf_counter() - t1
            stats.lp_element_size = new.lp_element_size
    finally:
        if transport is not None:
            transport.close()
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


__all__ = ["DEFAULT_BUCKET_ELEMS", "GrowthStats", "KILL_ENV", "Slot", "ZeroLayout", "auto_bucket", "gather_grow",
           "grow_any", "grow_engine", "is_partitioned"]

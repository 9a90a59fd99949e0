"""Moving old elements to the ranks that need them, one round at a time: packing (channel-major planes,
numpy on host memory), the round's exchange over a transport (an all-to-all, or the same-host shared
segments of :mod:`growth_ds.distributed.zero.shm`; a single rank reads its own partitions), and the
whole-parameter reduction rounds.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from growth_ds.distributed.zero.intervals import interval_index
from growth_ds.distributed.zero.layout import Slot, ZeroLayout
from growth_ds.distributed.zero.old_data import OldData, Reductions
from growth_ds.distributed.zero.param_growth import ParamGrowth
from growth_ds.distributed.zero.schedule import Clips, RoundPlan, Send
from growth_ds.distributed.zero.shm import ShmTransport
from growth_ds.distributed.zero.stats import GrowthStats

FEW_RUNS = 8  # a packed request of at most this many old intervals is copied interval by interval, else gathered


class _CollectiveRound:
    """One round over ``all_to_all_single`` (asynchronous: the next round's transfer may overlap this round's
    compute); a single rank sends nothing and reads only its own partitions."""

    def __init__(self, old: ZeroLayout, send: torch.Tensor, send_counts: List[int], recv_counts: List[int]):
        self.counts, self.work, self.device = recv_counts, None, old.device
        if old.world == 1:
            self.recv = send
        else:
            self.recv = torch.empty(sum(recv_counts), dtype=torch.float32, device=old.comm_device)
            self.work = dist.all_to_all_single(self.recv, send, recv_counts, send_counts, group=old.group,
                                               async_op=True)

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            if self.recv.device != self.device:  # (NCCL with host partitions: ZeRO-Offload)
                self.recv = self.recv.to(self.device)

    def incoming(self, p: int) -> torch.Tensor:
        start = sum(self.counts[:p])
        return self.recv[start:start + self.counts[p]]

    def done(self) -> None:
        self.recv = None


class _SharedRound:
    """One round through the same-host shared segments (:class:`~growth_ds.distributed.zero.shm.ShmTransport`):
    publishing is also the "every rank has packed" point, and the receiver reads the owner's segment."""

    def __init__(self, transport: ShmTransport, me: int, send_counts: List[int], recv_counts: List[int]):
        self.transport, self.me, self.counts = transport, me, recv_counts
        transport.publish(send_counts)

    def wait(self) -> None:
        pass

    def incoming(self, p: int) -> torch.Tensor:
        part = self.transport.incoming(p)
        if part.numel() != self.counts[p]:
            raise RuntimeError(f"rank {p} packed {part.numel()} elements for rank {self.me}, "
                               f"which expects {self.counts[p]}")
        return part

    def done(self) -> None:
        self.transport.next_round()


class Exchange:
    """One round of the exchange, executing its :class:`~growth_ds.distributed.zero.schedule.RoundPlan`: every
    rank packs the old elements it owns that each request needs and starts the transfer (the constructor);
    :meth:`finish` returns ``{request index: OldData}`` for this rank's requests; :meth:`release` ends the
    round. ``transport``: the same-host shared segments, or None for the collective (or single-rank) path."""

    def __init__(self, plan: RoundPlan, growths: Sequence[ParamGrowth], old: ZeroLayout, stats: GrowthStats,
                 transport: Optional[ShmTransport], clips: Clips):
        self.plan, self.growths, self.old, self.stats, self.clips = plan, growths, old, stats, clips
        me, world = old.rank, old.world
        # what this rank needs from itself is read from its own partitions in finish(), never sent
        self.local = {s.index: s for s in plan.sends[me]}
        t0 = time.perf_counter()
        total = plan.send_total
        send = transport.buffer(total) if transport is not None else \
            torch.empty(total, dtype=torch.float32, device=old.comm_device if world > 1 else old.device)
        _pack_round(send, plan, me)
        t1 = time.perf_counter()
        stats.seconds_pack += t1 - t0
        if transport is not None:
            self.round = _SharedRound(transport, me, plan.send_counts, plan.recv_counts)
            stats.seconds_wait += time.perf_counter() - t1
        else:
            self.round = _CollectiveRound(old, send, plan.send_counts, plan.recv_counts)
        stats.bytes_sent += 4 * (plan.send_total - plan.send_counts[me])
        stats.bytes_received += 4 * (sum(plan.recv_counts) - plan.recv_counts[me])

    def _planes(self, p: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """What owner ``p`` sent, as per-channel views (see :func:`_pack_round`): a request's data is a
        position in a round's four views (no per-request views)."""
        inc = self.round.incoming(p)
        na = sum(self.plan.recv[i, p] for i, req in self.plan.mine if req.channels == 3)
        return [inc[c * na:(c + 1) * na] for c in range(3)], [inc[3 * na:]]

    def finish(self) -> Dict[int, OldData]:
        """Wait for the transfer; ``{request index: OldData}`` for this rank's requests, with no copy: its
        chunks are views into this rank's own partitions and into what each owner sent (the receive
        buffer, or the owner's shared segment), valid until :meth:`release`."""
        self.round.wait()
        me, world = self.old.rank, self.old.world
        planes = [None if p == me else self._planes(p) for p in range(world)]
        # the same memory as numpy arrays (host float32), for the paths that compute through numpy (the planes of
        # an owner are views of one tensor)
        hplanes = [None if pl is None or pl[1][0].device.type != "cpu" or pl[1][0].dtype != torch.float32
                   else tuple([t.numpy() for t in part] for part in pl) for pl in planes]
        cursor = [[0, 0] for _ in range(world)]  # per owner, per plane
        out = {}
        for i, req in self.plan.mine:
            chunks, hosts = [], []
            bounds = self.old.slots[self.growths[req.param].source].bounds
            for p in range(world):  # owners in rank order = old flat order
                n = self.plan.recv[i, p]
                if not n:
                    continue
                self.stats.old_elements += n
                if p == me:  # straight from this rank's partitions
                    s = self.local[i]
                    chunks.extend((a, b, s.slot.flats, a - s.lo + s.slot.offset) for a, b in s.pieces)
                    hosts.extend([s.slot.host] * len(s.pieces))
                    continue
                k = req.channels != 3
                part, pos = planes[p][k], cursor[p][k]
                hpart = hplanes[p][k] if hplanes[p] is not None else None
                cursor[p][k] += n
                for a, b in self.clips(req.intervals, *bounds[p:p + 2])[0]:
                    chunks.append((a, b, part, pos))
                    hosts.append(hpart)
                    pos += b - a
            out[i] = OldData(req.intervals, chunks=chunks, channels=req.channels, contiguous=True,  # (1-D, rows)
                             hosts=hosts)
        return out

    def release(self) -> None:
        """This rank is done with the round's data (views into shared segments included)."""
        self.round.done()


def _pack_round(send: torch.Tensor, plan: RoundPlan, me: int) -> None:
    """Pack every destination's sends into ``send`` (destinations in rank order, ``plan.send_counts[q]``
    elements each), channel-major: channels 0, 1 and 2 of every 3-channel request (one after another, each
    request at the same position in all three planes), then channel 0 of every 1-channel request."""
    send_np = send.numpy() if send.device.type == "cpu" else None
    base = 0
    for q, items in enumerate(plan.sends):
        if q == me:
            continue
        na = sum(s.numel for s in items if s.request.channels == 3)
        at3, at1 = base, base + 3 * na  # where the next 3-channel / 1-channel request's channel 0 goes
        j = 0
        while j < len(items):
            s = items[j]
            ch, n = s.request.channels, s.numel
            at, step = (at3, na) if ch == 3 else (at1, n)  # (channel c of a 3-channel request: c * na further)
            k = j + 1
            if send_np is None or s.slot.host is None:
                pack(send.as_strided((ch, n), (step, 1), send.storage_offset() + at), ch, s.slot, s.lo, s.pieces)
            else:
                k = stackable(items, j)
                if k - j > 1:  # requests of one kind from slots at one stride: one copy per run and channel
                    pack_host_stacked(send_np, at, step, n, items[j:k])
                else:
                    pack_host(np.ndarray((ch, n), np.float32, send_np, 4 * at, (4 * step, 4)), s.slot, s.lo,
                              s.pieces)
            if ch == 3:
                at3 += n * (k - j)
            else:
                at1 += n * (k - j)
            j = k
        base += plan.send_counts[q]


def stackable(items: Sequence[Send], j: int) -> int:
    """End of the run of ``items[j:]`` (the sends to one destination) that :func:`pack_host_stacked` packs at
    once: the same channels, pieces (relative to the slice) and host arrays, slots at one non-negative
    stride in them (every layer of a kind under ZeRO-3)."""
    _, req, slot, lo, pieces, n = items[j]
    if len(pieces) > FEW_RUNS:
        return j + 1
    rel = None  # pieces relative to the slice, built only if some member's slice starts elsewhere
    k, stride = j + 1, None
    while k < len(items):
        _, req2, slot2, lo2, pieces2, n2 = items[k]
        d = slot2.offset - items[k - 1].slot.offset  # (old element a of a piece lies at a - lo + slot.offset)
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


def pack_host_stacked(send: np.ndarray, at: int, step: int, n: int, items: Sequence[Send]) -> None:
    """:func:`pack_host` of a run from :func:`stackable`: member ``m`` goes ``m * n`` elements after the first,
    in every plane; its old elements lie a fixed stride after the previous member's in the same arrays."""
    _, req, slot, lo, pieces, _ = items[0]
    base = slot.offset - lo
    stride = items[1].slot.offset - slot.offset
    L, pos = len(items), 0
    for s, e in pieces:
        for c in range(req.channels):
            host = slot.host[c]
            dst = np.ndarray((L, e - s), np.float32, send, 4 * (at + c * step + pos), (4 * n, 4))
            np.copyto(dst, np.ndarray((L, e - s), np.float32, host, 4 * (s + base), (4 * stride, 4)))
        pos += e - s


def pack(seg: torch.Tensor, channels: int, slot: Slot, lo: int, pieces) -> torch.Tensor:
    """Copy old flat ``pieces`` (this rank's, its slice starting at ``lo``) of each channel into ``seg``
    ``[channels, n]``, in order. Returns ``seg``."""
    if len(pieces) <= 2:
        for c in range(channels):
            pos = 0
            for s, e in pieces:
                seg[c, pos:pos + e - s].copy_(slot.flats[c][s - lo + slot.offset:e - lo + slot.offset])
                pos += e - s
    else:  # many short runs (permuted heads, GQA groups): one gather per channel
        idx = interval_index(pieces, lo - slot.offset).to(slot.flats[0].device)
        for c in range(channels):
            torch.index_select(slot.flats[c], 0, idx, out=seg[c])
    return seg


def pack_host(seg: np.ndarray, slot: Slot, lo: int, pieces) -> None:
    """:func:`pack` on numpy views of host memory (``seg`` ``[channels, n]``)."""
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


def fetch_whole(req, growths, old: ZeroLayout, stats: GrowthStats) -> Optional[torch.Tensor]:
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


def share_reductions(requests, growths, data, old: ZeroLayout, cache: Dict[int, Reductions]) -> None:
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


__all__ = ['Exchange', 'FEW_RUNS', 'fetch_whole', 'pack', 'pack_host', 'pack_host_stacked', 'share_reductions', 'stackable']

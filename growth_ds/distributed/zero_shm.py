"""Same-host transport for the ZeRO growth exchange: shared memory instead of an all-to-all.

When every rank of the data-parallel group runs on this host and the partitions live in host memory (a
CPU job, or ZeRO-Offload), moving old elements through gloo's TCP all-to-all costs two kernel copies per
byte and a syscall per chunk. Here each rank packs its outgoing data for a round straight into its own
shared-memory segment; one ``all_gather`` of the per-destination element counts (which also says "every
rank has written") tells each receiver where its part sits in every owner's segment, and the receiver
computes straight from it. Segments are double-buffered: round ``k`` packs into half ``k % 2``, so the
all_gather of round ``k`` also says "every rank is done reading round ``k - 2``" (a rank publishes a round
only after computing the previous one): one collective per round. One segment per rank, twice its
largest round: the send buffer of the all-to-all and about its receive buffer, without the receive
buffer's trip through the kernel.

Segments are files in ``/dev/shm`` that are unlinked as soon as every rank has mapped them, so a crash
leaves nothing behind. ``GROWTH_DS_ZERO_TRANSPORT`` = ``auto`` (default: shared memory when possible),
``shm`` or ``collective`` (always the all-to-all).
"""
from __future__ import annotations

import os
import socket
from typing import List, Optional

import torch

TRANSPORT_ENV = "GROWTH_DS_ZERO_TRANSPORT"
SHM_DIR = "/dev/shm"


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def want_shm(dist, group, world: int, on_cpu: bool) -> bool:
    """Whether to use :class:`ShmTransport` (a collective: every rank must call it)."""
    mode = os.environ.get(TRANSPORT_ENV, "auto")
    if mode not in ("auto", "shm", "collective"):
        raise ValueError(f"{TRANSPORT_ENV}: auto, shm or collective, got {mode!r}")
    if world == 1 or mode == "collective":
        return False
    hosts: List[Optional[str]] = [None] * world
    dist.all_gather_object(hosts, (_host_id(), on_cpu and os.path.isdir(SHM_DIR)), group=group)
    ok = len({h for h, _ in hosts}) == 1 and all(c for _, c in hosts)
    if mode == "shm" and not ok:
        raise RuntimeError(f"{TRANSPORT_ENV}=shm: the ranks are not all on one host with host-memory partitions")
    return ok


class ShmTransport:
    """One shared float32 segment per rank, two halves of ``capacity`` elements (the largest round it
    sends). Every rank calls :meth:`publish` once per round, in the same order."""

    def __init__(self, dist, group, rank: int, world: int, capacity: int):
        self.dist, self.group, self.rank, self.world = dist, group, rank, world
        token = torch.randint(0, 2**62, (1,), dtype=torch.int64) if rank == 0 else torch.zeros(1, dtype=torch.int64)
        dist.broadcast(token, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
        caps = torch.zeros(world, dtype=torch.int64)
        mine = torch.tensor([2 * max(int(capacity), 1)], dtype=torch.int64)
        dist.all_gather_into_tensor(caps, mine, group=group)
        path = lambda r: os.path.join(SHM_DIR, f"growth-ds-{int(token)}-{r}")  # noqa: E731
        with open(path(rank), "wb") as f:
            f.truncate(4 * int(caps[rank]))
        dist.barrier(group=group)
        self.segments = [self._map(path(r), int(caps[r]), peer=r != rank) for r in range(world)]
        dist.barrier(group=group)
        os.unlink(path(rank))
        self.round = 0
        self.counts: Optional[torch.Tensor] = None

    @staticmethod
    def _map(path: str, n: int, peer: bool) -> torch.Tensor:
        """Map a segment. A peer's segment is memory that peer allocated: it is mapped outside any
        TorchDispatchMode (memory accounting counts every segment once, on the rank that owns it)."""
        if not peer:
            return torch.from_file(path, shared=True, size=n, dtype=torch.float32)
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return torch.from_file(path, shared=True, size=n, dtype=torch.float32)

    def _half(self, owner: int) -> torch.Tensor:
        seg = self.segments[owner]
        half = seg.numel() // 2
        return seg[half:] if self.round % 2 else seg[:half]

    def buffer(self, n: int) -> torch.Tensor:
        """This rank's half segment for the current round, first ``n`` elements (pack outgoing data here)."""
        seg = self._half(self.rank)
        if n > seg.numel():
            raise RuntimeError(f"shared-memory segment of {seg.numel()} elements, round needs {n}")
        return seg[:n]

    def publish(self, send_counts: List[int]) -> None:
        """Collective: after packing, share every rank's per-destination counts (and that it has written)."""
        counts = torch.zeros(self.world * self.world, dtype=torch.int64)
        self.dist.all_gather_into_tensor(counts, torch.tensor(send_counts, dtype=torch.int64), group=self.group)
        self.counts = counts.view(self.world, self.world)

    def incoming(self, owner: int) -> torch.Tensor:
        """What ``owner`` packed for this rank this round: a view into its segment, valid until this rank
        publishes the round after next."""
        row = self.counts[owner]
        start = int(row[:self.rank].sum())
        return self._half(owner)[start:start + int(row[self.rank])]

    def next_round(self) -> None:
        """This rank is done with the round (no collective: the next publish says so to the others)."""
        self.round += 1
        self.counts = None


__all__ = ["SHM_DIR", "ShmTransport", "TRANSPORT_ENV", "want_shm"]

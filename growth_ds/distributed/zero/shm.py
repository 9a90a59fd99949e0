"""Same-host transport for the ZeRO growth exchange: shared memory instead of an all-to-all.

When every rank of the data-parallel group runs on this host and the partitions live in host memory (a
CPU job, or ZeRO-Offload), moving old elements through gloo's TCP all-to-all costs two kernel copies per
byte and a syscall per chunk. Here each rank packs its outgoing data for a round straight into its own
shared-memory segment and the receiver computes straight from it.

Synchronisation. Each segment starts with a small header: the number of rounds its rank has published, its
pid, and per half its per-destination element counts. :meth:`ShmTransport.publish` writes the counts, then
bumps the round number, then waits until every rank has published the round: the same "every rank has
packed" point as an all-gather of the counts, at the cost of a few memory reads instead of a gloo
collective (once per round). Segments are double-buffered:
round ``k`` packs into half ``k % 2``, and a rank starts packing round ``k`` only after every rank has
published round ``k - 1``, which each does only after computing round ``k - 2``: so nothing is overwritten
while it is read. The header protocol relies on stores becoming visible in program order (x86-64); on other
machines each round's counts go through an all-gather instead (:data:`FENCED`). A wait spins briefly, then
yields the core (ranks may outnumber cores), then sleeps; it fails with an error naming the rank when a
peer's process is gone or after ``GROWTH_DS_SHM_TIMEOUT`` seconds (default 1800) without progress.

Set-up costs no collective of its own: each rank creates its segment (:class:`ShmOffer`, a name from its pid
and a nonce) before the one all-gather in which the executor agrees on everything else, and that all-gather
carries every rank's (host, usable, pid, nonce) row; so when it returns every segment exists and can be
mapped. Segments are files in ``/dev/shm`` that each rank unlinks once every rank has mapped it (the first
publish says so), or at once when the ranks do not agree on shared memory, so a crash leaves nothing behind
but the segments of a crash during set-up.
``GROWTH_DS_ZERO_TRANSPORT`` = ``auto`` (default: shared memory when possible), ``shm`` or ``collective``
(always the all-to-all).
"""
from __future__ import annotations

import hashlib
import os
import platform
import secrets
import socket
import time
from typing import List, Optional

import torch

TRANSPORT_ENV = "GROWTH_DS_ZERO_TRANSPORT"
TIMEOUT_ENV = "GROWTH_DS_SHM_TIMEOUT"
SHM_DIR = "/dev/shm"
FENCED = platform.machine().lower() in ("x86_64", "amd64")  # total store order: header flags are safe
_ALIGN = 1024  # float32 elements (4 KiB): the data halves start on a page


def _host_id() -> str:
    """This host and process namespace: ranks that agree can map each other's segments and see each
    other's pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}/{boot}/{ns}"


class ShmOffer:
    """This rank's half of setting the transport up, before the one collective that decides it (the caller's:
    it all-gathers :attr:`row` with whatever else it needs to agree on). Creating an offer creates this rank's
    segment (a name of its own, from its pid and a nonce), so once every rank's row has arrived every segment
    exists and can be mapped with no barrier. :meth:`agreed` says whether every rank can use shared memory
    (one host, host-memory partitions); then :meth:`open` maps the segments, else :meth:`withdraw` removes
    this rank's."""

    ROW = 4  # int64s per rank: host, usable, pid, nonce

    def __init__(self, world: int, on_cpu: bool, capacity: int):
        self.mode = os.environ.get(TRANSPORT_ENV, "auto")
        if self.mode not in ("auto", "shm", "collective"):
            raise ValueError(f"{TRANSPORT_ENV}: auto, shm or collective, got {self.mode!r}")
        self.timeout = _timeout()
        self.world = world
        usable = world > 1 and self.mode != "collective" and on_cpu and os.path.isdir(SHM_DIR)
        host = int.from_bytes(hashlib.sha1(_host_id().encode()).digest()[:8], "little", signed=True)
        nonce = secrets.randbits(62)
        self.row = [host, int(usable), os.getpid(), nonce]
        self.path: Optional[str] = None
        if usable:
            self.path = _segment_path(os.getpid(), nonce)
            self.half = 0
            with open(self.path, "wb"):
                pass
            self.resize(capacity)

    def resize(self, capacity: int) -> None:
        """Make this rank's segment hold rounds of ``capacity`` elements (never shrinks; before :meth:`open`)."""
        half = -(-max(int(capacity), 1) // _ALIGN) * _ALIGN
        if self.path is not None and half > self.half:
            self.half = half
            os.truncate(self.path, 4 * (_header_elems(self.world) + 2 * half))

    def agreed(self, rows: List[List[int]]) -> bool:
        """Whether every rank can use the transport (``rows``: every rank's :attr:`row`, in rank order)."""
        ok = self.world > 1 and len({r[0] for r in rows}) == 1 and all(r[1] for r in rows)
        if self.mode == "shm" and not ok:
            raise RuntimeError(f"{TRANSPORT_ENV}=shm: the ranks are not all on one host with host-memory partitions")
        return ok

    def open(self, dist, group, rank: int, rows: List[List[int]], device=None) -> "ShmTransport":
        """Map every rank's segment (after :meth:`agreed`, and after every rank's last :meth:`resize`).
        ``device``: where the all-gather fallback's tensors must live (default: host memory)."""
        try:
            return ShmTransport(dist, group, rank, self.world, [_segment_path(r[2], r[3]) for r in rows],
                                self.timeout, device)
        except BaseException:
            self.withdraw()
            raise

    def withdraw(self) -> None:
        """Remove this rank's segment name (idempotent)."""
        if self.path is not None:
            _unlink(self.path)


def _segment_path(pid: int, nonce: int) -> str:
    return os.path.join(SHM_DIR, f"growth-ds-{pid}-{nonce:x}")


def _header_elems(world: int) -> int:
    """float32 elements of a segment's int64 header (round, pid, per half one count per rank), padded to a page."""
    return -(-2 * (2 + 2 * world) // _ALIGN) * _ALIGN


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ShmTransport:
    """One shared float32 segment per rank: a header, then two halves of equal size (at least the largest
    round it sends). Every rank calls :meth:`publish` once per round, in the same order, then
    :meth:`next_round` when it is done reading; :meth:`close` at the end. Built by :meth:`ShmOffer.open`."""

    def __init__(self, dist, group, rank: int, world: int, paths: List[str], timeout: float, device=None):
        self.dist, self.group, self.rank, self.world = dist, group, rank, world
        self.device = device if device is not None else torch.device("cpu")  # (of the all-gather fallback)
        self.hdr_elems = _header_elems(world)
        self.timeout = timeout
        self.paths = paths
        self.path = paths[rank]
        self.segments = [self._map(path, peer=r != rank) for r, path in enumerate(paths)]
        self.headers = [s[:self.hdr_elems].view(torch.int64).numpy() for s in self.segments]
        self.headers[rank][1] = os.getpid()
        self.round = 0
        self.counts: Optional[List[List[int]]] = None

    @staticmethod
    def _map(path: str, peer: bool) -> torch.Tensor:
        """Map a segment (its size from the file). A peer's segment is memory that peer allocated: it is
        mapped outside any TorchDispatchMode (memory accounting counts every segment once, on the rank that
        owns it)."""
        n = os.path.getsize(path) // 4
        if not peer:
            return torch.from_file(path, shared=True, size=n, dtype=torch.float32)
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return torch.from_file(path, shared=True, size=n, dtype=torch.float32)

    def _half(self, owner: int) -> torch.Tensor:
        data = self.segments[owner][self.hdr_elems:]
        half = data.numel() // 2
        return data[half:] if self.round % 2 else data[:half]

    def buffer(self, n: int) -> torch.Tensor:
        """This rank's half segment for the current round, first ``n`` elements (pack outgoing data here)."""
        seg = self._half(self.rank)
        if n > seg.numel():
            raise RuntimeError(f"shared-memory segment of {seg.numel()} elements, round needs {n}")
        return seg[:n]

    def publish(self, send_counts: List[int]) -> None:
        """After packing: tell every rank this rank's per-destination counts (and that it has written), and
        wait until every rank has done so for this round."""
        k, w = self.round, self.world
        if not FENCED:
            counts = torch.zeros(w * w, dtype=torch.int64, device=self.device)
            all_gather_fn(self.dist)(counts, torch.tensor(send_counts, dtype=torch.int64, device=self.device),
                                   group=self.group)
            self.counts = counts.view(w, w).tolist()
        else:
            me = self.headers[self.rank]
            base = 2 + (k % 2) * w
            me[base:base + w] = send_counts
            me[0] = k + 1  # (after the counts: stores are seen in order)
            self._wait(k + 1)
            self.counts = [h[base:base + w].tolist() for h in self.headers]
        if k == 0:  # every rank has mapped every segment: the names can go
            self.close()

    def _wait(self, k: int) -> None:
        """Until every rank's published round count is at least ``k``."""
        headers = self.headers
        t0 = last = time.monotonic()
        n = 0
        while True:
            if all(h[0] >= k for h in headers):
                return
            n += 1
            if n < 64:
                continue
            now = time.monotonic()
            if now - t0 < 0.02:
                os.sched_yield()
                continue
            time.sleep(1e-4 if now - t0 < 1.0 else 1e-3)
            if now - last > 0.5:
                last = now
                for p, h in enumerate(headers):
                    if h[0] < k and h[1] and not _alive(int(h[1])):
                        raise RuntimeError(f"rank {p} (pid {int(h[1])}) exited during ZeRO growth (round {k - 1})")
                if now - t0 > self.timeout:
                    late = [p for p, h in enumerate(headers) if h[0] < k]
                    raise RuntimeError(f"ZeRO growth: ranks {late} did not publish round {k - 1} within "
                                       f"{self.timeout:.0f} s ({TIMEOUT_ENV})")

    def incoming(self, owner: int) -> torch.Tensor:
        """What ``owner`` packed for this rank this round: a view into its segment, valid until this rank
        publishes the round after next."""
        row = self.counts[owner]
        start = sum(row[:self.rank])
        return self._half(owner)[start:start + row[self.rank]]

    def shared(self, owner: int) -> torch.Tensor:
        """``owner``'s whole half segment this round (what it packed once for every rank: a broadcast),
        valid as :meth:`incoming`."""
        return self._half(owner)

    def next_round(self) -> None:
        """This rank is done with the round (no collective: the next publish says so to the others)."""
        self.round += 1
        self.counts = None

    def close(self) -> None:
        """Remove this rank's segment name (done after the first round; idempotent). The mappings go with the
        tensors."""
        _unlink(self.path)


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}: a positive number of seconds, got {raw!r}")
    return value


def all_gather_fn(dist):
    """``all_gather_single`` (torch >= 2.13), else ``all_gather_into_tensor`` (same signature)."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["FENCED", "SHM_DIR", "ShmOffer", "ShmTransport", "TIMEOUT_ENV", "TRANSPORT_ENV", "all_gather_fn"]

"""Memory accounting for growth: which tensors a piece of code allocates, and the peak of their sum.

:class:`TensorAccountant` is a ``TorchDispatchMode``: every aten operation that runs while it is active
(factories, arithmetic, copies, collectives' outputs, the temporaries of composite ops) reports its
outputs; an output whose storage is new (not the storage of one of the op's inputs) is counted until
the storage is freed (tracked through a weak reference). ``peak`` is the high-water mark of the live
sum, so it measures what the code allocates *on top of* what existed before (here: the two engines'
partitions). Scratch memory inside a single kernel is not seen; everything a Python-level function
keeps between ops is.

:func:`rss_peak_window` resets and reads the kernel's resident high-water mark (``VmHWM``) around a
block, for whole-process figures (benchmarks).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class TensorAccountant(TorchDispatchMode):
    """``with TensorAccountant() as acct: ...``; then ``acct.peak`` / ``acct.current`` in bytes."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, Tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.allocated = 0  # total bytes ever allocated while active

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    @staticmethod
    def _tensors(obj, out):
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                TensorAccountant._tensors(x, out)
        elif isinstance(obj, dict):
            for x in obj.values():
                TensorAccountant._tensors(x, out)
        return out

    @staticmethod
    def _storage(t):
        if t.device.type != "cpu":
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        new = []
        for t in self._tensors(out, []):
            st = self._storage(t)
            if st is None:
                continue
            ptr, n = st.data_ptr(), st.nbytes()
            if n and ptr not in self.live:
                new.append((ptr, n, st))
        if new:
            inputs = {st.data_ptr() for st in (self._storage(t) for t in self._tensors((args, kwargs), []))
                      if st is not None}
            for ptr, n, st in new:
                if ptr in inputs:
                    continue
                if ptr in self.live:  # address reused after a free we have not swept yet
                    self._sweep()
                self.live[ptr] = (StorageWeakRef(st), n)
                self.current += n
                self.allocated += n
            if self.current > self.peak:  # only a new high needs an exact figure: drop what died
                self._sweep()
                self.peak = max(self.peak, self.current)
        return out

    def finish(self) -> None:
        self._sweep()


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    return _read_status("VmRSS")


@contextlib.contextmanager
def rss_peak_window():
    """Yields a dict; on exit it holds ``before``, ``peak`` (VmHWM since entry) and ``after`` in bytes.
    Resetting VmHWM writes ``5`` to ``/proc/self/clear_refs`` (Linux); if that fails, ``peak`` is the
    process-lifetime high-water mark and ``reset`` is False."""
    out = {"before": rss(), "reset": True}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        out["reset"] = False
    try:
        yield out
    finally:
        out["peak"] = _read_status("VmHWM")
        out["after"] = rss()


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS reflects live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


__all__ = ["TensorAccountant", "malloc_trim", "rss", "rss_peak_window"]

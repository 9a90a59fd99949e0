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
import os
from typing import Dict, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


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

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                try:
                    inputs.add(t.untyped_storage().data_ptr())
                except (RuntimeError, NotImplementedError):
                    pass
        out = func(*args, **kwargs)
        self._sweep()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            ptr, n = st.data_ptr(), st.nbytes()
            if n == 0 or ptr in inputs or ptr in self.live:
                continue
            self.live[ptr] = (StorageWeakRef(st), n)
            self.current += n
            self.allocated += n
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

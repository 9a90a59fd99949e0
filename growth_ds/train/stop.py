"""Stopping a run cleanly on a scheduler's warning: SIGTERM (torchrun, ``scancel``, Kubernetes) and SIGUSR1
(Slurm's ``--signal=USR1@T``, forwarded by ``launch/slurm.sbatch``).

The handler only records the signal. The trainer asks :meth:`StopRequest.agreed` once per step, after the
step: every rank contributes its flag (a max all-reduce), so all ranks stop at the same step, write one
complete checkpoint and exit with :data:`EXIT_STOPPED`. A signal that arrives during a growth is acted on
after the growth and the step that follows it: the growth is finished, never half-written, and the
checkpoint before it stays the latest complete one until the new one is complete.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

EXIT_STOPPED = 75           # EX_TEMPFAIL: "stopped on request after a complete checkpoint; run again to resume"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Install with :meth:`install` (main thread only), ask :meth:`agreed` after every step, :meth:`restore`."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def agreed(self, world: int, device=None) -> Optional[int]:
        """The signal number if any rank received one (a collective when ``world > 1``), else None."""
        if world == 1:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

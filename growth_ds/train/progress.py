"""What a run prints while it trains: a redrawn progress bar on a terminal, plain lines in a batch job.

On a terminal (``stream.isatty()``) a tqdm bar is redrawn every step. Otherwise (Slurm, ``nohup``, ``> log``)
one plain line every ``every`` steps (0: about 20 lines over the run), and at the last step::

    [demo] step 300/1500 (20%) stage 0 loss 4.8123 lr 3.00e-03 val 4.9011 14,003 tok/s eta 1m26s
"""
from __future__ import annotations

import sys
import time
from typing import Optional


def _duration(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressOutput:
    """``update(step, stage, loss, lr, tokens_per_s, val_loss)`` after each step; ``write(text)`` for events
    (a growth); ``set_total(n)`` when the run's end is re-planned; ``close()`` at the end."""

    def __init__(self, name: str, total: int, initial: int = 0, every: int = 0, stream=None):
        self.name, self.total, self.every = name, int(total), int(every)
        self.stream = stream or sys.stderr
        self.bar = None
        self.t0, self.s0 = time.time(), initial
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=initial, desc=name, unit="step", dynamic_ncols=True,
                            file=self.stream)

    def set_total(self, total: int) -> None:
        self.total = int(total)
        if self.bar is not None:
            self.bar.total = self.total

    def _due(self, step: int) -> bool:
        every = self.every or max(1, self.total // 20)
        return step % every == 0 or step == self.total

    def update(self, step: int, stage: int, loss: float, lr: float, tokens_per_s: float,
               val_loss: Optional[float] = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(stage=stage, loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            return
        if not self._due(step):
            return
        done = step - self.s0
        eta = (time.time() - self.t0) / done * (self.total - step) if done > 0 else 0.0
        val = "" if val_loss is None else f" val {val_loss:.4f}"
        self.write(f"[{self.name}] step {step}/{self.total} ({100 * step / max(1, self.total):.0f}%) stage {stage} "
                   f"loss {loss:.4f} lr {lr:.2e}{val} {tokens_per_s:,.0f} tok/s eta {_duration(eta)}")

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

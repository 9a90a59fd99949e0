"""What one rank did in one growth: rounds, bytes, pieces, seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

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
    transport: str = "collective"  # or "shm" (same host, zero.shm)
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


__all__ = ['GrowthStats']

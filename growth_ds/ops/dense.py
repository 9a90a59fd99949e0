"""Dense linear growth maps: every new element may depend on every old one (LiGO and other learned maps).

One grown parameter is

    new = scale * (B (sum_j c_j W_j) A) + shift          (2-D: B [D0, d0], W_j [d0, d1], A [d1, D1])
    new = scale * (B (sum_j c_j w_j)) + shift            (1-D: B [D0, d0], w_j [d0])

with ``B``/``A`` None meaning the identity, ``sources`` the ``(name, c_j)`` of the old parameters mixed in
(depth mixing), ``scale``/``shift`` optional elementwise tensors of the new shape (a fixed plan's coupling
and noise, a norm's offset). :func:`apply_dense` is the reference on full tensors;
``growth_ds.distributed.zero.dense`` computes the same on ZeRO partitions (per-rank partial products,
reduce-scattered to the new owners).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

F64 = torch.float64


@dataclass
class DenseMap:
    """``new = scale * (B @ sum_j c_j W_j @ A) + shift`` (see the module docstring); float64 maps."""

    source: Union[str, Sequence[Tuple[str, float]]]
    B: Optional[torch.Tensor]            # [D0, d0] (None: identity)
    A: Optional[torch.Tensor] = None     # [d1, D1] (None: identity; always None for 1-D parameters)
    scale: Optional[torch.Tensor] = None  # new shape, elementwise
    shift: Optional[torch.Tensor] = None  # new shape, elementwise

    @property
    def sources(self) -> Tuple[Tuple[str, float], ...]:
        if isinstance(self.source, str):
            return ((self.source, 1.0),)
        return tuple((n, float(c)) for n, c in self.source)

    def new_shape(self, old_shape: Sequence[int]) -> Tuple[int, ...]:
        d0 = self.B.shape[0] if self.B is not None else old_shape[0]
        if len(old_shape) == 1:
            return (d0,)
        return (d0, self.A.shape[1] if self.A is not None else old_shape[1])

    def product(self, w: torch.Tensor) -> torch.Tensor:
        """``B w A`` of one (mixed) old tensor or row block, float64."""
        w = w.to(F64)
        if self.B is not None:
            w = self.B.to(F64) @ w
        if self.A is not None and w.dim() == 2:
            w = w @ self.A.to(F64)
        return w

    def finish(self, core: torch.Tensor, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Apply ``scale`` and ``shift`` to flat elements ``[lo, hi)`` of the new parameter."""
        flat = core.reshape(-1)
        hi = lo + flat.numel() if hi is None else hi
        if self.scale is not None:
            flat = flat * self.scale.reshape(-1)[lo:hi].to(F64)
        if self.shift is not None:
            flat = flat + self.shift.reshape(-1)[lo:hi].to(F64)
        return flat


def apply_dense(m: DenseMap, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference: the new parameter from the full old ``params`` (float64 sums, returned in float32)."""
    srcs = m.sources
    mixed = sum(c * params[n].to(F64) for n, c in srcs)
    shape = m.new_shape(params[srcs[0][0]].shape)
    return m.finish(m.product(mixed)).reshape(shape).to(torch.float32)


__all__ = ["DenseMap", "apply_dense"]

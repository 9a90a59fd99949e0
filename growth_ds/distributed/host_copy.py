"""Large same-dtype copies in host memory at the speed of the C library's ``memcpy``.

torch's CPU copy kernel writes with ordinary stores. glibc's ``memmove`` switches to streaming
(non-temporal) stores above ``glibc.cpu.x86_non_temporal_threshold`` (a glibc tunable, typically tens of MiB),
which skip the read-for-ownership of every destination line, so large copies move fewer bytes; below
the threshold both copy the same way (``benchmarks/zero_growth.py`` prints the bandwidths). The refresh of low-precision weights from fp32 masters (one flat copy per parameter group) is the
large copy of a growth.
"""
from __future__ import annotations

import ctypes

import torch

MIN_BYTES = 1 << 20  # below this a copy is overhead-bound either way


def copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)``; through ``memmove`` when both are contiguous host tensors of one dtype and shape,
    at least :data:`MIN_BYTES`, and torch runs one thread (with more, its copy is split over them). Same
    bytes either way. Returns ``dst``."""
    nbytes = dst.numel() * dst.element_size()
    if (nbytes >= MIN_BYTES and dst.device.type == "cpu" and src.device.type == "cpu"
            and dst.dtype == src.dtype and dst.shape == src.shape and dst.is_contiguous()
            and src.is_contiguous() and torch.get_num_threads() == 1):
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)
        return dst
    return dst.copy_(src)


__all__ = ["MIN_BYTES", "copy_"]

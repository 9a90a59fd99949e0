"""Where DeepSpeed keeps every element of an engine's training state (ZeRO stage 1, 2 or 3): the one file
that reads DeepSpeed's optimizer internals.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from growth_ds.distributed import engine_state as dse
from growth_ds.models.schema import parameter_schema

KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # the channels: fp32 master, Adam moments


@dataclass
class Slot:
    """One parameter of one engine: rank ``r`` holds flat ``[bounds[r], bounds[r + 1])``, this rank's part
    at ``[offset, offset + bounds[rank + 1] - bounds[rank])`` of ``flats``: DeepSpeed's 1-D fp32 master,
    ``exp_avg`` and ``exp_avg_sq`` partitions. ``views`` are those slices (writable). ``host``: the exchange
    copies many small pieces, and a numpy copy of a small piece avoids a torch dispatch per piece."""

    name: str
    shape: tuple
    numel: int
    bounds: List[int]
    flats: List[torch.Tensor]
    offset: int
    local: int
    host: Optional[List[np.ndarray]] = None  # ``flats`` as numpy arrays of the same memory (float32 on the CPU)

    @functools.cached_property
    def views(self) -> List[torch.Tensor]:
        return [f.narrow(0, self.offset, self.local) for f in self.flats]


def host_arrays(flats: List[torch.Tensor]) -> Optional[List[np.ndarray]]:
    """``flats`` as numpy arrays of the same memory when all are float32 in host memory, else None."""
    if all(f.device.type == "cpu" and f.dtype == torch.float32 for f in flats):
        return [f.numpy() for f in flats]
    return None


class ZeroLayout:
    """The ZeRO partition layout of an engine (stage 1, 2 or 3), read from DeepSpeed's optimizer."""

    def __init__(self, engine, need_state: bool = True):
        zo = engine.optimizer
        self.engine = engine
        self.base = dse.base_optimizer(engine)
        names = getattr(engine, "param_names", None)  # (DeepSpeed's own {param: name}: no module walk)
        if not isinstance(names, dict) or any(p not in names for g in self._groups(zo) for p in g):
            names = {p: n for n, p in engine.module.named_parameters()}
        if hasattr(zo, "fp32_partitioned_groups_flat"):
            self.stage = 3
        elif hasattr(zo, "single_partition_of_fp32_groups") and hasattr(zo, "bit16_groups_flat"):
            self.stage = 2 if getattr(zo, "partition_gradients", False) else 1
        else:
            raise NotImplementedError(f"{type(zo).__name__}: ZeRO-sharded growth needs a ZeRO stage 1, 2 or 3 "
                                      f"optimizer; use gather_grow for stage 0")
        self.group = zo.dp_process_group
        self.rank = dist.get_rank(group=self.group)
        self.world = dist.get_world_size(group=self.group)
        # collective buffers live on comm_device (host under gloo, the GPU under NCCL); computed data on the
        # partitions' device (the GPU, or host memory under ZeRO-Offload)
        self.comm_device = dse.comm_device(self.group) if self.world > 1 else torch.device("cpu")
        self.slots: Dict[str, Slot] = {}
        self.partitions: List[torch.Tensor] = []
        lp = zo.fp16_partitioned_groups_flat if self.stage == 3 else zo.bit16_groups_flat
        self.lp_element_size = lp[0].element_size() if len(lp) else 0  # low-precision weights (bf16/fp16/fp32)
        self._zero_state: Dict[int, torch.Tensor] = {}
        if self.stage == 3:
            for sg, params in enumerate(zo.fp16_groups):
                part = zo.fp32_partitioned_groups_flat[sg]
                state = self._state(part, need_state)
                self.partitions.append(part)
                flats = [part.detach()] + [state[key] for key in KEYS[1:]]
                host = host_arrays(flats)
                for p in params:
                    _, off, pn = zo.grad_position[zo.get_param_id(p)]
                    n = int(p.ds_numel)
                    bounds = [min(r * pn, n) for r in range(self.world)] + [n]
                    k = bounds[self.rank + 1] - bounds[self.rank]
                    self.slots[names[p]] = Slot(names[p], tuple(p.ds_shape), n, bounds, flats, off, k, host)
        else:
            for g, params in enumerate(zo.round_robin_bit16_groups):
                flat, part = zo.bit16_groups_flat[g], zo.single_partition_of_fp32_groups[g]
                ps = zo.partition_size[g]
                state = self._state(part, need_state)
                self.partitions.append(part)
                flats = [part.detach()] + [state[key] for key in KEYS[1:]]
                host = host_arrays(flats)
                for p in params:
                    off = (p.data_ptr() - flat.data_ptr()) // p.element_size()
                    n = p.numel()
                    bounds = [min(max(r * ps - off, 0), n) for r in range(self.world)] + [n]
                    lo, hi = bounds[self.rank], bounds[self.rank + 1]
                    loc = off + lo - self.rank * ps if hi > lo else 0
                    self.slots[names[p]] = Slot(names[p], tuple(p.shape), n, bounds, flats, loc, hi - lo, host)
        self.device = self.partitions[0].device if self.partitions else torch.device("cpu")  # (of the partitions)

    @staticmethod
    def _groups(zo) -> list:
        return zo.fp16_groups if hasattr(zo, "fp32_partitioned_groups_flat") else \
            getattr(zo, "round_robin_bit16_groups", [])

    def _state(self, part: torch.Tensor, need: bool) -> Dict[str, torch.Tensor]:
        st = self.base.state.get(part, {})
        if "exp_avg" in st and "exp_avg_sq" in st:
            return st
        if need:
            raise ValueError("the grown engine has no Adam state yet: call "
                             "growth_ds.train.deepspeed_engine.materialise_optimizer_state(engine, batch) first")
        zeros = self._zero_state.setdefault(part.numel(), torch.zeros(part.numel(), dtype=torch.float32))
        return {"exp_avg": zeros, "exp_avg_sq": zeros}  # never stepped: zero moments

    def local_numel(self) -> int:
        return sum(s.bounds[self.rank + 1] - s.bounds[self.rank] for s in self.slots.values())

    def check(self, shape, label: str, schema=None) -> None:
        """``ValueError`` naming the first parameter whose name or shape does not fit ``shape`` (``schema``: its
        ``parameter_schema``, if the caller has it)."""
        schema = schema if schema is not None else parameter_schema(shape)
        dims = {}
        for name, spec in schema.items():
            if name not in self.slots:
                raise ValueError(f"{label} engine has no parameter {name!r} (expected for {shape.describe()})")
            want = tuple(dims[a] if a in dims else dims.setdefault(a, shape.space_dim(a)) for a in spec.axes)
            if tuple(self.slots[name].shape) != want:
                raise ValueError(f"{label} engine parameter {name}: shape {tuple(self.slots[name].shape)} does not "
                                 f"match {want} of {shape.describe()}")
        extra = [n for n in self.slots if n not in schema]
        if extra:
            raise ValueError(f"{label} engine has parameters the growth plan does not know: {extra[:4]}")


__all__ = ['KEYS', 'Slot', 'ZeroLayout', 'host_arrays']

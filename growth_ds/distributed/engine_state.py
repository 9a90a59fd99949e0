"""DeepSpeed state access shared by the placement executors and the trainer: one parameter's full fp32 value
and Adam moments in any ZeRO stage, the Adam step, the optimizer-state links, the low-precision refresh and
the device collectives need. Engine construction stays in ``growth_ds.train.deepspeed_engine``.

Reads of a partitioned parameter are collectives (every rank must call them in the same order); writes are
local: each rank stores only the slice it owns. No function here holds more than one full parameter.
DeepSpeed itself is imported lazily: the caller has built its engines, so it is loaded and configured.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from growth_ds.distributed import host_copy

MOMENTS = ("exp_avg", "exp_avg_sq")


def comm_device(group=None) -> torch.device:
    """Where tensors handed to collectives on ``group`` must live: host memory under gloo (or MPI), else the
    accelerator DeepSpeed runs on (NCCL moves device tensors only)."""
    if str(dist.get_backend(group)).lower() in ("gloo", "mpi"):
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrapper (its ``state`` holds the Adam moments and step)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _is_plain(p) -> bool:
    return not hasattr(p, "ds_id") and not hasattr(p, "_hp_mapping")


def get_full(engine, p, key: Optional[str] = None) -> torch.Tensor:
    """Full fp32 value (``key=None``) or Adam moment of parameter ``p`` (a collective under ZeRO)."""
    if _is_plain(p):
        if key is None:
            return p.detach().float().clone()
        st = base_optimizer(engine).state.get(p, {})
        return st[key].detach().float().clone() if key in st else torch.zeros_like(p, dtype=torch.float32)
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    return out.detach().float().reshape(tuple(p.ds_shape) if hasattr(p, "ds_shape") else p.shape).clone()


def set_full(engine, p, value: torch.Tensor, key: Optional[str] = None) -> None:
    """Store this rank's slice of a full fp32 value or moment of ``p`` (local; no communication)."""
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state,
                                 safe_set_local_fp32_param, safe_set_local_optimizer_state)

    value = value.to(torch.float32)
    if _is_plain(p):
        if key is None:
            with torch.no_grad():
                p.copy_(value.to(p.dtype))
        else:
            base_optimizer(engine).state[p][key].copy_(value)
        return
    if hasattr(p, "ds_id"):  # ZeRO-3: rank r owns flat elements [r*pn, (r+1)*pn), the last one padded
        pn = p.ds_tensor.ds_numel
        flat = value.reshape(-1)
        start = dist.get_rank() * pn
        local = torch.zeros(pn, dtype=torch.float32)
        n = max(0, min(pn, flat.numel() - start))
        local[:n] = flat[start:start + n]
        if key is None:
            safe_set_local_fp32_param(p, local)
        else:
            safe_set_local_optimizer_state(p, local, key)
        return
    if key is None:
        safe_set_full_fp32_param(p, value)
    else:
        safe_set_full_optimizer_state(p, value, key)


def set_step(engine, step: int) -> None:
    """Set the Adam step of every parameter group's state."""
    for st in base_optimizer(engine).state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def get_step(engine) -> int:
    """The Adam step (0 when the optimizer has not stepped or its groups disagree)."""
    steps = {int(st["step"]) for st in base_optimizer(engine).state.values() if "step" in st}
    return steps.pop() if len(steps) == 1 else 0


def refresh_low_precision(engine) -> None:
    """Copy fp32 masters into the weights the forward pass uses."""
    opt = engine.optimizer
    if hasattr(opt, "update_lp_params"):  # ZeRO-1/2 and the bf16 optimizer
        opt.update_lp_params()
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for sg in range(len(opt.fp16_partitioned_groups_flat)):
            host_copy.copy_(opt.fp16_partitioned_groups_flat[sg].data, opt.fp32_partitioned_groups_flat[sg].data)
            opt._unflatten_partitioned_parameters(sg)
        # gathered copies (persistent small params, or left by a forward) are stale: drop them, regather (only
        # the optimizer's parameters were rewritten)
        stale = [p for group in opt.fp16_groups for p in group if p.ds_status == ZeroParamStatus.AVAILABLE]
        if stale:
            stale[0].partition(stale)
        if getattr(opt, "persistent_parameters", None):
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)


def named_params(engine) -> Dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` of the engine's module."""
    return dict(engine.module.named_parameters())


def link_optimizer_state(engine) -> None:
    """ZeRO-1/2 and bf16 link each parameter's moment views lazily (and lose them on a checkpoint
    load); relink before reading or writing moments through the parameter."""
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


__all__ = ["MOMENTS", "base_optimizer", "comm_device", "get_full", "get_step", "link_optimizer_state", "named_params",
           "refresh_low_precision", "set_full", "set_step"]

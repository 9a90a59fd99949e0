"""DeepSpeed plumbing: engine construction, reading and writing one parameter's full fp32 value and
Adam moments in any ZeRO stage, refreshing low-precision weights, and releasing an engine.

Reads are collectives under ZeRO (every rank must call them in the same order); writes are local:
each rank stores only the slice it owns. No function here holds more than one full parameter.
"""
from __future__ import annotations

import gc
import os
from typing import Dict, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,  # noqa: E402
                             safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                             safe_set_local_optimizer_state)

from growth_ds.distributed import host_copy  # noqa: E402

MOMENTS = ("exp_avg", "exp_avg_sq")


def comm_device(group=None) -> torch.device:
    """Where tensors handed to collectives on ``group`` must live: host memory under gloo (or MPI), else the
    accelerator DeepSpeed runs on (NCCL moves device tensors only)."""
    if str(dist.get_backend(group)).lower() in ("gloo", "mpi"):
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def init_distributed() -> None:
    """Initialise torch.distributed (gloo on CPU) from launcher env; a single process works without one."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:
        # a bare `srun growth-ds train`: one task per rank
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in os.environ:
            raise ValueError("srun without a launcher: set MASTER_ADDR/MASTER_PORT (launch/slurm.sbatch does)")
    if "RANK" not in os.environ:  # plain `python -m growth_ds.cli train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def ds_config(train: dict, ds: dict, stage3_persist_threshold: Optional[int] = None) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": train["micro_batch_size"],
        "gradient_accumulation_steps": train["grad_accum"],
        "gradient_clipping": train["grad_clip"],
        "zero_optimization": {"stage": ds["zero_stage"]},
        "bf16": {"enabled": ds["precision"] == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if ds["zero_stage"] == 3 and stage3_persist_threshold is not None:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = stage3_persist_threshold
    for k, v in (ds.get("extra") or {}).items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def param_groups(model, weight_decay: float, hidden_lr_scale: Optional[float] = None):
    """Decay 2-D weights, not norms and biases (the grouping survives growth: it depends on rank only).

    ``hidden_lr_scale`` (μP for Adam): the hidden matrices (schema role ``weight``: attention and MLP
    projections, whose fan-in grows with the width) get their own group whose LR is the schedule's LR times
    this factor (``lr_scale``, applied by :func:`set_lr`); embeddings, the output layer, norms and biases
    keep the schedule's LR. None: two groups, decay and no decay."""
    def ndim(p):  # under zero.Init a parameter's data is empty: its real shape is ds_shape
        return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()

    named = list(model.named_parameters())
    no_decay = [p for _, p in named if ndim(p) < 2]
    if hidden_lr_scale is None:
        decay = [p for _, p in named if ndim(p) >= 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    from growth_ds.models.schema import parameter_schema

    schema = parameter_schema(model.shape)
    hidden = [p for n, p in named if ndim(p) >= 2 and schema[n].role == "weight"]
    other = [p for n, p in named if ndim(p) >= 2 and schema[n].role != "weight"]
    return [{"params": hidden, "weight_decay": weight_decay, "lr_scale": float(hidden_lr_scale)},
            {"params": other, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]


def build_engine(model, train: dict, config: dict, hidden_lr_scale: Optional[float] = None):
    """A DeepSpeed engine with AdamW over :func:`param_groups`."""
    opt = torch.optim.AdamW(param_groups(model, train["weight_decay"], hidden_lr_scale), lr=train["lr"],
                            betas=tuple(train["betas"]), eps=train["eps"])
    if config["zero_optimization"]["stage"] == 3:
        _register_external_params(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def construct_model(shape, zero_stage: int, config: dict):
    """An uninitialised Decoder of ``shape``; under ZeRO-3 built partitioned (``zero.Init``), so the grown
    model never exists in full on any rank."""
    from growth_ds.models import Decoder

    if zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=config):
            return Decoder(shape)
    return Decoder(shape)


def _register_external_params(model) -> None:
    """The tied output layer uses ``tok_emb.weight`` outside the embedding module's forward."""
    if getattr(model.shape, "tied_embeddings", False):
        deepspeed.zero.register_external_parameter(model, model.tok_emb.weight)


def base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def set_lr(engine, lr: float) -> None:
    """Every group's LR: ``lr`` times the group's ``lr_scale`` (1 if it has none)."""
    for g in base_optimizer(engine).param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _is_plain(p) -> bool:
    return not hasattr(p, "ds_id") and not hasattr(p, "_hp_mapping")


def get_full(engine, p, key: Optional[str] = None) -> torch.Tensor:
    """Full fp32 value (``key=None``) or Adam moment of parameter ``p`` (a collective under ZeRO)."""
    if _is_plain(p):
        if key is None:
            return p.detach().float().clone()
        st = base_optimizer(engine).state.get(p, {})
        return st[key].detach().float().clone() if key in st else torch.zeros_like(p, dtype=torch.float32)
    out = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    return out.detach().float().reshape(tuple(p.ds_shape) if hasattr(p, "ds_shape") else p.shape).clone()


def set_full(engine, p, value: torch.Tensor, key: Optional[str] = None) -> None:
    """Store this rank's slice of a full fp32 value or moment of ``p`` (local; no communication)."""
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


def materialise_optimizer_state(engine, batch) -> None:
    """Adam state is created lazily at the first step: take one step with zero gradients and LR 0.

    AdamW with lr 0 leaves the weights unchanged; the moments it creates are then overwritten.
    """
    set_lr(engine, 0.0)
    x, y = batch
    for _ in range(engine.gradient_accumulation_steps()):  # the optimizer steps only at the boundary
        loss = engine(x).float().sum() * 0.0
        engine.backward(loss)
        engine.step()
    link_optimizer_state(engine)


def link_optimizer_state(engine) -> None:
    """ZeRO-1/2 and bf16 link each parameter's moment views lazily (and lose them on a checkpoint
    load); relink before reading or writing moments through the parameter."""
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def set_step(engine, step: int) -> None:
    for st in base_optimizer(engine).state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def get_step(engine) -> int:
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
    return dict(engine.module.named_parameters())


def release_engine(engine) -> None:
    """Destroy an engine so it can be garbage collected (ZeRO-3 keeps two global references)."""
    stage3 = hasattr(engine.optimizer, "fp32_partitioned_groups_flat")
    engine.destroy()
    if stage3:
        _release_zero3_globals()
    gc.collect()


def _release_zero3_globals() -> None:
    """deepspeed 0.19.8 keeps a destroyed ZeRO-3 module alive through the forward-module stack and an
    lru_cache on the parameter coordinator (see shared/research/deepspeed.md section 4)."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    parameter_offload.FWD_MODULE_STACK.clear()
    fn = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for _ in range(8):  # unwrap decorators down to the lru_cache wrapper
        if fn is None or hasattr(fn, "cache_clear"):
            break
        inner = getattr(fn, "__wrapped__", None)
        if inner is None and getattr(fn, "__closure__", None):
            inner = next((c.cell_contents for c in fn.__closure__ if callable(c.cell_contents)), None)
        fn = inner
    if fn is not None and hasattr(fn, "cache_clear"):
        fn.cache_clear()

"""DeepSpeed engines for the trainer: the config, parameter groups, construction (ZeRO-3 under
``zero.Init``), the LR, materialising the Adam state and releasing an engine. Reading and writing the
training state of a built engine lives in :mod:`growth_ds.distributed.engine_state` (re-exported here).
"""
from __future__ import annotations

import gc
import os
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from growth_ds.distributed.engine_state import (MOMENTS, base_optimizer, comm_device, get_full,  # noqa: E402,F401
                                                get_step, link_optimizer_state, named_params,
                                                refresh_low_precision, set_full, set_step)


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


def set_lr(engine, lr: float) -> None:
    """Every group's LR: ``lr`` times the group's ``lr_scale`` (1 if it has none)."""
    for g in base_optimizer(engine).param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def to_engine(engine, *tensors: torch.Tensor):
    """``tensors`` on the device the engine computes on (the accelerator; a no-op on the CPU)."""
    dev = getattr(engine, "device", None)
    if dev is None or all(t.device == torch.device(dev) for t in tensors):
        return tensors
    return tuple(t.to(dev, non_blocking=True) for t in tensors)


def materialise_optimizer_state(engine, batch) -> None:
    """Adam state is created lazily at the first step: take one step with zero gradients and LR 0.

    AdamW with lr 0 leaves the weights unchanged; the moments it creates are then overwritten.
    """
    set_lr(engine, 0.0)
    x, y = to_engine(engine, *batch)
    for _ in range(engine.gradient_accumulation_steps()):  # the optimizer steps only at the boundary
        loss = engine(x).float().sum() * 0.0
        engine.backward(loss)
        engine.step()
    link_optimizer_state(engine)


def release_engine(engine) -> None:
    """Destroy an engine so it can be garbage collected (ZeRO-3 keeps two global references)."""
    stage3 = hasattr(engine.optimizer, "fp32_partitioned_groups_flat")
    engine.destroy()
    if stage3:
        _release_zero3_globals()
    gc.collect()


def _release_zero3_globals() -> None:
    """deepspeed (0.19.8) keeps a destroyed ZeRO-3 module alive through two class/module-level roots:
    the top module left on ``parameter_offload.FWD_MODULE_STACK`` after a forward, and a class-level
    ``functools.lru_cache`` (wrapped by ``instrument_w_nvtx``) on ``PartitionedParameterCoordinator.
    __params_to_release`` whose keys hold the coordinator and modules. Clearing both lets it be collected."""
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


__all__ = ["MOMENTS", "base_optimizer", "build_engine", "comm_device", "construct_model", "ds_config", "get_full",
           "get_step", "init_distributed", "link_optimizer_state", "materialise_optimizer_state", "named_params",
           "param_groups", "refresh_low_precision", "release_engine", "set_full", "set_lr", "set_step", "to_engine"]

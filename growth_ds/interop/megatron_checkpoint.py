"""Grow a megatron-core dist checkpoint on disk: a growth-ds one or a Megatron-LM (NeMo, Megatron-Bridge) run's.

:func:`grow_dist_checkpoint` reads the old shape from the checkpoint, refuses what cannot be grown before
anything is written, grows the weights and the optimizer state it finds (streamed one parameter at a time by
default: :mod:`growth_ds.interop.megatron_stream`; or each process's TP shard in memory:
:func:`growth_ds.interop.megatron.grow_gpt_model`), carries a Megatron-LM run's state
(:mod:`growth_ds.interop.megatron_lm`) and Transformer Engine's extra state
(:mod:`growth_ds.interop.extra_state`), and writes the result atomically.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from growth_ds import atomic
from growth_ds.interop.megatron import (COMMON_KEY, GrownGPT, _adam_step, _model_dtype, build_gpt_model,
                                        ensure_model_parallel, grow_gpt_model, is_dist_checkpoint,
                                        load_dist_checkpoint, load_fp32_masters, master_key_of,
                                        save_dist_checkpoint)
from growth_ds.ops.plan import make_plan
from growth_ds.shapes import ModelShape


def _source(src_dir, iteration: Optional[int]):
    """``(checkpoint dir, Megatron-LM iteration or None, common dict)`` of a dist checkpoint directory or of a
    Megatron-LM root / ``iter_*`` folder (:mod:`growth_ds.interop.megatron_lm`); refuses, before anything is
    loaded, what cannot be grown."""
    from megatron.core import dist_checkpointing

    from growth_ds.interop import megatron_lm as mlm

    src = Path(src_dir)
    lm = mlm.is_run_root(src) or mlm.ITER_RE.match(src.name) is not None
    if lm:
        ckpt, it = mlm.resolve_iteration(src, iteration)
    else:
        if iteration is not None:
            raise ValueError(f"--iteration applies to a Megatron-LM checkpoint root; {src} is one checkpoint")
        if not is_dist_checkpoint(src):
            raise FileNotFoundError(f"{src} is not a megatron dist checkpoint (no metadata.json) nor a Megatron-LM "
                                    f"checkpoint root (no {mlm.TRACKER}, no iter_* folder)")
        ckpt, it = src, None
    mlm.check_shards(ckpt)
    mlm.check_optimizer_format(ckpt)
    return ckpt, it, dict(dist_checkpointing.load_common_state_dict(str(ckpt)))


def _source_shape(ckpt, common: dict, meta: dict, small: Optional[ModelShape]) -> ModelShape:
    """The old shape: ``small``, else growth-ds's entry, else the saved Megatron-LM ``args`` with the embedding's
    global rows (the padded vocabulary) from the tensor metadata ``meta``."""
    from growth_ds.interop.megatron_lm import shape_from_args

    if small is not None:
        return small
    if (common.get(COMMON_KEY) or {}).get("shape"):
        return ModelShape.from_dict(common[COMMON_KEY]["shape"])
    if "args" in common:
        emb = meta.get("embedding.word_embeddings.weight")
        if emb is None:
            raise ValueError(f"{ckpt}: no embedding.word_embeddings.weight in the checkpoint (a pipeline stage "
                             f"without the embedding, or not a GPT model)")
        return shape_from_args(common["args"], emb.global_shape[0])
    raise ValueError(f"{ckpt} records neither a growth-ds shape nor Megatron-LM args; pass the old ModelShape "
                     f"(--shape)")


def grow_dist_checkpoint(src_dir, large: ModelShape, out_dir, *, width: Optional[str] = None,
                         depth: Optional[str] = None, seed: int = 0, moments: Optional[str] = None,
                         lr: Optional[str] = None, tp: Optional[int] = None, small: Optional[ModelShape] = None,
                         overwrite: bool = False, iteration: Optional[int] = None,
                         no_optim: bool = False, target_tp: Optional[int] = None,
                         target_pp: Optional[int] = None, stream: Optional[bool] = None,
                         plan_options: Optional[dict] = None) -> GrownGPT:
    """Grow a megatron-core dist checkpoint: load at the old shape, grow in memory, save at the new shape.

    ``src_dir``: a dist checkpoint directory, or a Megatron-LM checkpoint root (``iteration``, default the
    tracker's) or one ``iter_*`` folder; a Megatron-LM source is written back in its layout
    (``out_dir/iter_*`` and the tracker) with its ``args`` grown and its ``iteration``, LR scheduler state and
    FLOPs counter carried over. Collective over all ranks (launch with ``torchrun --nproc_per_node N`` for
    ``tp = N``; a plain process runs at TP=1). ``small`` gives the old shape when the checkpoint records none.
    The checkpoint's TP size does not matter (dist checkpoints reshard on load). ``no_optim``: weights only (the
    grown checkpoint has no optimizer state). ``target_tp`` / ``target_pp``: the next job's layout (any; the
    checkpoint is layout-free): the grown sizes are checked against it and it is written into ``args``.
    ``plan_options``: :func:`growth_ds.ops.make_plan`'s other keyword arguments (``recipe``, ``random_std``,
    ``random_relative``, ...).
    Refused before anything is written: a grown shape the target layout cannot split, a missing iteration, a
    per-bucket distributed-optimizer checkpoint, shapes that do not grow, an existing output without
    ``overwrite``. A Transformer Engine run's ``_extra_state`` objects are carried: grown layer ``i`` gets those
    of the layer it was built from (:mod:`growth_ds.interop.extra_state`). A Megatron-LM run's optimizer keeps
    its format: masters under its own name, its param groups, Adam's step and the content metadata. Atomic: the
    checkpoint is written next to its final name and renamed into place when complete, so a crash leaves
    ``out_dir`` as it was (and ``overwrite`` replaces it whole).

    ``stream`` (default: unless this process already runs model parallelism at TP > 1): grow one parameter at
    a time (:mod:`growth_ds.interop.megatron_stream`): each saved tensor is computed from the old blocks it
    needs while it is written, so a process holds one old and one grown parameter, never a model; the work is
    spread over the launched processes (any number), and ``tp`` (default 1: the plan as made) only names the
    TP size whose block-diagonal plan is applied. The checkpoint equals the in-memory executor's at that TP
    size bit for bit. In memory (``stream=False``), each process loads its TP shard of the small model and
    grows it at TP = ``tp`` (default: the number of processes); the returned :class:`GrownGPT` then holds the
    grown model (streamed: a model on the ``meta`` device).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not an empty directory; pass overwrite=True (--force) to "
                              f"replace it")
    ckpt, it, common = _source(src_dir, iteration)
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))  # (read once: shapes, moments, masters, dtype)
    ours = common.get(COMMON_KEY) or {}
    small = _source_shape(ckpt, common, meta, small)
    plan = make_plan(small, large, width=width, depth=depth, seed=seed, moments=moments, lr=lr,
                     **(plan_options or {}))  # (bad shapes: now)
    from growth_ds.interop.megatron_lm import check_target_layout

    check_target_layout(plan.grown_shape, target_tp, target_pp)
    if it is not None:  # (before anything is loaded: the LR policy must be one the run's scheduler can express)
        from growth_ds.interop.megatron_lm import scheduler_after_growth

        scheduler = scheduler_after_growth(common.get("opt_param_scheduler"), plan.lr.kind)
    if stream is None:
        from megatron.core import parallel_state as ps

        stream = not (ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    plan_tp = tp or (1 if stream else world)
    tp = ensure_model_parallel(1 if stream else tp)
    from growth_ds.interop import extra_state

    from growth_ds.interop.megatron_lm import is_rng_key

    # the objects that travel, read in one pass: a Transformer Engine run's per-module _extra_state (placed on
    # the grown layer stack, payloads untouched) and a Megatron-LM run's RNG states
    stored = extra_state.read_objects(ckpt, lambda k: k.endswith(extra_state.SUFFIX) or
                                      (it is not None and is_rng_key(k)))
    te_states = extra_state.regrid({k: v for k, v in stored.items() if k[0].endswith(extra_state.SUFFIX)},
                                   [e.source for e in plan.layers], small.n_layers)
    with_optim = not no_optim and (bool(ours.get("param_groups")) or
                                   any(k.startswith("optimizer.state.exp_avg.") for k in meta))
    stored_masters = master_key_of(meta)  # a bf16 run: grow the float32 masters, not the rounded weights
    masters = stored_masters is not None
    master_key = stored_masters if with_optim else None
    writer = None
    if stream:
        from growth_ds.interop import megatron_stream

        grown, writer = megatron_stream.meta_growth(ckpt, plan, plan_tp, ours, common, with_optim,
                                                    stored_masters or megatron_stream.MODEL)
    else:
        model = build_gpt_model(small, tp=tp, perform_initialization=False)
        optimizer, step = None, None
        if with_optim and ours.get("param_groups"):
            named = dict(model.named_parameters())
            cls = getattr(torch.optim, ours.get("optimizer_class", "AdamW"))
            optimizer = cls([{"params": [named[n] for n in names]} for names in ours["param_groups"]])
        elif with_optim:  # a Megatron-LM run's per-parameter Adam state
            optimizer = torch.optim.AdamW(model.parameters())
            step = _adam_step(common)
        load_dist_checkpoint(model, optimizer, ckpt, step=step)
        load_fp32_masters(model, ckpt, meta)
        grown = grow_gpt_model(model, optimizer, plan)
        del model, optimizer
    extra = {"grown_from": small.to_dict(), "plan": plan.describe(), "tp_plan": grown.tp_plan.describe(),
             "lr_policy": grown.plan.lr.kind}
    run_state, objects = None, dict(te_states)
    if it is not None:
        from growth_ds.interop.megatron_lm import RUN_STATE_KEYS, grown_args, rng_after_growth

        run_state = {k: common[k] for k in RUN_STATE_KEYS if k in common}
        if scheduler is not None:
            run_state["opt_param_scheduler"] = scheduler
        if "args" in run_state:
            run_state["args"] = grown_args(run_state["args"], grown.shape, tp=target_tp, pp=target_pp)
            # the run's RNG states: carried, or (the layout changed) dropped and args say so
            rng, run_state["args"] = rng_after_growth({k: v for k, v in stored.items() if is_rng_key(k[0])},
                                                      common["args"], run_state["args"])
            objects.update(rng)
    # the whole output (a dist checkpoint, or a Megatron-LM root: iter_* + tracker) is built under a staging name
    # next to out_dir and renamed into place when complete
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    staging = out.parent / f".{out.name}.partial"  # (one name on every rank)
    ckpt_out = staging if it is None else staging / iteration_name(it)
    if rank0:
        if staging.exists():  # left by a crashed run
            shutil.rmtree(staging)
        ckpt_out.parent.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    # a Megatron-LM optimizer's own entries (param groups with wd_mult/lr_mult, sharding type) travel as they were
    carried = common.get("optimizer") if it is not None and not ours and isinstance(common.get("optimizer"), dict) \
        else None
    save_dist_checkpoint(grown.model, grown.optimizer, ckpt_out, extra=extra, run_state=run_state,  # (every rank)
                         model_dtype=_model_dtype(meta) if masters and grown.optimizer is not None else None,
                         objects=extra_state.sharded_objects(objects, write=rank0), master_key=master_key,
                         optimizer_common=carried if grown.optimizer is not None else None,
                         content_metadata=dist_checkpointing.load_content_metadata(preloaded_state_dict=common),
                         writer=writer)
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        if it is not None:
            from growth_ds.interop.megatron_lm import write_tracker

            write_tracker(staging, it)
        atomic.replace_dir(out, staging)
    if dist.is_initialized():
        dist.barrier()
    return grown


def iteration_name(it) -> str:
    return "release" if it == "release" else f"iter_{int(it):07d}"


__all__ = ["grow_dist_checkpoint", "iteration_name"]

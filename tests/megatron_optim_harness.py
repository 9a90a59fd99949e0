"""Test harness: megatron-core 0.16.1's REAL DDP + optimizers (DistributedOptimizer, and the
non-distributed Float16/FP32 optimizers) for a tiny local-spec GPTModel on a CPU-only machine,
with Megatron-LM-shaped torch_dist checkpoints written and read by megatron-core's own code.

    build(shape_or_kwargs, distributed=..., bf16=...) -> (ddp_model, optimizer, config)
    train_steps(ddp_model, optimizer, n) -> [loss, ...]
    save(ddp_model, optimizer, ckpt_dir, iteration)
    load(ddp_model, optimizer, ckpt_dir) -> loaded common state dict (plus model/optimizer sub-dicts)

World size 1 (gloo), TP=1, PP=1, DP=1. growth_ds's ``apply_cpu_patches`` covers the model forward/backward and
the checkpoint writer; the shims below are what megatron-core's DDP and optimizers need besides, and they live
here, in the tests, never in the library. The save/load paths follow Megatron-LM's ``checkpointing.py``
(``generate_state_dict``, ``save_checkpoint``, ``load_checkpoint``, tag core_v0.16.1) for ``--ckpt-format
torch_dist``.

CPU shims used here (TEST-ONLY). Shims A and B are confined to :func:`cpu_cuda_shim`, entered only
around calls into megatron's DDP / optimizer / checkpoint code and undone on exit; ``torch`` itself is
never modified. The sites listed are the ones hit by the tests' cases (counted by
instrumenting the shim; megatron-core 0.16.1 line numbers):

A. ``_CudaToCpuMode`` (a ``torch.overrides.TorchFunctionMode``):
   * a ``device='cuda'`` (or cuda ``torch.device`` / bare int) keyword of any torch function becomes
     ``'cpu'``: optimizer/optimizer.py:481,485 (MixedPrecisionOptimizer _dummy_overflow_buf,
     _scale_one; bf16), :907 (FP32Optimizer._scale), optimizer/clip_grads.py:103,174 (clip scratch),
     utils.py:1207 (local_multi_tensor_l2_norm result, used for the grad norm without Apex/TE).
     Would also cover, unexercised here: optimizer.py:473 + grad_scaler.py:15-94 (fp16),
     clip_grads.py:90,115,207.
   * ``Tensor.cuda()`` returns the tensor itself: distrib_optimizer.py:1089 (dp_reshardable save).
   * the no-argument ``Tensor.type()`` of a CPU tensor reads ``'torch.cuda.<X>Tensor'`` (the
     "spoof Tensor.type()" last resort; there is no other hook for these string compares):
     optimizer/optimizer.py:671 (Float16OptimizerWithFloat16Params param classification),
     optimizer/distrib_optimizer.py:361,420,582 (DistributedOptimizer param classification),
     optimizer/clip_grads.py:167 (``assert param.grad.type() == 'torch.cuda.FloatTensor'``, clip_grad>0).
B. ``_CpuCurrentDeviceTorch``: while the shim is active the module-global name ``torch`` of megatron's
   ``distributed/param_and_grad_buffer.py`` and ``optimizer/distrib_optimizer.py`` is a proxy module
   that is ``torch`` except ``torch.cuda.current_device()`` -> ``torch.device('cpu')`` (the real one
   raises on CPU-only torch before any device= rewrite could see it): param_and_grad_buffer.py:800,806
   (DDP param/grad buffers -- the known DDP failure), distrib_optimizer.py:1077 (dp_reshardable save).
   (Same technique as growth_ds.interop.megatron_cpu._patch_checkpoint_save.)

Workarounds for megatron-core bugs on the torch-AdamW fallback path (no Apex / Transformer Engine),
applied only inside :func:`load` (see each function's docstring):

C. :func:`_prime_fresh_distopt_state` -- distrib_optimizer.py:641-642 ``assert len(steps) == 1`` fails
   for a DistributedOptimizer that has never stepped (sharded_state_dict calls state_dict() even when
   is_loading=True, :1246), so a fresh one cannot be loaded into.
D. :func:`_distopt_step_passthrough` -- distrib_optimizer.py:936-940 copies ``step`` from a source that
   lacks it (fully_reshardable: KeyError) or holds the loader's own non-persistent step
   (dp_reshardable: step silently reset).
E. :func:`_unshare_distopt_steps` -- distrib_optimizer.py:817-825 gives all params ONE shared ``step``
   tensor, which torch AdamW then increments once per param per step.
F. ``torch.no_grad()`` around ``optimizer.load_state_dict`` for 'dp_reshardable' only --
   distrib_optimizer.py:1772 ``load_parameter_state_from_dp_reshardable`` lacks the @torch.no_grad()
   its siblings (:1806, :2069) have; fp32 models fail with an in-place-on-leaf-view error.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# CPU shim (test-only)
# ---------------------------------------------------------------------------------------------------
def _is_cuda_device(dev) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return isinstance(dev, int) and not isinstance(dev, bool)  # bare ordinal == cuda:<n>


class _CudaToCpuMode(TorchFunctionMode):
    """See module docstring, shim A."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:  # .cuda() -> no-op (distrib_optimizer.py:1089)
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # param.type() checks
            name = func(*args, **kwargs)
            if isinstance(name, str) and name.startswith("torch.") and not name.startswith("torch.cuda."):
                name = "torch.cuda." + name[len("torch."):]
            return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):  # device='cuda' factories
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


class _CpuCuda(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")


class _CpuCurrentDeviceTorch(types.ModuleType):
    """See module docstring, shim B: ``torch`` except ``torch.cuda.current_device()`` is the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def _current_device_modules():
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import distrib_optimizer

    return [param_and_grad_buffer, distrib_optimizer]


@contextlib.contextmanager
def cpu_cuda_shim():
    """Shims A and B for the duration of the block; no-op when CUDA is available."""
    if torch.cuda.is_available():
        yield
        return
    mods = _current_device_modules()
    saved = [m.torch for m in mods]
    proxy = _CpuCurrentDeviceTorch()
    for m in mods:
        m.torch = proxy
    try:
        with _CudaToCpuMode():
            yield
    finally:
        for m, t in zip(mods, saved):
            m.torch = t


# ---------------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------------
def ensure_initialized(seed: int = 1234):
    """torch.distributed (1-process gloo) + parallel_state TP=1 PP=1 + growth_ds's CPU model patches."""
    from growth_ds.interop.megatron import ensure_model_parallel

    ensure_model_parallel(tp=1, seed=seed)


def as_shape(shape=None, **shape_kwargs):
    from growth_ds.shapes import ModelShape

    if shape is None:
        return ModelShape(**shape_kwargs)
    if isinstance(shape, dict):
        return ModelShape(**{**shape, **shape_kwargs})
    if shape_kwargs:
        import dataclasses

        return dataclasses.replace(shape, **shape_kwargs)
    return shape


def build(shape=None, *, distributed: bool, bf16: bool = False, lr: float = 1e-2, clip_grad: float = 1.0,
          seed: int = 1234, weight_decay: float = 0.01, **shape_kwargs):
    """(megatron DDP-wrapped GPTModel, megatron optimizer, TransformerConfig) at world size 1.

    ``shape``: a growth_ds ``ModelShape`` or a dict of its fields; or pass the fields as keywords.
    As in Megatron-LM's ``get_model``: bf16 wraps the GPTModel in ``Float16Module`` before DDP.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from growth_ds.interop import megatron as gm

    ensure_initialized(seed)
    shape = as_shape(shape, **shape_kwargs)
    from growth_ds.interop.megatron_cpu import model_parallel_cpu_manual_seed

    model_parallel_cpu_manual_seed(seed)  # same init for every build with the same seed
    config = gm.transformer_config(shape, tp=1, bf16=bf16, params_dtype=torch.float32)
    model = gm.build_gpt_model(shape, config=config)
    if bf16:
        model = Float16Module(config, model)  # Megatron-LM get_model: casts the module to bf16
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
        use_distributed_optimizer=distributed, check_for_nan_in_grad=False, bucket_size=None)
    opt_config = OptimizerConfig(optimizer="adam", lr=lr, min_lr=lr, weight_decay=weight_decay, adam_beta1=0.9,
                                 adam_beta2=0.95, adam_eps=1e-8, clip_grad=clip_grad, bf16=bf16, fp16=False,
                                 params_dtype=torch.float32, use_distributed_optimizer=distributed)
    with cpu_cuda_shim():
        ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        optimizer = get_megatron_optimizer(opt_config, [ddp])
    # No OptimizerParamScheduler: every param group keeps lr = OptimizerConfig.lr (the torch optimizer's
    # default); Megatron-LM's scheduler would rewrite param_group['lr'] from max_lr/min_lr each step.
    ddp.harness_shape = shape
    return ddp, optimizer, config


def _batch(shape, step: int, batch: int = 2, seq: Optional[int] = None):
    seq = seq or min(16, shape.max_seq_len)
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, shape.vocab_size, (batch, seq + 1), generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()
    return x, pos, y


def train_steps(model, optimizer, n: int, *, fixed_batch: bool = True) -> List[float]:
    """n megatron training iterations (Megatron-LM train_step order):
    zero_grad_buffer + optimizer.zero_grad, forward, scaled backward, finish_grad_sync
    (finalize_model_grads), optimizer.step (clip + Adam + DistOpt param gather)."""
    shape = model.harness_shape
    losses = []
    for i in range(n):
        model.zero_grad_buffer()
        with cpu_cuda_shim():
            optimizer.zero_grad()
        x, pos, y = _batch(shape, 0 if fixed_batch else i)
        per_token = model(x, pos, None, labels=y)  # [b, s] per-token losses
        loss = per_token.float().mean()
        with cpu_cuda_shim():
            scaled = optimizer.scale_loss(loss)  # config.grad_scale_func in Megatron-LM
        scaled.backward()
        with cpu_cuda_shim():
            model.finish_grad_sync()
            ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step skipped (inf/nan)"
        losses.append(float(loss.detach()))
    return losses


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------
def megatron_lm_args(shape, tp: int = 1, pp: int = 1, **extra) -> argparse.Namespace:
    """Megatron-LM's argument names for the architecture (``pp_worker.megatron_lm_args``) plus ``extra``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pp_worker

    return pp_worker.megatron_lm_args(shape, tp, pp, **extra)


def unwrap_model(model):
    """Megatron-LM training/utils.py unwrap_model: strip DDP and Float16Module."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(model, (DistributedDataParallel, Float16Module)):
        model = model.module
    return model


def sharded_sd_metadata(optimizer, sharding_type: str = "fully_reshardable") -> Dict[str, Any]:
    """Megatron-LM checkpointing.py _build_sharded_state_dict_metadata (core_v0.16.1) for
    --ckpt-format torch_dist: distrib_optim_sharding_type only with a DistributedOptimizer
    ('fully_reshardable' = --dist-ckpt-optim-fully-reshardable; Megatron-LM's default is
    'dp_reshardable'), plus singleton_local_shards=False, chained_optim_avoid_prefix=True, dp_cp_group."""
    from megatron.core import parallel_state as ps

    md: Dict[str, Any] = {}
    if _uses_distributed_optimizer(optimizer):
        md["distrib_optim_sharding_type"] = sharding_type
        if sharding_type == "fully_reshardable":
            md["distrib_optim_fully_reshardable_mem_efficient"] = False
    md["singleton_local_shards"] = False
    md["chained_optim_avoid_prefix"] = True
    md["dp_cp_group"] = ps.get_data_parallel_group(with_context_parallel=True)
    return md


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in subs)


def generate_state_dict(args, model, optimizer, iteration, metadata, is_loading=False):
    """Megatron-LM checkpointing.py generate_state_dict (core_v0.16.1), torch_dist branch, one model chunk,
    no opt_param_scheduler / rng_state / rerun state (the harness has none)."""
    state_dict = {"args": args, "checkpoint_version": 3.0}
    if iteration is not None:
        state_dict["iteration"] = iteration
    state_dict["model"] = unwrap_model(model).sharded_state_dict(metadata=metadata)
    if optimizer is not None:
        kw = dict(metadata=metadata)
        if is_loading:
            kw["is_loading"] = True
        with cpu_cuda_shim():
            state_dict["optimizer"] = optimizer.sharded_state_dict(state_dict, **kw)
    return state_dict


def save(model, optimizer, ckpt_dir, iteration: int, *, sharding_type: str = "fully_reshardable",
         num_floating_point_operations_so_far: float = 0.0):
    """What Megatron-LM save_checkpoint writes for --ckpt-format torch_dist into ``ckpt_dir`` (one
    ``iter_XXXXXXX`` folder; the caller names it)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization

    md = sharded_sd_metadata(optimizer, sharding_type)
    args = megatron_lm_args(model.harness_shape, use_distributed_optimizer=_uses_distributed_optimizer(optimizer),
                            ckpt_format="torch_dist", bf16=bool(model.config.bf16), fp16=False,
                            no_save_optim=False, no_save_rng=True)
    state_dict = generate_state_dict(args, model, optimizer, iteration, md)
    state_dict["num_floating_point_operations_so_far"] = num_floating_point_operations_so_far
    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    strategy = get_default_save_sharded_strategy("torch_dist")
    with cpu_cuda_shim():
        dist_checkpointing.save(state_dict, ckpt_dir, strategy, validate_access_integrity=True,
                                content_metadata=_clean_metadata_for_serialization(md))
    dist.barrier()


def _prime_fresh_distopt_state(optimizer):
    """Workaround (test-only) for optimizer/distrib_optimizer.py:640-642: without Apex/TE the inner
    optimizer is torch's AdamW, and ``DistributedOptimizer.state_dict()`` (called first thing by
    ``sharded_state_dict``, distrib_optimizer.py:1246, also when ``is_loading=True``) reads ``step``
    from the per-param state and asserts ``len(steps) == 1`` -- an optimizer that has never stepped has
    no state, so megatron cannot load into a freshly built DistributedOptimizer on this path (with TE /
    Apex FusedAdam the step comes from param_groups instead). Give such an optimizer megatron's own
    ``init_state_fn`` state (zero exp_avg / exp_avg_sq) plus ``step = 0``; the load overwrites all of it
    (distrib_optimizer.py:817-823 sets ``step`` from the checkpoint's param_groups)."""
    for sub in _torch_adam_distopts(optimizer):
        inner = sub.optimizer
        if len(inner.state) == 0 and sub.init_state_fn is not None:
            sub.init_state_fn(inner, sub.config)
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p].setdefault("step", torch.tensor(0.0))


def _torch_adam_distopts(optimizer):
    """The DistributedOptimizers in ``optimizer`` whose inner optimizer is torch's (no TE / Apex)."""
    from megatron.core.optimizer import DistributedOptimizer
    from megatron.core.optimizer import distrib_optimizer as do

    if getattr(do, "HAVE_APEX_OR_TE", False):
        return []
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


@contextlib.contextmanager
def _distopt_step_passthrough(optimizer):
    """Workaround (test-only) for optimizer/distrib_optimizer.py:936-940 on the torch-AdamW path:
    ``DistributedOptimizer.load_state_dict`` first puts ``step`` into every inner state (:817-825), then
    ``load_parameter_state_from_fully_reshardable`` builds ``src_tensors`` WITHOUT ``step`` (:2101-2103
    skip it) and ``_set_main_param_and_optimizer_states`` copies every key of the destination state,
    ``step`` included -> ``KeyError: 'step'``. With 'dp_reshardable' the source does carry a ``step``,
    but it is a ``LocalNonpersistentObject`` (:1664-1667), i.e. the LOADING optimizer's own step (0 for a
    fresh one), which then overwrites the checkpoint's step set from param_groups -> resumed Adam bias
    correction restarts. For the duration of the load, an instance attribute wraps that method so the
    ``step`` it copies is always the destination's own (= the checkpoint's param_groups step; a no-op
    copy); removed afterwards."""
    patched = []
    for sub in _torch_adam_distopts(optimizer):
        original = sub._set_main_param_and_optimizer_states

        def wrapper(model_param, tensors, _sub=sub, _orig=original):
            gi, go = _sub.model_param_group_index_map[model_param]
            st = _sub.optimizer.state[_sub.optimizer.param_groups[gi]["params"][go]]
            if "step" in st:  # the checkpoint's step, just set from param_groups (:817-825)
                tensors = {**tensors, "step": st["step"]}
            return _orig(model_param, tensors)

        sub._set_main_param_and_optimizer_states = wrapper
        patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub._set_main_param_and_optimizer_states
    _unshare_distopt_steps(optimizer)


def _unshare_distopt_steps(optimizer):
    """Workaround (test-only) for optimizer/distrib_optimizer.py:817-825 on the torch-AdamW path:
    ``load_state_dict`` gives every inner state the SAME ``step`` tensor object (``s["step"] = step``)
    and torch's ``Optimizer.load_state_dict`` keeps ``step`` uncopied, so torch AdamW's in-place
    ``step_t += 1`` then advances the shared step once per parameter per iteration (resumed bias
    correction wrong: after 2 more steps on 15 params the step reads 3 + 2*15 = 33, not 5).
    Give each state its own copy."""
    for sub in _torch_adam_distopts(optimizer):
        for st in sub.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def load(model, optimizer, ckpt_dir, *, strict_model: bool = True):
    """What Megatron-LM load_checkpoint (core_v0.16.1) does for a torch_dist checkpoint: read the common
    dict and its content metadata (``load_content_metadata``), build the sharded state dict with
    generate_state_dict (model with that metadata; optimizer with ``is_loading=True`` and the same
    metadata; no iteration), ``dist_checkpointing.load`` with the default load strategy,
    ``model.load_state_dict(sd['model'])`` (DDP forwards to the GPTModel), ``optimizer.load_state_dict(
    sd['optimizer'])``. ``ckpt_dir``: an ``iter_*`` folder, or a run root with
    ``latest_checkpointed_iteration.txt``. Returns the loaded state dict: the checkpoint's common
    entries (args, checkpoint_version, iteration, content_metadata, ...) plus the loaded 'model' /
    'optimizer' sub-dicts."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy

    tracker = os.path.join(ckpt_dir, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        with open(tracker) as f:
            ckpt_dir = iteration_dir(ckpt_dir, int(f.read().strip()))
    _prime_fresh_distopt_state(optimizer)
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    md = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    md["dp_cp_group"] = ps.get_data_parallel_group(with_context_parallel=True)
    sharded = generate_state_dict(common["args"], model, optimizer, None, md, is_loading=True)
    strategy = get_default_load_sharded_strategy(ckpt_dir)
    with cpu_cuda_shim():
        state_dict = dist_checkpointing.load(sharded, ckpt_dir, strategy)
        model.load_state_dict(state_dict["model"], strict=strict_model)
        # Workaround (test-only) for optimizer/distrib_optimizer.py:1772: unlike its siblings
        # load_parameter_state_from_fully_reshardable (:2069) and ..._from_fs_model_space (:1806),
        # load_parameter_state_from_dp_reshardable lacks @torch.no_grad(), so its copy_ into the fp32
        # main-param shard (a view of the requires-grad model param for fp32 models) raises "a view of a
        # leaf Variable that requires grad is being used in an in-place operation". Only for that type.
        no_grad = _uses_distributed_optimizer(optimizer) and md.get("distrib_optim_sharding_type") == "dp_reshardable"
        with _distopt_step_passthrough(optimizer), (torch.no_grad() if no_grad else contextlib.nullcontext()):
            optimizer.load_state_dict(state_dict["optimizer"])
    return state_dict


def iteration_dir(run_root, iteration: int) -> str:
    """Megatron-LM's checkpoint folder name for a torch_dist iteration: ``<root>/iter_0000003``."""
    return os.path.join(run_root, f"iter_{iteration:07d}")


def write_tracker(run_root, iteration: int) -> None:
    """Megatron-LM's ``latest_checkpointed_iteration.txt`` in the run root."""
    with open(os.path.join(run_root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


# ---------------------------------------------------------------------------------------------------
# inspection helpers (used by the tests)
# ---------------------------------------------------------------------------------------------------
def optimizer_state_snapshot(model, optimizer) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{model param name: {"main_param", "exp_avg", "exp_avg_sq", "step"}}`` cloned from the inner torch
    optimizer(s): the fp32 main param is the DistributedOptimizer's fp32 shard (whole param at DP=1),
    Float16Optimizer's fp32 copy, or FP32Optimizer's model param itself."""
    from megatron.core.optimizer import DistributedOptimizer

    names = {p: n for n, p in unwrap_model(model).named_parameters()}
    out = {}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        main_to_model = {}
        if isinstance(sub, DistributedOptimizer):
            for mp, (gi, go) in sub.model_param_group_index_map.items():
                main_to_model[id(inner.param_groups[gi]["params"][go])] = mp
        elif hasattr(sub, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
            for g16, g32 in zip(sub.float16_groups, sub.fp32_from_float16_groups):
                for mp, main in zip(g16, g32):
                    main_to_model[id(main)] = mp
        for group in inner.param_groups:
            for main in group["params"]:
                mp = main_to_model.get(id(main), main)
                st = inner.state.get(main, {})
                rec = {"main_param": main.detach().clone()}
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    if k in st:
                        rec[k] = st[k].detach().clone()
                out[names.get(mp, f"<unnamed {tuple(mp.shape)}>")] = rec
    return out

"""The run layout Megatron-LM (and NeMo / Megatron-Bridge on megatron-core) writes, read and written as is.

    ROOT/latest_checkpointed_iteration.txt      the last complete iteration ("100", or "release")
    ROOT/iter_0000100/                           a torch_dist (megatron-core dist_checkpointing) checkpoint:
        metadata.json, common.pt, *.distcp       common: args (argparse.Namespace), iteration,
                                                 checkpoint_version, opt_param_scheduler,
                                                 num_floating_point_operations_so_far, ...;
                                                 sharded: model (layers on one global layer axis),
                                                 optimizer.state.{exp_avg,exp_avg_sq}.<model key>, float32
                                                 masters as optimizer.state.param.<key> (distributed
                                                 optimizer, fully_reshardable) or .fp32_param.<key>
                                                 (mixed-precision optimizer); objects: Transformer Engine
                                                 modules' _extra_state, rng_state (PP x TP shards)

The shape of the model comes from the checkpoint's own metadata: the saved ``args`` (Megatron-LM's argument
names) for the architecture and the embedding tensor's global shape (``load_tensors_metadata``) for the padded
vocabulary. Optimizer formats: the per-parameter (model-space) formats load; the distributed optimizer's
per-bucket ``dp_reshardable`` format, Megatron-LM's default, can only be resharded along data parallelism and
is refused before anything is read or written, with the option that writes a reshardable one. The optimizer's
common entries (param groups with ``wd_mult`` / ``lr_mult`` and Adam's ``step``, ``param_state_sharding_type``,
``common_step``) and the content metadata are what Megatron-LM's loader reads to rebuild its optimizer; a grown
checkpoint carries them (:func:`growth_ds.interop.megatron_checkpoint.grow_dist_checkpoint`).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Optional, Tuple

from growth_ds import atomic
from growth_ds.shapes import ModelShape

TRACKER = "latest_checkpointed_iteration.txt"
ITER_RE = re.compile(r"^iter_(\d{7})$")
#: common-state entries of a Megatron-LM checkpoint that describe the run and travel to the grown checkpoint
RUN_STATE_KEYS = ("args", "iteration", "checkpoint_version", "opt_param_scheduler",
                  "num_floating_point_operations_so_far")
RESHARDABLE_HINT = ("re-save it with `--dist-ckpt-optim-fully-reshardable` (Megatron-LM) so the optimizer state is "
                    "stored per parameter, or grow the weights only (--no-optim)")


def iteration_dir(root: Path, iteration) -> Path:
    return Path(root) / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def is_run_root(path) -> bool:
    """True for a Megatron-LM checkpoint root (it has the tracker file or ``iter_*`` folders)."""
    p = Path(path)
    return p.is_dir() and ((p / TRACKER).is_file() or any(ITER_RE.match(c.name) for c in p.iterdir() if c.is_dir()))


def resolve_iteration(path, iteration: Optional[int] = None) -> Tuple[Path, Any]:
    """``(checkpoint directory, iteration)`` of a Megatron-LM root (``iteration``, else the tracker's) or of one
    ``iter_*`` folder. ``FileNotFoundError`` naming what is missing and what is there."""
    p = Path(path)
    m = ITER_RE.match(p.name)
    if m and not is_run_root(p):  # one iter_* folder
        if iteration is not None and int(m.group(1)) != int(iteration):
            raise ValueError(f"{p} is iteration {int(m.group(1))}, not --iteration {iteration}")
        return p, int(m.group(1))
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such checkpoint directory")
    have = sorted(c.name for c in p.iterdir() if c.is_dir() and (ITER_RE.match(c.name) or c.name == "release"))
    if iteration is None:
        tracker = p / TRACKER
        if not tracker.is_file():
            raise FileNotFoundError(f"{p} has no {TRACKER}; pass --iteration (it has: {have or 'no iter_* folder'})")
        text = tracker.read_text().strip()
        iteration = "release" if text == "release" else int(text)
    d = iteration_dir(p, iteration)
    if not d.is_dir():
        raise FileNotFoundError(f"{p} has no {d.name} (it has: {have or 'no iter_* folder'})")
    if not (d / "metadata.json").is_file():
        raise FileNotFoundError(f"{d} is not a torch_dist checkpoint (no metadata.json): an incomplete save, or "
                                f"another --ckpt-format")
    return d, iteration


def _get(args, name, default=None):
    return args.get(name, default) if isinstance(args, dict) else getattr(args, name, default)


def flavour_of(normalization: str, gated: bool, position_embedding: str, bias: bool, what: str) -> str:
    """growth-ds's flavour of a megatron architecture: gpt2 is (LayerNorm, no gated MLP, learned absolute
    positions, linear biases), llama is (RMSNorm, SwiGLU, RoPE, no biases); ``ValueError`` naming ``what``
    otherwise."""
    key = (normalization, bool(gated), position_embedding, bool(bias))
    if key == ("RMSNorm", True, "rope", False):
        return "llama"
    if key == ("LayerNorm", False, "learned_absolute", True):
        return "gpt2"
    raise ValueError(f"{what} with normalization={normalization}, gated (swiglu)={gated}, position_embedding_type="
                     f"{position_embedding}, add_bias_linear={bias} is neither flavour: gpt2 is (LayerNorm, False, "
                     f"learned_absolute, True), llama is (RMSNorm, True, rope, False)")


def shape_from_args(args, vocab_size: int) -> ModelShape:
    """The :class:`ModelShape` of a Megatron-LM run from its saved ``args`` (``vocab_size``: the embedding's padded
    rows). ``ValueError`` naming the settings growth-ds's flavours do not cover."""
    flavour = flavour_of(_get(args, "normalization", "LayerNorm"), bool(_get(args, "swiglu", False)),
                         _get(args, "position_embedding_type", "learned_absolute"),
                         bool(_get(args, "add_bias_linear", True)), "a Megatron-LM run")
    unsupported = [k for k in ("num_experts", "multi_latent_attention", "qk_layernorm", "mtp_num_layers")
                   if _get(args, k)]
    if unsupported:
        raise ValueError(f"the run uses {unsupported}, which growth-ds's decoder does not have")
    heads = int(_get(args, "num_attention_heads"))
    hidden = int(_get(args, "hidden_size"))
    groups = int(_get(args, "num_query_groups") or heads) if _get(args, "group_query_attention") else heads
    return ModelShape(
        flavour=flavour, n_layers=int(_get(args, "num_layers")), d_model=hidden, n_heads=heads, n_kv_heads=groups,
        head_dim=int(_get(args, "kv_channels") or hidden // heads), d_ffn=int(_get(args, "ffn_hidden_size")),
        vocab_size=int(vocab_size),
        max_seq_len=int(_get(args, "max_position_embeddings") or _get(args, "seq_length")),
        tied_embeddings=not bool(_get(args, "untie_embeddings_and_output_weights", False)),
        norm_eps=float(_get(args, "norm_epsilon", 1e-5)), rope_theta=float(_get(args, "rotary_base", 10000)))


def check_target_layout(shape: ModelShape, tp: Optional[int], pp: Optional[int]) -> None:
    """``ValueError`` naming each size of the grown ``shape`` that the next job's layout cannot split:
    heads, query groups and FFN width over ``tp`` ranks, layers over ``pp`` stages (Megatron-LM's even pipeline
    split). The vocabulary is not checked: Megatron-LM pads it again for its own TP size
    (``make_vocab_size_divisible_by`` x TP) and megatron-core loads the embedding and output layer with
    ``allow_shape_mismatch`` (rows beyond the checkpoint's are zero)."""
    bad = []
    if tp is not None:
        if tp < 1:
            raise ValueError(f"--target-tp must be positive, got {tp}")
        for what, n in (("num_attention_heads", shape.n_heads), ("num_query_groups", shape.n_kv_heads),
                        ("ffn_hidden_size", shape.d_ffn)):
            if n % tp:
                bad.append(f"{what} {n} is not divisible by --target-tp {tp}")
    if pp is not None:
        if pp < 1:
            raise ValueError(f"--target-pp must be positive, got {pp}")
        if shape.n_layers % pp:
            bad.append(f"num_layers {shape.n_layers} is not divisible by --target-pp {pp}")
    if bad:
        raise ValueError("the grown model cannot be laid out for the next job: " + "; ".join(bad))


def grown_args(args, large: ModelShape, tp: Optional[int] = None, pp: Optional[int] = None):
    """A copy of the saved ``args`` with the sizes of ``large`` (and the next job's ``tp`` / ``pp``, when
    given): what the next job's flags must say."""
    new = copy.deepcopy(args)
    sizes = {"num_layers": large.n_layers, "hidden_size": large.d_model, "num_attention_heads": large.n_heads,
             "ffn_hidden_size": large.d_ffn, "kv_channels": large.head_dim, "norm_epsilon": large.norm_eps,
             "num_query_groups": large.n_kv_heads,
             "group_query_attention": bool(_get(args, "group_query_attention")) or large.n_kv_heads != large.n_heads}
    if tp is not None:
        sizes["tensor_model_parallel_size"] = tp
    if pp is not None:
        sizes["pipeline_model_parallel_size"] = pp
    for k, v in sizes.items():
        if isinstance(new, dict):
            new[k] = v
        else:
            setattr(new, k, v)
    return new


def check_shards(ckpt_dir) -> None:
    """``ValueError`` naming a shard file that the checkpoint's metadata lists but that is missing or shorter than
    the byte ranges recorded for it (an interrupted copy, a full disk): checked before anything is loaded."""
    from torch.distributed.checkpoint import FileSystemReader

    d = Path(ckpt_dir)
    if not (d / "common.pt").is_file():
        raise ValueError(f"{d}: common.pt is missing (an incomplete torch_dist checkpoint)")
    try:
        meta = FileSystemReader(str(d)).read_metadata()
    except Exception as e:  # noqa: BLE001 (unreadable metadata: say which file)
        raise ValueError(f"{d}: its torch_dist metadata (.metadata) cannot be read: {e}") from e
    need: dict = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, n in sorted(need.items()):
        f = d / rel
        if not f.is_file():
            raise ValueError(f"{d}: shard {rel} is missing")
        if f.stat().st_size < n:
            raise ValueError(f"{d}: shard {rel} is truncated ({f.stat().st_size} bytes; its metadata records {n})")


def check_optimizer_format(ckpt_dir) -> None:
    """Refuse a distributed-optimizer checkpoint stored per bucket (``dp_reshardable``) or as flattened slices
    (``fully_sharded_model_space``) before anything else happens; the per-parameter ``fully_reshardable``
    format (and a non-distributed optimizer's) pass."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_content_metadata(str(ckpt_dir)) or {}
    kind = meta.get("distrib_optim_sharding_type")
    if kind == "dp_reshardable":
        raise ValueError(f"{ckpt_dir}: the distributed optimizer's state is stored per bucket (dp_reshardable), "
                         f"which can only be resharded along data parallelism, not grown; {RESHARDABLE_HINT}")
    if kind == "fully_sharded_model_space":
        raise ValueError(f"{ckpt_dir}: the distributed optimizer's state is stored as flattened per-rank slices "
                         f"(fully_sharded_model_space), which megatron-core no longer loads (ShardedTensor."
                         f"flattened_range); {RESHARDABLE_HINT}")


#: what each growth LR policy does to a Megatron-LM run's ``opt_param_scheduler`` state
SCHEDULER_POLICIES = {
    "continue": "the scheduler state is carried unchanged: the next job resumes its warmup/decay where it was",
    "restart": "num_steps is set to 0: the next job warms up and decays again from the start (the grown model's "
               "fresh schedule; pair it with --moments reset)",
}


def scheduler_after_growth(state: Optional[dict], policy: str) -> Optional[dict]:
    """The ``opt_param_scheduler`` state the grown checkpoint carries under LR ``policy``
    (:data:`SCHEDULER_POLICIES`); ``ValueError`` for a policy Megatron-LM's scheduler cannot express."""
    if policy not in SCHEDULER_POLICIES:
        raise ValueError(f"--lr-policy {policy}: a Megatron-LM run's LR scheduler takes {sorted(SCHEDULER_POLICIES)} "
                         f"(rewarm and lemon re-plan a growth-ds schedule; set the next job's scheduler flags instead)")
    if state is None or policy == "continue":
        return state
    return {**state, "num_steps": 0}


def is_rng_key(key: str) -> bool:
    """A Megatron-LM run's RNG states: one ``ShardedObject`` ``[<prefix>]rng_state`` of global shape (PP, TP),
    one shard per (pipeline, tensor) rank, each the list of that rank's generator states."""
    return key == "rng_state" or key.endswith(".rng_state") or key.endswith("_rng_state")


def _layout(args) -> Tuple[int, int]:
    return int(_get(args, "tensor_model_parallel_size", 1) or 1), int(_get(args, "pipeline_model_parallel_size", 1) or 1)


def rng_after_growth(rng_states: dict, args, new_args) -> Tuple[dict, Any]:
    """What the grown checkpoint carries of the run's RNG states (``{(key, offset): (payload, shape)}``) and its
    ``args``. Megatron-LM reloads them only when the next job's (TP, PP) equals the one in the checkpoint's
    ``args`` (it then asks for every (PP, TP) shard; on a mismatch it ignores them). So: the layout unchanged,
    they are carried as they are (the next job's dropout and sampling streams go on); the layout changed
    (``--target-tp`` / ``--target-pp``, written into ``new_args``), no rank's state can be the new ranks', so
    none is written and ``new_args.no_save_rng`` says so: the next job seeds its generators as a fresh run."""
    if not rng_states or _layout(args) == _layout(new_args):
        return dict(rng_states), new_args
    new_args = copy.deepcopy(new_args)
    if isinstance(new_args, dict):
        new_args["no_save_rng"] = True
    else:
        setattr(new_args, "no_save_rng", True)
    return {}, new_args


def write_tracker(root, iteration) -> None:
    """Point ``root``'s tracker at ``iteration`` (atomic: a reader sees the old or the new one)."""
    atomic.write_text(Path(root) / TRACKER, f"{iteration}\n" if iteration != "release" else "release\n")


__all__ = ["ITER_RE", "RESHARDABLE_HINT", "RUN_STATE_KEYS", "SCHEDULER_POLICIES", "TRACKER",
           "check_optimizer_format", "check_shards", "check_target_layout", "flavour_of", "grown_args",
           "is_rng_key", "is_run_root", "iteration_dir", "resolve_iteration", "rng_after_growth",
           "scheduler_after_growth", "shape_from_args", "write_tracker"]

"""megatron-core GPTModel (local spec) and growth-ds: configs, layouts, tensor-parallel growth, checkpoints.

Parameter correspondence (reference name on the right; ``L`` = ``decoder.layers.{i}.``)::

    embedding.word_embeddings.weight        tok_emb.weight                 vocab-parallel   [V/tp, d]
    embedding.position_embeddings.weight    pos_emb.weight  (gpt2)         replicated       [S, d]
    L input_layernorm.{weight,bias}         layers.i.attn_norm.*           replicated       [d]
    L self_attention.linear_qkv.{weight,bias}  attn.{q,k,v}.*              column-parallel  [K/tp*(g+2)*hd, d]
    L self_attention.linear_proj.weight     attn.o.weight                  row-parallel     [d, H/tp*hd]
    L self_attention.linear_proj.bias       attn.o.bias                    replicated       [d]
    L pre_mlp_layernorm.{weight,bias}       layers.i.mlp_norm.*            replicated       [d]
    L mlp.linear_fc1.weight                 mlp.gate/up.weight (llama)     column-parallel  [2*f/tp, d] = [gate_r; up_r]
                                            mlp.up.weight (gpt2)           column-parallel  [f/tp, d]
    L mlp.linear_fc1.bias                   mlp.up.bias (gpt2)             column-parallel  [f/tp]
    L mlp.linear_fc2.weight                 mlp.down.weight                row-parallel     [d, f/tp]
    L mlp.linear_fc2.bias                   mlp.down.bias                  replicated       [d]
    decoder.final_layernorm.{weight,bias}   norm.*                         replicated       [d]
    output_layer.weight                     lm_head.weight  (untied)       vocab-parallel   [V/tp, d]

The fused QKV rows are group-major: for each of the ``K`` kv groups, its ``g = H/K`` query heads,
then its key head, then its value head (``hd`` rows each); TP splits whole groups. Shard layouts are
read from each parameter's ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride``
attributes and checked against this table.

Flavours: ``gpt2`` = LayerNorm, GELU (tanh), learned positions, linear biases; ``llama`` = RMSNorm,
SwiGLU, RoPE, no biases. Either may use GQA and tied or untied output weights.

Growth (:func:`grow_gpt_model`) builds the grown ``GPTModel`` from a new ``TransformerConfig`` and
fills every rank's shards from that rank's old shards with :class:`ShardGrower` under the TP-aware
plan (:func:`growth_ds.distributed.tensor_parallel.make_tp_plan`): no weight is gathered; only
HyperCloning's relative noise all-reduces two scalars per sharded weight.

Typical use (every TP rank runs the same lines; on a CPU-only machine ``ensure_model_parallel``
applies :mod:`growth_ds.interop.megatron_cpu`)::

    ensure_model_parallel(tp=2)                       # or your own initialize_model_parallel + apply_cpu_patches
    model = build_gpt_model(small_shape)               # or your GPTModel (local spec)
    opt = torch.optim.AdamW(model.parameters())
    ...train...
    grown = grow_gpt_model(model, opt, make_plan(small_shape, large_shape, width="lemon", depth="identity"))
    model, opt = grown.model, grown.optimizer          # continue training; the LR policy is grown.plan.lr
    save_dist_checkpoint(model, opt, "ckpt/grown")     # reloads at any TP size
"""
from __future__ import annotations

import copy
import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from growth_ds.distributed.tensor_parallel import ShardGrower, ShardSpec, TPPlan, check_tp_shape, make_tp_plan
from growth_ds.models.schema import parameter_schema
from growth_ds.ops.apply import source_name
from growth_ds.ops.plan import GrowthPlan
from growth_ds.ops.state import TrainingState
from growth_ds.shapes import ModelShape

CHECKPOINT_FORMAT = "growth-ds/megatron-1"
COMMON_KEY = "growth_ds"


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (the reference decoder's ``gpt2`` activation)."""
    return F.gelu(x, approximate="tanh")


# ---- shapes <-> megatron configs -------------------------------------------------------------------
def transformer_config(shape: ModelShape, *, tp: int = 1, **overrides):
    """A megatron ``TransformerConfig`` for ``shape`` (dropout 0, CPU initialisation; ``overrides`` win)."""
    from megatron.core.transformer import TransformerConfig

    check_tp_shape(shape, tp)
    gpt2 = shape.flavour == "gpt2"
    kw = dict(num_layers=shape.n_layers, hidden_size=shape.d_model, num_attention_heads=shape.n_heads,
              num_query_groups=shape.n_kv_heads, kv_channels=shape.head_dim, ffn_hidden_size=shape.d_ffn,
              normalization="LayerNorm" if gpt2 else "RMSNorm", layernorm_epsilon=shape.norm_eps,
              add_bias_linear=gpt2, gated_linear_unit=not gpt2, activation_func=gelu_tanh if gpt2 else F.silu,
              hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
              use_cpu_initialization=True, sequence_parallel=False, gradient_accumulation_fusion=False)
    kw.update(overrides)
    return TransformerConfig(**kw)


def layer_spec(shape_or_config):
    """``get_gpt_layer_local_spec`` with the flavour's norm."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if isinstance(shape_or_config, ModelShape):
        norm = "LayerNorm" if shape_or_config.flavour == "gpt2" else "RMSNorm"
    else:
        norm = shape_or_config.normalization
    return get_gpt_layer_local_spec(normalization=norm)


def build_gpt_model(shape: ModelShape, *, config=None, tp: Optional[int] = None, **config_overrides):
    """A megatron-core ``GPTModel`` (local spec) for ``shape`` on the current TP group.

    ``tp`` defaults to ``parallel_state``'s tensor-parallel size. With the default
    ``use_cpu_initialization=True`` the initial weights do not depend on the TP size.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if config is None:
        tp = tp or ps.get_tensor_model_parallel_world_size()
        config = transformer_config(shape, tp=tp, **config_overrides)
    model = GPTModel(config, layer_spec(config), vocab_size=shape.vocab_size, max_sequence_length=shape.max_seq_len,
                     share_embeddings_and_output_weights=shape.tied_embeddings,
                     position_embedding_type="learned_absolute" if shape.flavour == "gpt2" else "rope",
                     rotary_base=shape.rope_theta)
    ensure_tp_attributes(model, shape)
    return model


def shape_of(model) -> ModelShape:
    """The :class:`ModelShape` of a megatron ``GPTModel``; ``ValueError`` naming any feature growth-ds lacks."""
    c = model.config
    unsupported = {
        "pipeline parallelism (pre_process/post_process)": not (model.pre_process and model.post_process),
        "num_moe_experts": bool(c.num_moe_experts), "multi_latent_attention": c.multi_latent_attention,
        "qk_layernorm": c.qk_layernorm, "attention_output_gate": getattr(c, "attention_output_gate", False),
        "mtp_num_layers": bool(c.mtp_num_layers), "softmax_scale": c.softmax_scale is not None,
        "glu_linear_offset": bool(getattr(c, "glu_linear_offset", 0.0)),
        "activation_func_clamp_value": getattr(c, "activation_func_clamp_value", None) is not None,
        "rotary_interleaved": bool(getattr(c, "rotary_interleaved", False)),
        "rotary_percent != 1": float(getattr(model, "rotary_percent", 1.0)) != 1.0,
        "add_qkv_bias without add_bias_linear": c.add_qkv_bias and not c.add_bias_linear,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"GPTModel uses {bad}, which the growth-ds reference decoder does not have")
    from growth_ds.interop.megatron_lm import flavour_of

    flavour = flavour_of(c.normalization, c.gated_linear_unit, model.position_embedding_type, c.add_bias_linear,
                         "GPTModel")
    return ModelShape(flavour=flavour, n_layers=c.num_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
                      n_kv_heads=c.num_query_groups or c.num_attention_heads, head_dim=c.kv_channels,
                      d_ffn=c.ffn_hidden_size, vocab_size=model.vocab_size, max_seq_len=model.max_sequence_length,
                      tied_embeddings=model.share_embeddings_and_output_weights, norm_eps=c.layernorm_epsilon,
                      rope_theta=float(model.rotary_base))


# ---- layouts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One megatron parameter: how it packs reference parameters and how TP splits it.

    ``kind``: ``plain`` (one reference parameter), ``qkv`` (group-major fused q/k/v), ``glu``
    (``[gate; up]``). ``expect``: ``(partition_dim, partition_stride)``, ``partition_dim`` None when
    replicated.
    """

    kind: str
    refs: Tuple[str, ...]
    expect: Tuple[Optional[int], int]


def megatron_layout(shape: ModelShape) -> Dict[str, Entry]:
    """``{megatron parameter name: Entry}`` for a local-spec ``GPTModel`` of ``shape``, in parameter order."""
    gpt2 = shape.flavour == "gpt2"
    col, row, rep = (0, 1), (1, 1), (None, 1)
    out: Dict[str, Entry] = {"embedding.word_embeddings.weight": Entry("plain", ("tok_emb.weight",), col)}
    if gpt2:
        out["embedding.position_embeddings.weight"] = Entry("plain", ("pos_emb.weight",), rep)
    kinds = ("weight", "bias") if gpt2 else ("weight",)
    for i in range(shape.n_layers):
        m, r = f"decoder.layers.{i}.", f"layers.{i}."
        for k in kinds:
            out[m + f"input_layernorm.{k}"] = Entry("plain", (r + f"attn_norm.{k}",), rep)
        for k in kinds:
            out[m + f"self_attention.linear_qkv.{k}"] = Entry("qkv", tuple(r + f"attn.{p}.{k}" for p in "qkv"), col)
        out[m + "self_attention.linear_proj.weight"] = Entry("plain", (r + "attn.o.weight",), row)
        if gpt2:
            out[m + "self_attention.linear_proj.bias"] = Entry("plain", (r + "attn.o.bias",), rep)
        for k in kinds:
            out[m + f"pre_mlp_layernorm.{k}"] = Entry("plain", (r + f"mlp_norm.{k}",), rep)
        if gpt2:
            out[m + "mlp.linear_fc1.weight"] = Entry("plain", (r + "mlp.up.weight",), col)
            out[m + "mlp.linear_fc1.bias"] = Entry("plain", (r + "mlp.up.bias",), col)
        else:
            out[m + "mlp.linear_fc1.weight"] = Entry("glu", (r + "mlp.gate.weight", r + "mlp.up.weight"), (0, 2))
        out[m + "mlp.linear_fc2.weight"] = Entry("plain", (r + "mlp.down.weight",), row)
        if gpt2:
            out[m + "mlp.linear_fc2.bias"] = Entry("plain", (r + "mlp.down.bias",), rep)
    for k in kinds:
        out[f"decoder.final_layernorm.{k}"] = Entry("plain", (f"norm.{k}",), rep)
    if not shape.tied_embeddings:
        out["output_layer.weight"] = Entry("plain", ("lm_head.weight",), col)
    return out


def _tp_group(model=None):
    from megatron.core import parallel_state as ps

    pgs = getattr(model, "pg_collection", None)
    group = getattr(pgs, "tp", None) if pgs is not None else None
    return group if group is not None else ps.get_tensor_model_parallel_group()


def _group_rank_size(group) -> Tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def ensure_tp_attributes(model, shape: Optional[ModelShape] = None) -> None:
    """Give parameters that lack them (built with ``perform_initialization=False``) megatron's TP attributes.

    Parameters that already carry ``tensor_model_parallel`` are left alone.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    layout = megatron_layout(shape or shape_of(model))
    for name, p in model.named_parameters():
        entry = layout.get(name)
        if entry is None or hasattr(p, "tensor_model_parallel") or entry.expect[0] is None:
            continue
        set_tensor_model_parallel_attributes(p, True, entry.expect[0], entry.expect[1])


def shard_spec_of(name: str, param: torch.Tensor, entry: Entry, rank: int, size: int) -> ShardSpec:
    """The shard layout of ``param`` read from its TP attributes, checked against ``entry``.

    ``RuntimeError`` when the attributes contradict the local spec's layout (a layout growth-ds
    would mis-read).
    """
    if getattr(param, "tensor_model_parallel", False):
        got = (int(param.partition_dim), int(getattr(param, "partition_stride", 1)))
    else:
        got = (None, 1)
    if size > 1 and got != entry.expect:
        raise RuntimeError(f"{name}: its tensor_model_parallel/partition_dim/partition_stride attributes give "
                           f"(partition_dim, stride) = {got}, but growth-ds expects {entry.expect} for the "
                           f"megatron-core local spec; this layout is not supported")
    dim = got[0] if size > 1 else entry.expect[0]
    return ShardSpec(dim, got[1] if dim is not None else 1, rank, size)


def split_megatron(entry: Entry, t: torch.Tensor, shape: ModelShape, spec: ShardSpec) -> List[torch.Tensor]:
    """Reference-parameter pieces (``entry.refs`` order) of a megatron tensor or its TP shard."""
    if entry.kind == "plain":
        return [t]
    if entry.kind == "glu":
        if spec.tp_size > 1 and spec.stride != 2:
            raise RuntimeError(f"gated fc1 with partition_stride {spec.stride}: a rank would not hold matching "
                               f"gate and up rows")
        return list(t.chunk(2, dim=0))
    groups = shape.n_kv_heads // spec.tp_size
    g, hd = shape.group_size, shape.head_dim
    t4 = t.reshape(groups, g + 2, hd, *t.shape[1:])  # (groups, [q_0..q_{g-1}, k, v], hd, ...)
    return [t4[:, :g].reshape(groups * g * hd, *t.shape[1:]), t4[:, g].reshape(groups * hd, *t.shape[1:]),
            t4[:, g + 1].reshape(groups * hd, *t.shape[1:])]


def fuse_megatron(entry: Entry, parts: Sequence[torch.Tensor], shape: ModelShape, spec: ShardSpec) -> torch.Tensor:
    """Inverse of :func:`split_megatron`."""
    if entry.kind == "plain":
        return parts[0]
    if entry.kind == "glu":
        return torch.cat(list(parts), dim=0)
    groups = shape.n_kv_heads // spec.tp_size
    g, hd = shape.group_size, shape.head_dim
    rest = parts[0].shape[1:]
    q = parts[0].reshape(groups, g, hd, *rest)
    k, v = (p.reshape(groups, 1, hd, *rest) for p in parts[1:])
    return torch.cat([q, k, v], dim=1).reshape(groups * (g + 2) * hd, *rest)


def megatron_sources(plan: GrowthPlan, grown: Optional[ModelShape] = None) -> Dict[str, str]:
    """``{grown megatron parameter: the old megatron parameter it is built from}`` under ``plan`` (``grown``:
    the grown shape when it is a TP plan's; default ``plan.grown_shape``). ``RuntimeError`` if a grown
    parameter would need several old ones (a layout this executor does not know)."""
    old_of_ref = {ref: name for name, e in megatron_layout(plan.small).items() for ref in e.refs}
    out = {}
    for name, entry in megatron_layout(grown or plan.grown_shape).items():
        srcs = {old_of_ref[source_name(plan, ref)] for ref in entry.refs}
        if len(srcs) != 1:
            raise RuntimeError(f"{name} would be built from several old parameters: {sorted(srcs)}")
        out[name] = srcs.pop()
    return out


def megatron_to_reference(full: Dict[str, torch.Tensor], shape: ModelShape) -> Dict[str, torch.Tensor]:
    """Gathered megatron tensors (``{megatron name: full tensor}``) -> ``{reference name: tensor}``."""
    layout = megatron_layout(shape)
    _same_keys(full, layout, "megatron state")
    out = {}
    for name, entry in layout.items():
        for ref, piece in zip(entry.refs, split_megatron(entry, full[name], shape, ShardSpec(entry.expect[0]))):
            out[ref] = piece.clone()
    return out


def reference_to_megatron(params: Dict[str, torch.Tensor], shape: ModelShape) -> Dict[str, torch.Tensor]:
    """``{reference name: tensor}`` -> full megatron tensors ``{megatron name: tensor}``."""
    _same_keys(params, parameter_schema(shape), "reference state")
    return {name: fuse_megatron(entry, [params[r] for r in entry.refs], shape, ShardSpec(entry.expect[0]))
            for name, entry in megatron_layout(shape).items()}


def _same_keys(got, want, label):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"{label}: missing {missing[:4]}, unexpected {extra[:4]}")


# ---- gathered views (tests, export) -----------------------------------------------------------------
def _model_specs(model, shape: ModelShape) -> Dict[str, Tuple[torch.nn.Parameter, Entry, ShardSpec]]:
    rank, size = _group_rank_size(_tp_group(model))
    layout = megatron_layout(shape)
    params = dict(model.named_parameters())
    _same_keys(params, layout, "GPTModel parameters")
    return {n: (params[n], e, shard_spec_of(n, params[n], e, rank, size)) for n, e in layout.items()}


def gather_tensor(local: torch.Tensor, spec: ShardSpec, group) -> torch.Tensor:
    """Full tensor from every TP rank's shard (an all-gather; for tests and export, never used by growth)."""
    if spec.replicated or spec.tp_size == 1:
        return local.detach().clone()
    shards = [torch.empty_like(local) for _ in range(spec.tp_size)]
    dist.all_gather(shards, local.detach().contiguous(), group=group)
    return spec.unshard(shards)


def _adam_tensors(optimizer, p):
    st = optimizer.state.get(p, {}) if optimizer is not None else {}
    if "exp_avg" in st:
        return st["exp_avg"], st["exp_avg_sq"], int(st["step"])
    return torch.zeros_like(p), torch.zeros_like(p), 0


def to_reference_state(model, optimizer=None) -> TrainingState:
    """The gathered :class:`TrainingState` of a megatron model (and Adam optimizer), reference names.

    Collective over the TP group (all-gathers every sharded tensor): for tests and export only.
    """
    shape = shape_of(model)
    group = _tp_group(model)
    full_p, full_m, full_v, steps = {}, {}, {}, set()
    for name, (p, entry, spec) in _model_specs(model, shape).items():
        full_p[name] = gather_tensor(p.data, spec, group)
        if optimizer is not None:
            m, v, step = _adam_tensors(optimizer, p)
            full_m[name], full_v[name] = gather_tensor(m, spec, group), gather_tensor(v, spec, group)
            steps.add(step)
    if len(steps) > 1:
        raise ValueError(f"optimizer parameters disagree on the step count: {sorted(steps)}")
    state = TrainingState(shape, megatron_to_reference(full_p, shape))
    if optimizer is not None:
        state.exp_avg, state.exp_avg_sq = megatron_to_reference(full_m, shape), megatron_to_reference(full_v, shape)
        state.step = steps.pop() if steps else 0
    return state


def load_reference_state(model, state: TrainingState, optimizer=None) -> None:
    """Write a full reference :class:`TrainingState` into this rank's shards (and Adam state); no communication."""
    shape = shape_of(model)
    for f in ("flavour", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ffn", "vocab_size",
              "max_seq_len", "tied_embeddings"):
        if getattr(shape, f) != getattr(state.shape, f):
            raise ValueError(f"{f}: the state has {getattr(state.shape, f)!r}, the model {getattr(shape, f)!r}")
    full_p = reference_to_megatron(state.params, shape)
    full_m = full_v = None
    if optimizer is not None and state.exp_avg is not None:
        full_m, full_v = reference_to_megatron(state.exp_avg, shape), reference_to_megatron(state.exp_avg_sq, shape)
    with torch.no_grad():
        for name, (p, entry, spec) in _model_specs(model, shape).items():
            p.copy_(spec.shard(full_p[name]))
            if full_m is not None:
                optimizer.state[p] = {"step": torch.tensor(float(state.step)),
                                      "exp_avg": spec.shard(full_m[name]).clone().to(p.dtype),
                                      "exp_avg_sq": spec.shard(full_v[name]).clone().to(p.dtype)}


# ---- growth ---------------------------------------------------------------------------------------
@dataclass
class GrownGPT:
    """Result of :func:`grow_gpt_model`: the grown model and optimizer, the plan that grew them."""

    model: object
    optimizer: Optional[torch.optim.Optimizer]
    tp_plan: TPPlan
    shape: ModelShape
    step: int

    @property
    def plan(self) -> GrowthPlan:
        return self.tp_plan.plan


def _check_plan_matches(shape: ModelShape, plan: GrowthPlan) -> None:
    for f in ("flavour", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ffn", "vocab_size",
              "max_seq_len", "tied_embeddings"):
        if getattr(shape, f) != getattr(plan.small, f):
            raise ValueError(f"{f}: the model has {getattr(shape, f)!r} but the plan grows from "
                             f"{getattr(plan.small, f)!r}")


def grow_config(config, grown: ModelShape):
    """The old ``TransformerConfig`` with the grown sizes (every other setting kept)."""
    return dataclasses.replace(config, num_layers=grown.n_layers, hidden_size=grown.d_model,
                               num_attention_heads=grown.n_heads, num_query_groups=grown.n_kv_heads,
                               kv_channels=grown.head_dim, ffn_hidden_size=grown.d_ffn,
                               layernorm_epsilon=grown.norm_eps)


def grow_gpt_model(model, optimizer: Optional[torch.optim.Optimizer], plan: GrowthPlan, *,
                   plan_tp: Optional[int] = None) -> GrownGPT:
    """Grow a megatron-core ``GPTModel`` and its torch Adam/AdamW shard by shard, on every TP rank.

    Args:
        model: the small model (local spec), this rank's shards. Not modified, except that parameters
            built without initialisation get megatron's TP attributes (:func:`ensure_tp_attributes`).
        optimizer: a ``torch.optim.Adam``/``AdamW`` over ``model``'s parameters, or None.
        plan: any operator-core plan from ``plan.small`` (must match the model) to the large shape.
        plan_tp: the TP size the plan is made block-diagonal for (default: the current TP size; it
            must be a multiple of it). Growing at TP=1 with ``plan_tp=2`` gives exactly the gathered
            TP=2 result.

    Returns a :class:`GrownGPT`: a new ``GPTModel`` built from the old ``TransformerConfig`` with the
    grown sizes (same spec, vocab, position type, tying), its shards filled; a new optimizer of the
    same class and param groups holding the grown moments and step (``plan.moments``). No collective
    runs except HyperCloning's scalar all-reduces. The LR policy is ``result.plan.lr``.
    """
    from megatron.core.models.gpt import GPTModel

    if optimizer is not None:
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"grow_gpt_model grows torch Adam/AdamW state, got {type(optimizer).__name__}")
        if any(g.get("amsgrad") for g in optimizer.param_groups):
            raise ValueError("amsgrad: max_exp_avg_sq is not grown; use amsgrad=False")
    small = shape_of(model)
    _check_plan_matches(small, plan)
    ensure_tp_attributes(model, small)
    group = _tp_group(model)
    rank, tp = _group_rank_size(group)
    plan_tp = plan_tp or tp
    if plan_tp % tp:
        raise ValueError(f"plan_tp ({plan_tp}) must be a multiple of the tensor-parallel size ({tp})")
    tpp = make_tp_plan(plan, plan_tp)
    # a plan block-diagonal over plan_tp ranks is block-diagonal over tp ranks: re-label it for tp
    tpp_here = tpp if plan_tp == tp else TPPlan(tpp.plan, tp, plan, tpp.how, tpp.perm)
    grown = tpp.plan.grown_shape
    check_tp_shape(grown, tp, "grown shape")

    def reduce_sum(t):
        dist.all_reduce(t, group=group)
        return t

    grower = ShardGrower(tpp_here, rank, reduce_sum)

    # 1. the grown module, without initialisation (every value is written below)
    config = grow_config(model.config, grown)
    perform_init = config.perform_initialization
    config.perform_initialization = False
    new = GPTModel(config, model.transformer_layer_spec, vocab_size=model.vocab_size,
                   max_sequence_length=grown.max_seq_len, pre_process=model.pre_process,
                   post_process=model.post_process, fp16_lm_cross_entropy=model.fp16_lm_cross_entropy,
                   parallel_output=model.parallel_output,
                   share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
                   position_embedding_type=model.position_embedding_type, rotary_percent=model.rotary_percent,
                   rotary_base=model.rotary_base, rope_scaling=getattr(model, "rotary_scaling", False))
    config.perform_initialization = perform_init
    if getattr(model, "rotary_pos_emb", None) is not None and hasattr(model.rotary_pos_emb, "inv_freq"):
        new.rotary_pos_emb.inv_freq = model.rotary_pos_emb.inv_freq.clone()  # head_dim is kept: same rotation

    # 2. every new shard from the matching old shard
    old_specs = _model_specs(model, small)
    schema = parameter_schema(grown)
    new_params = dict(new.named_parameters())
    new_layout = megatron_layout(grown)
    _same_keys(new_params, new_layout, "grown GPTModel parameters")
    src_name_of, new_specs = megatron_sources(plan, grown), {}
    with torch.no_grad():
        for name, entry in new_layout.items():
            p_new = new_params[name]
            p_old, old_entry, old_spec = old_specs[src_name_of[name]]
            for key, value in vars(p_old).items():  # megatron's flags (TP layout, allreduce, shared, ...)
                if not key.startswith("_") and not torch.is_tensor(value) and not callable(value):
                    setattr(p_new, key, value)
            spec = new_specs[name] = dataclasses.replace(old_spec)
            old_parts = split_megatron(old_entry, p_old.data, small, old_spec)
            parts = [grower.value(ref, schema[ref], old_parts[old_entry.refs.index(source_name(plan, ref))])
                     for ref in entry.refs]
            value = fuse_megatron(entry, parts, grown, spec)
            if tuple(value.shape) != tuple(p_new.shape):
                raise RuntimeError(f"{name}: grew a shard of shape {tuple(value.shape)}, the grown model has "
                                   f"{tuple(p_new.shape)}")
            p_new.copy_(value)

    # 3. the optimizer: same class and groups, grown moments
    new_opt, step = None, 0
    if optimizer is not None:
        old_params = dict(model.named_parameters())
        group_of = {}
        for gi, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                group_of[id(p)] = gi
        groups = [dict((k, v) for k, v in g.items() if k != "params") | {"params": []} for g in optimizer.param_groups]
        steps = set()
        for name in new_layout:
            p_old = old_params[src_name_of[name]]
            if id(p_old) not in group_of:
                raise ValueError(f"{src_name_of[name]} is not in the optimizer; growth needs every parameter in it")
            groups[group_of[id(p_old)]]["params"].append(new_params[name])
            steps.add(_adam_tensors(optimizer, p_old)[2])
        if len(steps) > 1:
            raise ValueError(f"optimizer parameters disagree on the step count: {sorted(steps)}")
        step = 0 if plan.moments == "reset" else steps.pop()
        new_opt = type(optimizer)([g for g in groups if g["params"]])
        for name, entry in new_layout.items():
            p_new = new_params[name]
            p_old, old_entry, old_spec = old_specs[src_name_of[name]]
            m, v, _ = _adam_tensors(optimizer, p_old)
            moments = []
            for t, power in ((m, 1), (v, 2)):
                old_parts = split_megatron(old_entry, t, small, old_spec)
                parts = [grower.moment(ref, schema[ref], old_parts[old_entry.refs.index(source_name(plan, ref))], power)
                         for ref in entry.refs]
                moments.append(fuse_megatron(entry, parts, grown, new_specs[name]).to(p_new.dtype).contiguous())
            new_opt.state[p_new] = {"step": torch.tensor(float(step)), "exp_avg": moments[0], "exp_avg_sq": moments[1]}
    return GrownGPT(new, new_opt, tpp, grown, step)


# ---- forward helpers ------------------------------------------------------------------------------
def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """This rank's vocab-parallel logits ``[B, T, V/tp]`` for ``tokens[B, T]`` (causal; no mask needed)."""
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None)


def gather_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full logits ``[B, T, V]`` (all-gathers the vocab shards; for tests)."""
    local = forward_logits(model, tokens)
    group = _tp_group(model)
    return gather_tensor(local, ShardSpec(2, 1, *_group_rank_size(group)), group)


def lm_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (megatron's vocab-parallel cross entropy)."""
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None, labels=labels).float().mean()


# ---- dist_checkpointing ---------------------------------------------------------------------------
def _ensure_adam_state(optimizer) -> None:
    """Materialise zero Adam state for parameters that have none (so a checkpoint has tensors to hold)."""
    for g in optimizer.param_groups:
        for p in g["params"]:
            if "exp_avg" not in optimizer.state.get(p, {}):
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _optimizer_params(optimizer) -> List[torch.nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def checkpoint_state_dict(model, optimizer=None, *, extra: Optional[dict] = None,
                          run_state: Optional[dict] = None, masters: Optional[Dict[int, torch.Tensor]] = None,
                          objects: Optional[dict] = None, master_key: str = "fp32_param",
                          optimizer_common: Optional[dict] = None) -> dict:
    """The sharded state dict growth-ds saves: ``model``, ``optimizer`` (moments sharded like their
    parameters), a common ``growth_ds`` entry holding the shape, step and parameter groups, and ``run_state``
    (common entries of a Megatron-LM run: ``args``, ``iteration``, ...) at the top level. ``masters``
    (``{id(parameter): float32 value}``, a mixed-precision run's): saved as the optimizer's
    ``optimizer.state.<master_key>.<key>``: ``fp32_param`` as megatron-core's mixed-precision optimizer does,
    ``param`` as its distributed optimizer's ``fully_reshardable`` format does. ``optimizer_common``: a
    Megatron-LM run's own non-sharded optimizer entries (its param groups with ``wd_mult`` / ``lr_mult`` and
    ``step``, ``param_state_sharding_type``, the grad scaler), saved in place of torch's param groups so that
    Megatron-LM's optimizer loads the checkpoint; the sharded state then sits where that optimizer keeps it
    (:func:`_megatron_optimizer_tree`). ``objects``: more ``ShardedObject``s saved with
    the model (a Transformer Engine run's ``_extra_state``: :mod:`growth_ds.interop.extra_state`), in place of the
    model's own objects of the same keys."""
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    shape = shape_of(model)
    sd = {"model": model.sharded_state_dict()}
    if objects:  # (they replace the model's own objects of the same keys)
        from megatron.core.dist_checkpointing import ShardedObject

        keys = {o.key for o in objects.values()}
        sd["model"] = {k: v for k, v in sd["model"].items() if not (isinstance(v, ShardedObject) and v.key in keys)}
        for k, v in objects.items():
            if k in sd["model"]:
                raise ValueError(f"object {k!r} would replace the model's own entry")
            sd["model"][k] = v
    names = {id(p): n for n, p in model.named_parameters()}
    common = {"format": CHECKPOINT_FORMAT, "shape": shape.to_dict(), "step": 0, "param_groups": None}
    if optimizer is not None:
        _ensure_adam_state(optimizer)
        osd = optimizer.state_dict()
        steps = {int(s["step"]) for s in osd["state"].values()}
        if len(steps) > 1:
            raise ValueError(f"optimizer parameters disagree on the step count: {sorted(steps)}")
        common["step"] = steps.pop() if steps else 0
        common["param_groups"] = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        common["optimizer_class"] = type(optimizer).__name__
        params = _optimizer_params(optimizer)
        for i, p in enumerate(params if masters else ()):
            osd["state"][i][master_key] = masters[id(p)]
        id_map = get_param_id_to_sharded_param_map(sd["model"], params)
        optim_state_to_sharding_state(osd, id_map, exclude_keys=("step",))
        sd["optimizer"] = osd if optimizer_common is None else _megatron_optimizer_tree(optimizer_common, osd,
                                                                                        common["step"])
    common.update(extra or {})
    sd[COMMON_KEY] = common
    for k, v in (run_state or {}).items():
        if k in sd:
            raise ValueError(f"run_state entry {k!r} would replace the checkpoint's own {k!r}")
        sd[k] = v
    return sd


def _megatron_optimizer_tree(carried: dict, osd: dict, step: int) -> dict:
    """A Megatron-LM optimizer's checkpoint entry: its own non-sharded entries ``carried`` (from the source run's
    common state) with Adam's step (every param group's ``step``, the non-distributed optimizers'
    ``state.common_step``) set to the grown optimizer's ``step``, and the sharded per-parameter state of ``osd``
    (a torch optimizer state dict already made sharding state) where that optimizer keeps it: ``param_state``
    (distributed optimizer), ``optimizer.state`` (mixed precision) or ``state`` (float32). Only the keys of the
    sharded tensors matter to a loader; the carried entries are what its ``load_state_dict`` reads."""
    tree = copy.deepcopy(carried)
    for node, k in _adam_step_sites(tree):
        v = node[k]
        if isinstance(v, torch.Tensor):
            node[k] = torch.tensor(float(step), dtype=v.dtype)
        else:
            node[k] = type(v)(step) if isinstance(v, (int, float)) else step
    if "param_state_sharding_type" in tree:  # DistributedOptimizer
        tree["param_state"] = osd["state"]
    else:  # the inner torch optimizer's state, beside its common_step
        inner = tree["optimizer"] if isinstance(tree.get("optimizer"), dict) else tree
        inner["state"] = {**(inner.get("state") or {}), **osd["state"]}
    return tree


def save_dist_checkpoint(model, optimizer, ckpt_dir, *, extra: Optional[dict] = None,
                         run_state: Optional[dict] = None, model_dtype: Optional[torch.dtype] = None,
                         objects: Optional[dict] = None, master_key: Optional[str] = None,
                         optimizer_common: Optional[dict] = None, content_metadata: Optional[dict] = None,
                         writer=None) -> None:
    """Save with ``megatron.core.dist_checkpointing`` (torch_dist); collective over all ranks.

    The checkpoint stores global (TP-independent) tensors, so it loads at any TP size. ``master_key`` (with an
    optimizer): the float32 values are also written as the optimizer's masters
    ``optimizer.state.<master_key>.<key>``, and the model's tensors in ``model_dtype`` (e.g. bf16; default
    float32); the model is float32 again when this returns. ``optimizer_common``: see
    :func:`checkpoint_state_dict`. ``content_metadata``: megatron-core's record of how the state dict was built
    (e.g. ``distrib_optim_sharding_type``), which Megatron-LM's loader reads to build its own. ``writer``: called
    as ``writer(state_dict, ckpt_dir, content_metadata)`` in place of ``dist_checkpointing.save`` (the streamed
    growth's, whose model is on the ``meta`` device).
    """
    from growth_ds.interop.megatron_cpu import apply_cpu_patches

    apply_cpu_patches(seed=None)  # no-op with CUDA; on the CPU, the writer's CUDA calls
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    params = list(model.parameters())
    if master_key is None and model_dtype not in (None, torch.float32):
        master_key = "fp32_param"
    masters = {id(p): p.data for p in params} if master_key is not None and optimizer is not None else None
    for p in params if masters and model_dtype not in (None, torch.float32) else ():
        p.data = p.data.to(model_dtype)
    try:
        (writer or _megatron_save)(checkpoint_state_dict(model, optimizer, extra=extra, run_state=run_state,
                                                         masters=masters, objects=objects,
                                                         master_key=master_key or "fp32_param",
                                                         optimizer_common=optimizer_common), str(ckpt_dir),
                                   content_metadata)
    finally:
        for p in params if masters else ():
            p.data = masters[id(p)]


def _megatron_save(sd: dict, ckpt_dir: str, content_metadata: Optional[dict]) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sd, ckpt_dir, content_metadata=content_metadata)


def checkpoint_common(ckpt_dir) -> dict:
    """The common (non-sharded) part of a dist checkpoint; ``{}`` when it has no growth-ds entry."""
    from megatron.core import dist_checkpointing

    return dict(dist_checkpointing.load_common_state_dict(str(ckpt_dir)).get(COMMON_KEY) or {})


def checkpoint_shape(ckpt_dir) -> Optional[ModelShape]:
    common = checkpoint_common(ckpt_dir)
    return ModelShape.from_dict(common["shape"]) if common.get("shape") else None


def is_dist_checkpoint(path) -> bool:
    """True for a ``dist_checkpointing`` directory (it has ``metadata.json``)."""
    return Path(path).is_dir() and (Path(path) / "metadata.json").is_file()


_STATE_REQUEST = "growth_ds_optimizer_state"  # where load_dist_checkpoint asks for the per-parameter state


def load_dist_checkpoint(model, optimizer, ckpt_dir, *, check_shape: bool = True, step: Optional[int] = None) -> dict:
    """Load a dist checkpoint into ``model`` (and ``optimizer``) at the current TP size; returns its common dict.

    ``check_shape``: refuse, before any I/O of tensors, a checkpoint of another shape (megatron would
    refuse it too, with a global-shape mismatch on the first differing tensor). A grown shape cannot
    load a small checkpoint: grow it with :func:`growth_ds.interop.megatron_checkpoint.grow_dist_checkpoint`.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    common = checkpoint_common(ckpt_dir)
    shape = shape_of(model)
    if check_shape and common.get("shape"):
        saved = ModelShape.from_dict(common["shape"])
        if saved != shape:
            diff = {f: (getattr(saved, f), getattr(shape, f)) for f in saved.to_dict()
                    if getattr(saved, f) != getattr(shape, f)}
            raise ValueError(f"{ckpt_dir} holds a {saved.describe()} model but this model is {shape.describe()} "
                             f"(checkpoint vs model: {diff}); dist_checkpointing cannot load tensors into other global "
                             f"shapes. Load it at its own shape and grow it (grow_dist_checkpoint / growth-ds grow)")
    sd = {"model": model.sharded_state_dict()}
    if optimizer is not None:  # (the per-parameter state only, under a key of its own: the checkpoint's optimizer
        _ensure_adam_state(optimizer)  # entries may be another optimizer's, e.g. Megatron-LM's param groups)
        osd = optimizer.state_dict()
        id_map = get_param_id_to_sharded_param_map(sd["model"], _optimizer_params(optimizer))
        optim_state_to_sharding_state(osd, id_map, exclude_keys=("step",))
        sd[_STATE_REQUEST] = {"state": osd["state"]}
    loaded = dist_checkpointing.load(sd, str(ckpt_dir))
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        step = torch.tensor(float(common.get("step", 0) if step is None else step))
        state = loaded[_STATE_REQUEST]["state"]
        for st in state.values():
            st["step"] = step.clone()
        groups = optimizer.state_dict()["param_groups"]
        saved = (loaded.get("optimizer") or {}).get("param_groups") if common else None  # (growth-ds's own)
        if isinstance(saved, list) and len(saved) == len(groups):
            groups = [{**s, "params": g["params"]} for s, g in zip(saved, groups)]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    return common


#: where megatron-core's optimizers keep float32 masters: ``fp32_param`` (mixed-precision optimizer; the
#: distributed optimizer's ``fully_sharded_model_space``), ``param`` (distributed optimizer, ``fully_reshardable``)
MASTER_KEYS = ("fp32_param", "param")


def master_key_of(meta: dict) -> Optional[str]:
    """The name under which a checkpoint (``meta``: its ``load_tensors_metadata``) holds float32 masters
    (``optimizer.state.<name>.<key>``), or None."""
    for k in MASTER_KEYS:
        if any(m.startswith(f"optimizer.state.{k}.") for m in meta):
            return k
    return None


def load_fp32_masters(model, ckpt_dir, meta: Optional[dict] = None) -> bool:
    """Overwrite ``model``'s parameters with the optimizer's float32 masters (``optimizer.state.fp32_param.<key>``
    or ``optimizer.state.param.<key>``: :data:`MASTER_KEYS`) when the checkpoint holds them; returns whether it
    did. ``meta``: the checkpoint's ``load_tensors_metadata``, when the caller has read it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir)) if meta is None else meta
    key = master_key_of(meta)
    if key is None:
        return False
    params = list(model.parameters())
    state = {"state": {i: {key: torch.empty_like(p, dtype=torch.float32)} for i, p in enumerate(params)},
             "param_groups": [{"params": list(range(len(params)))}]}
    optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model.sharded_state_dict(), params))
    loaded = dist_checkpointing.load({"masters": state}, str(ckpt_dir))["masters"]["state"]
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(loaded[i][key])
    return True


def _model_dtype(meta: dict) -> torch.dtype:
    """The dtype a checkpoint's model tensors are stored in (``meta``: its ``load_tensors_metadata``)."""
    return meta["embedding.word_embeddings.weight"].dtype if "embedding.word_embeddings.weight" in meta \
        else torch.float32


# ---- process groups --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_model_parallel(tp: Optional[int] = None, seed: int = 1234) -> int:
    """Initialise ``torch.distributed`` (a 1-process gloo group when not launched by torchrun) and
    megatron's model parallelism at TP size ``tp`` (default: the world size); returns the TP size."""
    from megatron.core import parallel_state as ps

    from growth_ds.interop.megatron_cpu import apply_cpu_patches

    if not dist.is_initialized():
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
        else:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    tp = tp or dist.get_world_size()
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != tp:
            raise RuntimeError(f"model parallelism is initialised with TP={ps.get_tensor_model_parallel_world_size()},"
                               f" not {tp}")
    else:
        if dist.get_world_size() % tp:
            raise ValueError(f"--tp {tp} does not divide the world size {dist.get_world_size()}")
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    apply_cpu_patches(seed)
    return tp


def _adam_step_sites(tree):
    """``(dict, key)`` of every place a megatron-core optimizer's common entries keep Adam's step: each param
    group's ``step`` and the non-distributed optimizers' ``common_step``."""
    if not isinstance(tree, dict):
        return
    for k, v in tree.items():
        if k == "param_groups" and isinstance(v, list):
            yield from ((g, "step") for g in v if isinstance(g, dict) and "step" in g)
        elif k == "common_step":
            yield tree, k
        else:
            yield from _adam_step_sites(v)


def _adam_step(common: dict) -> int:
    """Adam's step count in a Megatron-LM checkpoint: where its optimizer keeps it (:func:`_adam_step_sites`),
    else the iteration (one step per iteration)."""
    steps = {int(node[k]) for node, k in _adam_step_sites(common.get("optimizer"))}
    if len(steps) > 1:
        raise ValueError(f"the checkpoint's optimizer disagrees with itself on Adam's step: {sorted(steps)}")
    return steps.pop() if steps else int(common.get("iteration") or 0)


__all__ = ["CHECKPOINT_FORMAT", "Entry", "GrownGPT", "MASTER_KEYS", "build_gpt_model", "checkpoint_common",
           "checkpoint_shape", "checkpoint_state_dict", "ensure_model_parallel", "ensure_tp_attributes",
           "forward_logits", "fuse_megatron", "gather_logits", "gather_tensor", "gelu_tanh", "grow_config",
           "grow_gpt_model", "is_dist_checkpoint", "layer_spec", "lm_loss", "load_dist_checkpoint",
           "load_fp32_masters", "load_reference_state", "master_key_of", "megatron_layout", "megatron_sources",
           "megatron_to_reference", "reference_to_megatron", "save_dist_checkpoint", "shape_of", "shard_spec_of",
           "split_megatron", "to_reference_state", "transformer_config"]

"""Grow a megatron-core ``torch_dist`` checkpoint one parameter at a time, never holding a whole model.

The in-memory executor (:func:`growth_ds.interop.megatron.grow_gpt_model`) loads a TP shard of the small model,
grows it and saves the grown one: each process holds its shard of both models and their Adam state. Here every
saved tensor of the grown checkpoint is *produced while the writer writes it*
(:mod:`growth_ds.interop.dist_stream`): for the grown parameter ``p`` and a kind (weight, float32 master,
``exp_avg``, ``exp_avg_sq``), the source parameter's tensor of that kind is read from the old checkpoint (the
blocks it is stored in, whatever TP / PP wrote them), grown with the same :class:`ShardGrower` the in-memory
executor runs, and cut into the chunks the grown checkpoint stores. A process holds one source parameter and
one grown parameter (plus their pieces) at a time.

Invariants:

* the checkpoint written equals, tensor for tensor and bit for bit, the in-memory executor's at TP =
  ``plan_tp`` (same keys, chunks tiling each global shape, dtypes, common state, objects);
* the keys, chunks and common state are megatron-core's own: they come from ``sharded_state_dict()`` of the
  grown ``GPTModel`` built on the ``meta`` device (TE names through its key map, SwiGLU's ``linear_fc1``
  factory, the layer axis) and from the same :func:`checkpoint_state_dict` the in-memory path saves;
* the work is spread over the ranks of the default group, one (parameter, kind) per rank at a time; ranks
  exchange nothing but DCP's plan.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from growth_ds.distributed.tensor_parallel import ShardGrower, ShardSpec, make_tp_plan, shard_axis, std_of_shards
from growth_ds.interop.dist_stream import ChunkReader, LazyChunk, object_bytes, save_streamed
from growth_ds.models.schema import parameter_schema
from growth_ds.ops.apply import source_name
from growth_ds.ops.plan import GrowthPlan
from growth_ds.shapes import ModelShape

MODEL = "model"  # the kind of a model weight; the optimizer's kinds are its state names (exp_avg, param, ...)
_OPT_PREFIX = "optimizer.state."


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def model_chunks(sharded_model: dict) -> Dict[Tuple[str, tuple], Tuple[str, object]]:
    """``{(key, global offset): (parameter name, ShardedTensor)}`` of a ``GPTModel``'s preprocessed sharded
    state dict (factories applied: SwiGLU's ``linear_fc1`` is two chunks of one parameter)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    out = {}
    for name, v in sharded_model.items():
        for sh in _leaves(v):
            if isinstance(sh, ShardedTensor):
                out[(sh.key, tuple(sh.global_offset))] = (name, sh)
    return out


def _param_block(sh) -> Tuple[tuple, tuple]:
    """Where a TP=1 ``ShardedTensor`` sits in its parameter: ``(offset, shape)`` without the layer axes (at
    TP = 1 a parameter's global layout is its local one)."""
    k = sh.prepend_axis_num
    return tuple(sh.global_offset[k:]), tuple(sh.local_shape)


def _meta_model(shape: ModelShape):
    from growth_ds.interop.megatron import build_gpt_model

    with torch.device("meta"):
        return build_gpt_model(shape, tp=1, perform_initialization=False)


class SourceParams:
    """Reads whole TP=1 parameters of the old checkpoint, of any kind, from wherever their blocks are stored.

    ``kind``: :data:`MODEL`, or an optimizer state name (``exp_avg``, ``exp_avg_sq``, ``param`` / ``fp32_param``
    for masters), stored under ``optimizer.state.<kind>.<model key>``."""

    def __init__(self, ckpt_dir, small: ModelShape):
        from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

        self.reader = ChunkReader(ckpt_dir)
        model = _meta_model(small)
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        sharded, _ = save_preprocess({"model": model.sharded_state_dict()}, validate_access_integrity=False)
        self.blocks: Dict[str, List] = {}
        for (key, off), (name, sh) in model_chunks(sharded["model"]).items():
            self.blocks.setdefault(name, []).append(sh)

    def check(self, kinds) -> None:
        """``ValueError`` naming the first stored tensor of ``kinds`` that is missing or of another global shape
        than the old shape's model has (before anything is written)."""
        stored = self.reader.metadata.state_dict_metadata
        for kind in kinds:
            for blocks in self.blocks.values():
                for sh in blocks:
                    key = sh.key if kind == MODEL else f"{_OPT_PREFIX}{kind}.{sh.key}"
                    md = stored.get(key)
                    if md is None or not hasattr(md, "size"):
                        raise ValueError(f"the checkpoint has no tensor {key!r}, which a model of the old shape "
                                         f"needs")
                    if tuple(md.size) != tuple(sh.global_shape):
                        raise ValueError(f"{key}: the checkpoint stores global shape {tuple(md.size)}, the old shape's "
                                         f"model has {tuple(sh.global_shape)}; the checkpoint is not of that shape")

    def read(self, name: str, kind: str) -> torch.Tensor:
        """The whole parameter ``name`` (TP=1 layout, the stored dtype)."""
        out = None
        for sh in self.blocks[name]:
            key = sh.key if kind == MODEL else f"{_OPT_PREFIX}{kind}.{sh.key}"
            k = sh.prepend_axis_num
            t = self.reader.read(key, sh.global_offset, (1,) * k + tuple(sh.local_shape)).reshape(sh.local_shape)
            if out is None:
                out = torch.empty(self.shapes[name], dtype=t.dtype)
            off, shape = _param_block(sh)
            out[tuple(slice(o, o + s) for o, s in zip(off, shape))] = t
        return out


class StreamedGrowth:
    """Produces the grown checkpoint's parameters one at a time (TP=1 layout, float32 before the write's cast).

    ``plan_tp``: the TP size whose block-diagonal plan is applied (:func:`make_tp_plan`), so the result equals
    the in-memory executor's at that TP size; each parameter is grown shard by shard in this process.
    ``values_kind``: where the old values are read (the float32 masters when the run has them)."""

    def __init__(self, source: SourceParams, plan: GrowthPlan, plan_tp: int, values_kind: str):
        from growth_ds.interop.megatron import megatron_layout, megatron_sources

        self.source, self.plan, self.values_kind = source, plan, values_kind
        self.tpp = make_tp_plan(plan, plan_tp)
        self.tp = plan_tp
        self.growers = [ShardGrower(self.tpp, r, None) for r in range(plan_tp)]
        self.small, self.grown = plan.small, self.tpp.plan.grown_shape
        self.old_layout, self.new_layout = megatron_layout(self.small), megatron_layout(self.grown)
        self.schema = parameter_schema(self.grown)
        self.src_of = megatron_sources(plan, self.grown)
        self._cache: Optional[Tuple[Tuple[str, str], torch.Tensor]] = None

    def tensor(self, name: str, kind: str) -> torch.Tensor:
        """Grown parameter ``name`` of ``kind`` (:data:`MODEL` / a master name: values; ``exp_avg`` /
        ``exp_avg_sq``: moments), float32, TP=1 layout. The last one is kept (a SwiGLU ``linear_fc1`` is
        written as two chunks)."""
        if self._cache is not None and self._cache[0] == (name, kind):
            return self._cache[1]
        from growth_ds.interop.megatron import fuse_megatron, split_megatron

        self._cache = None
        src = self.src_of[name]
        entry, old_entry = self.new_layout[name], self.old_layout[src]
        read_kind = self.values_kind if kind not in ("exp_avg", "exp_avg_sq") else kind
        full_old = self.source.read(src, read_kind).to(torch.float32)
        picks, specs = [], []  # per plan-TP rank: the old pieces of entry.refs, the new entry's shard layout
        for r in range(self.tp):
            old_spec = _spec(old_entry, r, self.tp)
            specs.append(_spec(entry, r, self.tp))
            parts = split_megatron(old_entry, old_spec.shard(full_old), self.small, old_spec)
            picks.append([parts[old_entry.refs.index(source_name(self.plan, ref))] for ref in entry.refs])
        del full_old
        shards = []
        for r, grower in enumerate(self.growers):
            if kind in ("exp_avg", "exp_avg_sq"):
                power = 1 if kind == "exp_avg" else 2
                grown = [grower.moment(ref, self.schema[ref], p, power) for ref, p in zip(entry.refs, picks[r])]
            else:
                grown = [grower.value(ref, self.schema[ref], p, full_std=self._full_std(ref, [q[j] for q in picks]))
                         for j, (ref, p) in enumerate(zip(entry.refs, picks[r]))]
            shards.append(fuse_megatron(entry, grown, self.grown, specs[r]))
        value = specs[0].unshard(shards) if self.tp > 1 else shards[0]
        self._cache = ((name, kind), value)
        return value

    def _full_std(self, ref: str, pieces: List[torch.Tensor]) -> Optional[float]:
        """The std of the whole old reference weight, as the in-memory executor's all-reduce gives it, for
        methods whose noise is relative to it (HyperCloning); None where the grower computes it from its own
        piece."""
        from growth_ds.ops.noise import needs_full_std

        spec = self.schema[ref]
        if self.tp == 1 or spec.role not in ("weight", "head") or shard_axis(spec) is None \
                or not needs_full_std(self.tpp.plan, spec):
            return None
        return std_of_shards(pieces)


def _spec(entry, rank: int, tp: int) -> ShardSpec:
    """Rank ``rank``'s TP shard layout of a megatron parameter (its local-spec ``Entry``) at TP = ``tp``."""
    dim, stride = entry.expect
    return ShardSpec(dim, stride if dim is not None else 1, rank, tp)


def _assign(groups: Dict[Tuple[str, str], int], world: int) -> Dict[Tuple[str, str], int]:
    """Each (parameter, kind) to one rank, largest first onto the least loaded (the same on every rank)."""
    load = [0] * world
    out = {}
    for g, n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        out[g] = r
        load[r] += n
    return out


def streamed_chunks(sharded: dict, growth: StreamedGrowth) -> Tuple[List[LazyChunk], Dict[str, bytes]]:
    """This rank's chunks and (on rank 0) every object of a preprocessed sharded state dict ``sharded`` of the
    grown model (``sharded["model"]`` names each chunk's parameter; ``optimizer.state.<kind>.<key>`` chunks
    are that parameter's optimizer state). Each chunk keeps the dtype of its ``meta`` tensor."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    owner = model_chunks(sharded["model"])
    items, objects = [], {}
    for leaf in _leaves(sharded):
        if isinstance(leaf, ShardedObject):
            objects[leaf.unique_key] = leaf
            continue
        if not isinstance(leaf, ShardedTensor):
            continue
        key, kind = leaf.key, MODEL
        if key.startswith(_OPT_PREFIX):
            kind, key = key[len(_OPT_PREFIX):].split(".", 1)
        found = owner.get((key, tuple(leaf.global_offset)))
        if found is None:
            raise RuntimeError(f"{leaf.key} at {tuple(leaf.global_offset)} is no chunk of a grown parameter")
        items.append((found[0], kind, leaf))
    sizes: Dict[Tuple[str, str], int] = {}
    for name, kind, leaf in items:
        sizes[(name, kind)] = sizes.get((name, kind), 0) + leaf.data.numel()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = _assign(sizes, world)
    seen, chunks = set(), []
    for name, kind, leaf in sorted(items, key=lambda t: (t[0], t[1], tuple(t[2].global_offset))):
        ident = (leaf.key, tuple(leaf.global_offset))
        if ident in seen:  # (a tied or repeated entry: written once)
            continue
        seen.add(ident)
        if mine[(name, kind)] != rank:
            continue
        k = leaf.prepend_axis_num
        off, shape = _param_block(leaf)
        block = tuple(slice(o, o + s) for o, s in zip(off, shape))
        dtype = leaf.data.dtype
        stored = (1,) * k + tuple(leaf.local_shape)

        def produce(name=name, kind=kind, block=block, dtype=dtype, stored=stored):
            return growth.tensor(name, kind)[block].to(dtype).reshape(stored).clone()

        chunks.append(LazyChunk(leaf.key, tuple(leaf.global_shape), tuple(leaf.global_offset), stored, dtype,
                                produce))
    objs = {k: object_bytes(o.data) for k, o in sorted(objects.items())} if rank == 0 else {}
    return chunks, objs


def write_streamed(sd: dict, ckpt_dir, content_metadata: Optional[dict], growth: StreamedGrowth) -> None:
    """Save ``sd`` (a sharded state dict of the grown model on the ``meta`` device, as
    :func:`growth_ds.interop.megatron.checkpoint_state_dict` builds it) with every tensor produced by
    ``growth`` while it is written: megatron-core's ``save`` minus the tensors in memory."""
    from megatron.core.dist_checkpointing.serialization import _CONTENT_METADATA_KEY
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    if content_metadata is not None:
        sd[_CONTENT_METADATA_KEY] = content_metadata
    sharded, common = save_preprocess(sd, validate_access_integrity=True)
    chunks, objects = streamed_chunks(sharded, growth)
    save_streamed(ckpt_dir, chunks, objects, common)


def meta_growth(ckpt_dir, plan: GrowthPlan, plan_tp: int, ours: dict, common: dict, with_optim: bool,
                values_kind: str):
    """The grown model and optimizer on the ``meta`` device, as the in-memory executor would build them (same
    parameter groups and hyperparameters, Adam's step under the plan's moment rule), and the writer that
    fills them from the old checkpoint ``ckpt_dir`` while saving. Returns ``(GrownGPT, writer)``.

    ``ours``: the old checkpoint's growth-ds entry (its param groups by name), ``common``: its common state
    dict; ``with_optim``: grow the optimizer state (per-parameter Adam state in the checkpoint);
    ``values_kind``: where the old values are stored (:data:`MODEL`, or the masters' name)."""
    from functools import partial

    from growth_ds.interop.megatron import GrownGPT, _adam_step

    source = SourceParams(ckpt_dir, plan.small)
    source.check([values_kind] + (["exp_avg", "exp_avg_sq"] if with_optim else []))
    growth = StreamedGrowth(source, plan, plan_tp, values_kind)
    model = _meta_model(growth.grown)
    optimizer, step = None, 0
    if with_optim:
        named = dict(model.named_parameters())
        if ours.get("param_groups"):
            saved = ((common.get("optimizer") or {}).get("param_groups") or [])
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in saved] \
                if len(saved) == len(ours["param_groups"]) else [{} for _ in ours["param_groups"]]
            group_of = {n: i for i, names in enumerate(ours["param_groups"]) for n in names}
            old_step = int(ours.get("step", 0))
            cls = getattr(torch.optim, ours.get("optimizer_class", "AdamW"))
        else:
            hyper, group_of, old_step, cls = [{}], None, _adam_step(common), torch.optim.AdamW
        groups = [dict(h, params=[]) for h in hyper]
        for name, src in growth.src_of.items():  # (each grown parameter joins its source's group)
            if group_of is not None and src not in group_of:
                raise ValueError(f"{src} is not in the optimizer; growth needs every parameter in it")
            groups[group_of[src] if group_of is not None else 0]["params"].append(named[name])
        optimizer = cls([g for g in groups if g["params"]])
        step = 0 if plan.moments == "reset" else old_step
        for p in named.values():
            optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.empty_like(p),
                                  "exp_avg_sq": torch.empty_like(p)}
    return (GrownGPT(model, optimizer, growth.tpp, growth.grown, step), partial(write_streamed, growth=growth))


__all__ = ["MODEL", "SourceParams", "StreamedGrowth", "meta_growth", "model_chunks", "streamed_chunks",
           "write_streamed"]

"""Transformer Engine's ``_extra_state`` objects, carried through a growth untouched.

A run on megatron-core's Transformer Engine layer spec saves, beside the tensors, one ``ShardedObject`` per TE
module (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``, ...): its ``get_extra_state()`` (FP8
scaling factors and amax history; an empty payload when FP8 is off). megatron-core stores the decoder's on the
global layer axis::

    key  decoder.layers.mlp.linear_fc1._extra_state     global_shape (L,)   one shard per layer, offset (l,)

(more axes after the layer axis where the module is itself stacked, e.g. experts). A TE model loading a
checkpoint asks for every one of them, so a grown checkpoint must hold them at the grown shape: layer ``i`` of
the grown stack takes the object of the old layer it was built from (``GrowthPlan.layers[i].source``); objects
outside the layer stack are copied as they are. Nothing is decoded: the payload is opaque.

Invariant: for every key, the written shards cover the new global shape exactly once (one main replica each),
so megatron-core's loader finds each layer's object at any TP x PP.
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, Sequence, Tuple

SUFFIX = "_extra_state"
LAYER_STACK = "decoder.layers."

#: ``{(key, global offset): (payload, global shape)}``
ExtraStates = Dict[Tuple[str, Tuple[int, ...]], Tuple[object, Tuple[int, ...]]]


def read_extra_states(ckpt_dir) -> ExtraStates:
    """Every ``*._extra_state`` object of a dist checkpoint, loaded (all shards, on the calling rank)."""
    return read_objects(ckpt_dir, lambda key: key.endswith(SUFFIX))


def read_objects(ckpt_dir, wanted: Callable[[str], bool]) -> ExtraStates:
    """Every ``ShardedObject`` of a dist checkpoint whose key is ``wanted``, loaded (all shards, on the calling
    rank), as ``{(key, global offset): (payload, global shape)}``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    meta = load_sharded_metadata(str(ckpt_dir))
    want = {}
    for obj in meta.values():
        if isinstance(obj, ShardedObject) and wanted(obj.key):
            want[(obj.key, tuple(obj.global_offset))] = tuple(obj.global_shape)
    if not want:
        return {}
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0  # (every rank reads all; one main replica per shard)
    request = {f"{k}@{i}": ShardedObject(k, None, shape, off, replica_id=rank)
               for i, ((k, off), shape) in enumerate(sorted(want.items()))}
    loaded = dist_checkpointing.load(request, str(ckpt_dir))
    return {(k, off): (loaded[f"{k}@{i}"], shape) for i, ((k, off), shape) in enumerate(sorted(want.items()))}


def regrid(states: ExtraStates, layer_sources: Sequence[int], n_old: int) -> ExtraStates:
    """The objects of the grown checkpoint: on the layer stack, new layer ``i`` takes old layer
    ``layer_sources[i]``'s object (its other axes unchanged); everything else as it was. ``ValueError`` when a
    layer-stack object's first axis is not the old depth ``n_old`` (a layout this function does not know)."""
    out: ExtraStates = {}
    n_new = len(layer_sources)
    for (key, off), (payload, shape) in states.items():
        if not key.startswith(LAYER_STACK):
            out[(key, off)] = (payload, shape)
            continue
        if not shape or shape[0] != n_old:
            raise ValueError(f"{key}: its first axis has {shape[0] if shape else 0} entries, not the checkpoint's "
                             f"{n_old} layers; cannot place it in the grown stack")
        for i, src in enumerate(layer_sources):
            if src == off[0]:
                out[(key, (i,) + tuple(off[1:]))] = (payload, (n_new,) + tuple(shape[1:]))
    for key in {k for k, _ in out}:  # every shard of every key present exactly once
        shape = next(s for (k, _), (_, s) in out.items() if k == key)
        have = {o for k, o in out if k == key}
        missing = [o for o in itertools.product(*map(range, shape)) if o not in have]
        if missing:
            raise ValueError(f"{key}: the checkpoint lacks the extra state at offsets {missing[:4]}")
    return out


def sharded_objects(states: ExtraStates, write: bool) -> dict:
    """``ShardedObject``s to add to a sharded state dict being saved: on the rank with ``write`` every shard is
    the main replica (``replica_id`` 0), on the others a replica (each shard is written once). They replace
    the saved model's own objects of the same keys (megatron-core's local linear layers declare an empty
    ``_extra_state`` of their own)."""
    from megatron.core.dist_checkpointing import ShardedObject

    return {f"{key}/{'_'.join(map(str, off))}": ShardedObject(key, payload, shape, off, replica_id=0 if write else 1)
            for (key, off), (payload, shape) in sorted(states.items())}


__all__ = ["ExtraStates", "read_extra_states", "read_objects", "regrid", "sharded_objects"]

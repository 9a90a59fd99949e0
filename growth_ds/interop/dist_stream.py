"""Read and write megatron-core ``torch_dist`` checkpoints one tensor chunk at a time.

Placement and I/O only (no growth math): :class:`ChunkReader` reads any block of a saved tensor, and
:func:`save_streamed` writes a checkpoint whose tensors are *produced* while the writer writes them, so a
process holds one chunk (plus whatever its producer needs) at a time, never the whole state dict.

The layout written is the one ``megatron.core.dist_checkpointing.save`` writes with its default
``torch_dist`` strategy, and megatron-core's loader reads it at any TP / PP:

* ``common.pt``: the non-sharded state (``torch.save``, by rank 0);
* torch DCP's ``.metadata`` and ``__<rank>_0.distcp`` files: every ``ShardedTensor`` under its key as a chunk
  ``(global offset, local shape)`` of its global shape; every ``ShardedObject`` as bytes under its
  ``unique_key`` (``torch.save([data])``, as megatron-core packs them);
* ``metadata.json``: the backend and version (``torch_dist``, 1), written last.

Both functions run on every rank of the default process group (the DCP plan is collective); the chunks a
rank writes and the reads it does are its own, with no collective between them.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan,
                                                  TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


@dataclass
class LazyChunk:
    """One chunk of a saved tensor, computed when the writer reaches it.

    ``key``: the checkpoint key; ``global_shape`` / ``offset`` / ``shape``: where the chunk lies in the global
    tensor (the same rank as the global shape); ``dtype``: as stored; ``produce()``: returns the chunk
    (``shape``, ``dtype``, on the CPU)."""

    key: str
    global_shape: tuple
    offset: tuple
    shape: tuple
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


class _LazySavePlanner(DefaultSavePlanner):
    """A DCP save planner whose tensors are produced on demand (``resolve_data``), one at a time."""

    def __init__(self, chunks: Sequence[LazyChunk], objects: Dict[str, bytes]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, tuple(c.offset)): c for c in chunks}
        if len(self._chunks) != len(chunks):
            raise ValueError("two chunks with the same key and offset")
        self._objects = objects

    def create_local_plan(self) -> SavePlan:
        items = []
        for c in self._chunks.values():
            if tuple(c.shape) != tuple(int(s) for s in c.shape) or len(c.shape) != len(c.global_shape):
                raise ValueError(f"{c.key}: chunk shape {c.shape} against global shape {c.global_shape}")
            props = TensorProperties.create_from_tensor(torch.empty(0, dtype=c.dtype))
            items.append(WriteItem(index=MetadataIndex(c.key, torch.Size(c.offset)), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(
                                       chunk=ChunkStorageMetadata(offsets=torch.Size(c.offset),
                                                                  sizes=torch.Size(c.shape)),
                                       properties=props, size=torch.Size(c.global_shape))))
        for k in self._objects:
            items.append(WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[write_item.index.fqn])
        c = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        t = c.produce()
        if tuple(t.shape) != tuple(c.shape) or t.dtype != c.dtype:
            raise RuntimeError(f"{c.key} at {tuple(c.offset)}: produced {tuple(t.shape)} {t.dtype}, the plan "
                               f"says {tuple(c.shape)} {c.dtype}")
        return t.contiguous()


def object_bytes(data) -> bytes:
    """A ``ShardedObject``'s payload as megatron-core's ``torch_dist`` strategy stores it."""
    buf = io.BytesIO()
    torch.save([data], buf)
    return buf.getvalue()


def save_streamed(ckpt_dir, chunks: Sequence[LazyChunk], objects: Dict[str, bytes], common: Optional[dict]) -> None:
    """Write a ``torch_dist`` checkpoint: this rank's ``chunks`` (each produced when written), ``objects``
    (``{unique_key: bytes}``, :func:`object_bytes`) and, from rank 0, ``common`` (the non-sharded state dict).

    Collective over the default group. The chunks of all ranks together must tile every key's global shape
    exactly once (checked by DCP's global plan before anything is produced)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        torch.save(common or {}, ckpt_dir / COMMON_STATE_FNAME)
    writer = FileSystemWriter(str(ckpt_dir), single_file_per_rank=True, thread_count=1)
    torch.distributed.checkpoint.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, objects))
    if rank0:
        save_config(CheckpointingConfig("torch_dist", 1), str(ckpt_dir))
    if dist.is_initialized():
        dist.barrier()


class _ChunkLoadPlanner(LoadPlanner):
    """Reads the blocks ``{key: (offset, destination tensor)}`` of a DCP checkpoint (any stored chunking)."""

    def __init__(self, requests: Dict[str, tuple], objects: Optional[Dict[str, bytes]] = None):
        self.requests, self.objects = requests, objects

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key in self.objects or ():
            if not isinstance(self.metadata.state_dict_metadata.get(key), BytesStorageMetadata):
                raise KeyError(f"{key} is not an object of the checkpoint")
            items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(key),
                                  dest_offsets=torch.Size(()), storage_index=MetadataIndex(key),
                                  storage_offsets=torch.Size(()), lengths=torch.Size(())))
        for key, (offset, dest) in self.requests.items():
            md = self.metadata.state_dict_metadata.get(key)
            if md is None:
                raise KeyError(f"{key} is not in the checkpoint")
            if len(md.size) != dest.dim() or any(o + s > g for o, s, g in zip(offset, dest.shape, md.size)):
                raise ValueError(f"{key}: block at {tuple(offset)} of shape {tuple(dest.shape)} is outside its "
                                 f"global shape {tuple(md.size)}")
            items += create_read_items_for_chunk_list(
                key, md, [ChunkStorageMetadata(offsets=torch.Size(offset), sizes=dest.shape)])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: List[LoadPlan]) -> List[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        self.objects[read_item.dest_index.fqn] = value.read()

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.requests[read_item.dest_index.fqn][1]
        for d, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(d, int(o), int(n))
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class ChunkReader:
    """Reads blocks of the tensors of one ``torch_dist`` checkpoint, on this rank alone (no collective).

    ``metadata``: DCP's metadata (read once); :meth:`read` returns a new tensor of the stored dtype."""

    def __init__(self, ckpt_dir):
        self.reader = FileSystemReader(str(ckpt_dir))
        self.metadata = self.reader.read_metadata()
        self.reader.read_metadata = lambda *a, **k: self.metadata  # (once per checkpoint, not per block)

    def global_shape(self, key: str) -> tuple:
        md = self.metadata.state_dict_metadata.get(key)
        if md is None:
            raise KeyError(f"{key} is not in the checkpoint")
        return tuple(md.size)

    def object_keys(self) -> List[str]:
        """The unique keys of the checkpoint's ``ShardedObject``\ s."""
        return sorted(k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))

    def read_objects(self, keys: Sequence[str]) -> Dict[str, bytes]:
        """``{unique key: stored bytes}`` (as :func:`object_bytes` makes them) of the objects ``keys``."""
        got: Dict[str, bytes] = {k: b"" for k in keys}
        self._load(_ChunkLoadPlanner({}, got))
        return got

    def _load(self, planner) -> None:
        torch.distributed.checkpoint.load({}, storage_reader=self.reader, planner=planner, no_dist=True)

    def read(self, key: str, offset: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        md = self.metadata.state_dict_metadata.get(key)
        if md is None:
            raise KeyError(f"{key} is not in the checkpoint")
        dest = torch.empty(tuple(shape), dtype=md.properties.dtype)
        self._load(_ChunkLoadPlanner({key: (tuple(offset), dest)}))
        return dest


def checkpoint_diff(a, b, common: bool = True) -> List[str]:
    """What differs between two ``torch_dist`` checkpoints, as readable lines (empty: identical): keys present in
    one only, tensors of another dtype or other bits (read whole, one at a time), objects, and with ``common``
    the non-sharded state (compared by ``repr``)."""
    ra, rb = ChunkReader(a), ChunkReader(b)
    ka, kb = set(ra.metadata.state_dict_metadata), set(rb.metadata.state_dict_metadata)
    out = [f"key {k} in {'the first' if k in ka else 'the second'} only" for k in sorted(ka ^ kb)]
    for k in sorted(ka & kb):
        md = ra.metadata.state_dict_metadata[k]
        if hasattr(md, "size"):
            zero = (0,) * len(md.size)
            x, y = ra.read(k, zero, md.size), rb.read(k, zero, md.size)
            if x.dtype != y.dtype or not torch.equal(x, y):
                out.append(f"tensor {k}")
    if ra.read_objects(ra.object_keys()) != rb.read_objects(rb.object_keys()):
        out.append("objects")
    if common:
        from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

        ca, cb = (torch.load(Path(d) / COMMON_STATE_FNAME, weights_only=False) for d in (a, b))
        if repr(ca) != repr(cb):
            out.append("common state")
    return out


__all__ = ["ChunkReader", "LazyChunk", "checkpoint_diff", "object_bytes", "save_streamed"]

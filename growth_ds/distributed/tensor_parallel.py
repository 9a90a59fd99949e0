"""Tensor-parallel growth as pure math: TP-aware plans and a per-rank shard executor.

Megatron-style tensor parallelism (TP) over ``tp`` ranks splits, inside every decoder layer, the
``ffn``, ``heads`` and ``kv`` spaces into ``tp`` contiguous blocks (rank ``r`` holds units
``[r * d / tp, (r + 1) * d / tp)``; query heads follow their kv group, so a rank holds whole
groups), and the ``vocab`` space of the embedding / output layer likewise. ``model`` and ``pos``
are replicated.

A growth plan (:func:`growth_ds.ops.make_plan`) maps each space with a sparse :class:`SpaceMap`.
:func:`make_tp_plan` derives the equivalent *TP-aware* plan: its ``ffn``, ``heads`` and ``kv`` maps
are block-diagonal over the ranks (every new unit of rank ``r``'s block copies an old unit of rank
``r``'s block, or is new), so each rank builds its shard of every grown tensor from its own shard
of the old one, with no communication. ``model`` (replicated) is grown identically on every rank.
Unit order inside a space is free, so the TP-aware plan is found as follows, per space:

* ``identity`` / ``block`` -- the map already is block-diagonal: kept.
* ``permuted`` -- the new units can be reordered into blocks (every rank's old units have exactly
  ``new / tp`` copies plus new units between them): the TP-aware map is the original map with its
  new units permuted by ``TPPlan.perm[space]``. Deterministic parts of the grown tensors then equal
  the original plan's up to that permutation of their sharded axis; random parts (LEMON and
  HyperCloning fan-in noise, new units of ``zero``) are drawn per position, so they differ in value
  but keep the same law and the same exactness.
* ``per-rank`` -- otherwise (uneven copy counts, e.g. ``duplicate``/``lemon`` with a non-integer
  ``d_ffn`` ratio): the method's own rule is applied inside every rank's block (circular copies of the
  rank's units; ``head_maps`` on the rank's groups). Still exact, but not a permutation of the
  ``tp = 1`` plan.

Refused (``ValueError``): sizes not divisible by ``tp`` (``d_ffn``, ``n_heads``, ``n_kv_heads``,
``vocab_size``, old and new) -- in particular ``n_kv_heads % tp != 0``, where megatron splits a query
group over ranks -- and a sharded-space map with no block-diagonal equivalent (a map whose copies
mix units of different ranks in a way no reordering fixes), which would need an all-to-all of the
mixed units. HyperCloning's noise is relative to the std of the *whole* old weight: that is the one
case that communicates, two scalar all-reduces per sharded weight (``reduce_sum``).

The executor (:class:`ShardGrower`) applies the reference math of :mod:`growth_ds.ops.apply` to a
rank's shard with the rank's block of each map; random parts are drawn exactly as the reference
draws them for the whole tensor (keyed by seed and parameter name) and sliced, so
``gather(grow_shard(shards)) == grow(gathered)`` under the TP-aware plan.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from growth_ds.models.schema import ParamSpec
from growth_ds.ops.apply import grow_moment, grow_value, is_identity_block
from growth_ds.ops.noise import needs_full_std, noise_window
from growth_ds.ops.roles import param_axes
from growth_ds.ops.plan import GrowthPlan
from growth_ds.ops.spaces import SpaceMap, circular_map, head_maps, space_from_src
from growth_ds.shapes import ModelShape

#: spaces split over TP ranks inside a decoder layer (grown block-diagonally)
LAYER_SHARDED = ("ffn", "heads", "kv")
#: all spaces split over TP ranks (vocab: vocab-parallel embedding and output layer; never grows)
SHARDED_SPACES = LAYER_SHARDED + ("vocab",)

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``; ``ValueError`` naming ``what`` when it does not divide."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def check_tp_shape(shape: ModelShape, tp: int, label: str = "shape") -> None:
    """Raise ``ValueError`` if ``shape`` cannot be laid out over ``tp`` ranks without splitting a unit.

    Needs ``tp`` to divide ``d_ffn``, ``n_heads``, ``n_kv_heads`` (whole query groups per rank) and
    ``vocab_size``.
    """
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer, got {tp!r}")
    for name in ("d_ffn", "n_heads", "n_kv_heads", "vocab_size"):
        value = getattr(shape, name)
        if value % tp:
            extra = (" (megatron would split a query group over ranks and all-gather the fused QKV; "
                     "choose n_kv_heads as a multiple of the TP size)" if name == "n_kv_heads" else "")
            raise ValueError(f"{label}.{name} ({value}) is not divisible by the tensor-parallel size ({tp}){extra}")


@dataclass(frozen=True)
class ShardSpec:
    """Where a TP shard sits in its full tensor (megatron's ``partition_dim``/``partition_stride``).

    ``partition_dim`` None: replicated on every rank. Otherwise the full tensor is ``stride`` equal
    pieces along ``partition_dim``, each split contiguously over ranks, and rank ``r`` holds
    ``cat(piece_0[r], ..., piece_{stride-1}[r])`` (megatron's gated fc1 is ``stride = 2``:
    ``[gate_r; up_r]``).
    """

    partition_dim: Optional[int]
    stride: int = 1
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def replicated(self) -> bool:
        return self.partition_dim is None

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``full`` (a view when ``stride == 1``)."""
        if self.replicated or self.tp_size == 1:
            return full
        pieces = full.chunk(self.stride, dim=self.partition_dim)
        mine = [p.chunk(self.tp_size, dim=self.partition_dim)[self.tp_rank] for p in pieces]
        return mine[0] if len(mine) == 1 else torch.cat(mine, dim=self.partition_dim)

    def unshard(self, shards: List[torch.Tensor]) -> torch.Tensor:
        """Full tensor from every rank's shard (``shards[r]`` from rank ``r``)."""
        if self.replicated or self.tp_size == 1:
            return shards[0]
        split = [s.chunk(self.stride, dim=self.partition_dim) for s in shards]
        return torch.cat([split[r][k] for k in range(self.stride) for r in range(self.tp_size)],
                         dim=self.partition_dim)


def shard_axis(spec: ParamSpec) -> Optional[int]:
    """Axis of a reference parameter that TP splits (``ffn``/``heads``/``kv``/``vocab``), else None."""
    for axis, space in enumerate(spec.axes):
        if space in SHARDED_SPACES:
            return axis
    return None


def reference_shard_spec(spec: ParamSpec, tp: int, rank: int) -> ShardSpec:
    """Contiguous split of a reference parameter over ``tp`` ranks along :func:`shard_axis`."""
    return ShardSpec(shard_axis(spec), 1, rank, tp)


# ---- TP-aware plans --------------------------------------------------------------------------------
def permute_map(m: SpaceMap, perm: torch.Tensor) -> SpaceMap:
    """The map whose new coordinate ``i`` is ``m``'s new coordinate ``perm[i]`` (copy indices travel along)."""
    pick = lambda t: None if t is None else t[perm].clone()  # noqa: E731
    return SpaceMap(m.name, m.old, m.new, pick(m.src), pick(m.out_coef), pick(m.in_coef), m.residue, pick(m.copy),
                    m.n_copies, m.norm_scale, m.eps_scale)


def is_block_diagonal(m: SpaceMap, tp: int) -> bool:
    """Every new coordinate of block ``r`` copies an old coordinate of block ``r`` (or is new)."""
    return _src_block_diagonal(m.src, m.old, tp)


def _src_block_diagonal(src: torch.Tensor, old: int, tp: int) -> bool:
    new = src.numel()
    if old % tp or new % tp:
        return False
    blk_new = torch.arange(new) // (new // tp)
    return bool(((src < 0) | (src // (old // tp) == blk_new)).all())


def _block_permutation(src: torch.Tensor, old: int, tp: int) -> Optional[torch.Tensor]:
    """Order of new units (``src[i]``: old unit or -1) that puts the copies of rank ``r``'s old units,
    topped up with new units, in block ``r``; None when some rank's units have too many copies."""
    new = src.numel()
    per_old, per_new = old // tp, new // tp
    own: List[List[int]] = [[] for _ in range(tp)]
    free: List[int] = []
    for i, s in enumerate(src.tolist()):
        (free if s < 0 else own[s // per_old]).append(i)
    order: List[int] = []
    for r in range(tp):
        if len(own[r]) > per_new:
            return None
        need = per_new - len(own[r])
        order += own[r] + free[:need]
        free = free[need:]
    return torch.tensor(order, dtype=torch.long)


def _units(m: SpaceMap, unit: int) -> torch.Tensor:
    """Unit-level source of a coordinate map built by ``expand_units(unit)`` (``ValueError`` otherwise)."""
    src = m.src.view(-1, unit)
    head = src[:, :1]
    expect = torch.where(head >= 0, head + torch.arange(unit), torch.full((unit,), -1, dtype=torch.long))
    if not torch.equal(src, expect) or bool((head[head >= 0] % unit).any()):
        raise ValueError(f"{m.name}: the map splits heads (coordinates of one head copy different heads); a TP "
                         f"rank could not hold whole heads")
    return torch.where(head[:, 0] >= 0, head[:, 0] // unit, head[:, 0])


def _expand(perm_units: torch.Tensor, unit: int) -> torch.Tensor:
    return (perm_units[:, None] * unit + torch.arange(unit)).reshape(-1)


def _offset_src(local_src: List[torch.Tensor], per_old: int) -> torch.Tensor:
    return torch.cat([torch.where(s >= 0, s + r * per_old, s) for r, s in enumerate(local_src)])


def _per_rank_ffn(m: SpaceMap, tp: int) -> SpaceMap:
    """``m``'s rule inside every rank's block: circular copies (all new units copy) of the rank's units."""
    if bool((m.src < 0).any()):
        raise ValueError(f"ffn: the map has new units and copies that no reordering puts on the rank that owns "
                         f"their source; growing it under TP={tp} would need an all-to-all of the copied units")
    d, D = m.old // tp, m.new // tp
    local = circular_map("ffn", d, D)
    built = space_from_src("ffn", m.old, _offset_src([local.src] * tp, d), m.residue)
    return built


def _per_rank_heads(plan: GrowthPlan, tp: int):
    """``head_maps`` on every rank's groups (same mode as the plan's), at head level, offset per rank."""
    small, large = plan.small, plan.large
    hd = small.head_dim
    kv_units = _units(plan.spaces["kv"], hd)
    mode = "copy" if bool((kv_units >= 0).all()) else "extend"
    try:
        q_src, kv_src = head_maps(small.n_heads // tp, small.n_kv_heads // tp, large.n_heads // tp,
                                  large.n_kv_heads // tp, mode)
    except ValueError as e:
        raise ValueError(f"heads/kv: growing {small.n_heads}/{small.n_kv_heads} -> {large.n_heads}/{large.n_kv_heads} "
                         f"heads rank-locally under TP={tp} is impossible ({e}); it would need an all-to-all of "
                         f"attention heads between ranks") from None
    heads = space_from_src("heads", small.n_heads, _offset_src([q_src] * tp, small.n_heads // tp),
                           plan.spaces["heads"].residue).expand_units(hd)
    kv = space_from_src("kv", small.n_kv_heads, _offset_src([kv_src] * tp, small.n_kv_heads // tp),
                        plan.spaces["kv"].residue).expand_units(hd)
    return heads, kv


@dataclass
class TPPlan:
    """A TP-aware plan and how it relates to the plan it was derived from.

    ``plan``: an ordinary :class:`GrowthPlan` (the reference executor applies it to full tensors)
    whose ``ffn``, ``heads`` and ``kv`` maps are block-diagonal over ``tp`` ranks.
    ``how[space]``: ``identity`` | ``block`` | ``permuted`` | ``per-rank`` (see the module docstring).
    ``perm[space]`` (coordinate level, ``[new]``): ``plan.spaces[s] == permute_map(source.spaces[s], perm)``
    for ``identity``/``block``/``permuted`` spaces; None for ``per-rank`` ones.
    """

    plan: GrowthPlan
    tp: int
    source: GrowthPlan
    how: Dict[str, str] = field(default_factory=dict)
    perm: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)

    @property
    def is_permutation(self) -> bool:
        """True when the TP-aware plan is the source plan up to a reordering of new units."""
        return all(p is not None for p in self.perm.values())

    def describe(self) -> str:
        return f"TP-aware plan for TP={self.tp}: " + ", ".join(f"{s}: {h}" for s, h in self.how.items())


def make_tp_plan(plan: GrowthPlan, tp: int) -> TPPlan:
    """Derive the TP-aware plan of ``plan`` for ``tp`` ranks (pure; see the module docstring).

    A plan that is block-diagonal for ``tp`` ranks is block-diagonal for every divisor of ``tp``.
    Raises ``ValueError`` (naming the field) for the growths that cannot be done rank-locally.
    """
    check_tp_shape(plan.small, tp, "small")
    check_tp_shape(plan.large, tp, "large")
    hd = plan.small.head_dim
    spaces = dict(plan.spaces)
    how: Dict[str, str] = {}
    perm: Dict[str, Optional[torch.Tensor]] = {}

    # ffn: units are coordinates
    m = plan.spaces["ffn"]
    if m.is_identity:
        how["ffn"], perm["ffn"] = "identity", torch.arange(m.new)
    elif is_block_diagonal(m, tp):
        how["ffn"], perm["ffn"] = "block", torch.arange(m.new)
    else:
        p = _block_permutation(m.src, m.old, tp)
        if p is not None:
            spaces["ffn"], how["ffn"], perm["ffn"] = permute_map(m, p), "permuted", p
        else:
            spaces["ffn"], how["ffn"], perm["ffn"] = _per_rank_ffn(m, tp), "per-rank", None

    # heads and kv: whole kv groups move together with their query heads
    q, kv = plan.spaces["heads"], plan.spaces["kv"]
    if q.is_identity and kv.is_identity:
        for s in ("heads", "kv"):
            how[s], perm[s] = "identity", torch.arange(plan.spaces[s].new)
    elif is_block_diagonal(q, tp) and is_block_diagonal(kv, tp):
        for s in ("heads", "kv"):
            how[s], perm[s] = "block", torch.arange(plan.spaces[s].new)
    else:
        kv_units, q_units = _units(kv, hd), _units(q, hd)
        g2 = plan.large.n_heads // plan.large.n_kv_heads
        pk = _block_permutation(kv_units, plan.small.n_kv_heads, tp)
        pq = None if pk is None else (pk[:, None] * g2 + torch.arange(g2)).reshape(-1)
        if pq is not None and _src_block_diagonal(q_units[pq], plan.small.n_heads, tp):
            spaces["heads"], spaces["kv"] = permute_map(q, _expand(pq, hd)), permute_map(kv, _expand(pk, hd))
            for s, p in (("heads", pq), ("kv", pk)):
                how[s], perm[s] = "permuted", _expand(p, hd)
        else:
            spaces["heads"], spaces["kv"] = _per_rank_heads(plan, tp)
            for s in ("heads", "kv"):
                how[s], perm[s] = "per-rank", None

    for s in LAYER_SHARDED:  # internal invariant: everything above is block-diagonal
        assert is_block_diagonal(spaces[s], tp), s
    return TPPlan(dataclasses.replace(plan, spaces=spaces), tp, plan, how, perm)


def permute_like(tpp: TPPlan, spec: ParamSpec, full: torch.Tensor) -> torch.Tensor:
    """Reorder a tensor grown with ``tpp.source`` into the unit order of ``tpp.plan`` (needs a permutation)."""
    out = full
    for axis, space in enumerate(spec.axes):
        if space in LAYER_SHARDED:
            p = tpp.perm[space]
            if p is None:
                raise ValueError(f"{space}: the TP-aware plan is built per rank, not a permutation of the source plan")
            out = out.index_select(axis, p)
    return out


# ---- the per-rank executor -------------------------------------------------------------------------
def block(n: int, tp: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous block of ``n`` coordinates."""
    k = n // tp
    return slice(rank * k, (rank + 1) * k)


def local_map(m: SpaceMap, tp: int, rank: int) -> SpaceMap:
    """Rank ``rank``'s diagonal block of a block-diagonal map, indexed locally (``old/tp -> new/tp``)."""
    if tp == 1:
        return m
    if not is_block_diagonal(m, tp):
        raise ValueError(f"{m.name}: the map is not block-diagonal over {tp} ranks; derive it with make_tp_plan")
    d = m.old // tp
    sl = block(m.new, tp, rank)
    src = m.src[sl]
    src = torch.where(src >= 0, src - rank * d, src)
    pick = lambda t: None if t is None else t[sl].clone()  # noqa: E731
    return SpaceMap(m.name, d, m.new // tp, src, pick(m.out_coef), pick(m.in_coef), m.residue, pick(m.copy),
                    m.n_copies, m.norm_scale, m.eps_scale)


def local_plan(plan: GrowthPlan, tp: int, rank: int) -> GrowthPlan:
    """``plan`` with every sharded space replaced by rank ``rank``'s block and no random parts.

    The reference executor applied to a rank's shards with this plan gives the deterministic part of
    the rank's grown shards; :class:`ShardGrower` adds the random part.
    """
    spaces = dict(plan.spaces)
    for s in SHARDED_SPACES:
        spaces[s] = local_map(plan.spaces[s], tp, rank)
    return dataclasses.replace(plan, spaces=spaces, noise="none", noise_std=0.0, random_std=0.0)


def sharded_std(local: torch.Tensor, reduce_sum: Optional[ReduceSum]) -> float:
    """Unbiased std of the full tensor whose shards are ``local`` on every rank (two scalar reductions)."""
    x = local.detach().to(torch.float64)
    if reduce_sum is None:
        return float(x.std())
    stats = reduce_sum(torch.tensor([float(x.numel()), float(x.sum())], dtype=torch.float64))
    n, mean = float(stats[0]), float(stats[1] / stats[0])
    sq = reduce_sum(((x - mean) ** 2).sum().reshape(1))
    return math.sqrt(float(sq[0]) / (n - 1))


def std_of_shards(pieces: List[torch.Tensor]) -> float:
    """:func:`sharded_std` of the full tensor whose TP shards are ``pieces`` (rank order), computed in one process
    with the same two reductions summed in rank order: what every rank of the TP group would get."""
    xs = [p.detach().to(torch.float64) for p in pieces]
    stats = sum(torch.tensor([float(x.numel()), float(x.sum())], dtype=torch.float64) for x in xs)
    n, mean = float(stats[0]), float(stats[1] / stats[0])
    sq = sum(((x - mean) ** 2).sum().reshape(1) for x in xs)
    return math.sqrt(float(sq[0]) / (n - 1))


class ShardGrower:
    """Grows one TP rank's shards of reference-named parameters and Adam moments.

    Args:
        tpp: the TP-aware plan (:func:`make_tp_plan`).
        rank: this rank's index in the TP group.
        reduce_sum: in-place-or-returning sum over the TP group of a small float64 tensor; used only
            by HyperCloning's relative noise (the std of the whole old weight). None at ``tp == 1``.

    Shards are contiguous blocks along :func:`shard_axis`; every other axis is full. A shard
    ``w_local`` of the *source* parameter (``source_name(plan, name)``) grows into the shard of the
    new parameter ``name``: ``value(name, spec, w_local)`` is bit-identical to
    ``reference_shard_spec(spec).shard(grow_value(tpp.plan, name, spec, w_full))``.
    """

    def __init__(self, tpp: TPPlan, rank: int, reduce_sum: Optional[ReduceSum] = None):
        if not 0 <= rank < tpp.tp:
            raise ValueError(f"rank {rank} outside the tensor-parallel group of size {tpp.tp}")
        self.tpp, self.plan, self.tp, self.rank = tpp, tpp.plan, tpp.tp, rank
        self.local = local_plan(tpp.plan, tpp.tp, rank)
        self.reduce_sum = reduce_sum

    def value(self, name: str, spec: ParamSpec, w_local: torch.Tensor, *, full_std: Optional[float] = None
              ) -> torch.Tensor:
        """This rank's shard of grown parameter ``name`` from its shard ``w_local`` of the source parameter.

        ``full_std`` overrides the std of the whole source weight (HyperCloning), skipping the reduction.
        """
        x = grow_value(self.local, name, spec, w_local.to(torch.float64))
        if spec.role in ("weight", "head") and not (spec.residual_out and is_identity_block(self.plan, name)):
            x = x + self._noise(name, spec, w_local, full_std)
        return x.to(w_local.dtype)

    def moment(self, name: str, spec: ParamSpec, m_local: torch.Tensor, power: int) -> torch.Tensor:
        """This rank's shard of the grown ``exp_avg`` (power 1) or ``exp_avg_sq`` (power 2)."""
        return grow_moment(self.local, name, spec, m_local, power)

    def _noise(self, name: str, spec: ParamSpec, w_local: torch.Tensor, full_std: Optional[float]
               ) -> torch.Tensor:
        """The window of the reference's random part ``N`` that lies in this rank's shard (float64). A
        TP-aware plan keeps every copy of an input unit on one rank, so the zero-sum window is local."""
        plan = self.plan
        if full_std is None and needs_full_std(plan, spec):
            sharded = shard_axis(spec) is not None and self.tp > 1
            if sharded and self.reduce_sum is None:
                raise RuntimeError(f"{name}: the random part is relative to the std of the whole weight "
                                   f"(hypercloning, relative fan-in); pass reduce_sum (a sum over the TP group) "
                                   f"or full_std")
            full_std = sharded_std(w_local, self.reduce_sum if sharded else None)
        (b_space, _), (a_space, _) = param_axes(spec)
        b, a = plan.spaces[b_space], plan.spaces[a_space]
        axis = shard_axis(spec)
        rows = block(b.new, self.tp, self.rank) if axis == 0 else slice(0, b.new)
        cols = block(a.new, self.tp, self.rank) if axis == 1 else slice(None)
        return noise_window(plan, name, spec, rows, cols, full_std)

__all__ = ["LAYER_SHARDED", "SHARDED_SPACES", "ShardSpec", "TPPlan", "ShardGrower", "block", "check_tp_shape",
           "divide", "is_block_diagonal", "local_map", "local_plan", "make_tp_plan", "permute_like", "permute_map",
           "reference_shard_spec", "shard_axis", "sharded_std", "std_of_shards"]

"""ZeRO-sharded growth: every rank grows its own DeepSpeed partitions, no gather.

Part one is pure index math in this process: which old elements feed a range of a new parameter, exact
random slices, the bucket schedule, and piecewise growth equal to ``growth_ds.ops.grow`` bit for bit.

Part two runs ``tests/zero_worker.py`` under torchrun (gloo, CPU) at world sizes 2, 4, 1 and 3, ZeRO 1/2/3
(and ZeRO-Offload), once per module (fixture ``runs``), plus an offline growth of a ZeRO checkpoint into a
universal one and a job whose rank is SIGKILLed mid-growth, then checks what they recorded.
"""
import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from dist_utils import REPO, free_port
from growth_ds.distributed.zero.intervals import (chunk_range, clip_intervals, intervals_numel, owner_pieces,
                                                  runs_to_intervals)
from growth_ds.distributed.zero.old_data import OldData
from growth_ds.distributed.zero.param_growth import ParamGrowth, PlanCache, grow_rows_reference
from growth_ds.distributed.zero.fast import strided_runs as _strided_runs
from growth_ds.distributed.zero.schedule import make_schedule
from growth_ds.distributed.zero.shm import TRANSPORT_ENV
from growth_ds.models.schema import parameter_schema
from growth_ds.ops import grow, make_plan
from growth_ds.ops.apply import source_name
from helpers import small_shape

WORKER = REPO / "tests" / "zero_worker.py"
sys.path.insert(0, str(REPO / "tests"))


# ---- pure index math --------------------------------------------------------------------------------


def test_interval_helpers():
    assert runs_to_intervals(torch.tensor([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 6), (7, 9)]
    assert runs_to_intervals(torch.tensor([1, 2]), width=4) == [(4, 12)]
    assert clip_intervals([(0, 10), (20, 30)], 5, 25) == [(5, 10), (20, 25)]
    assert owner_pieces([(0, 10)], [0, 4, 4, 10], 3) == [[(0, 4)], [], [(4, 10)]]
    # row-aligned chunks: inner cuts on multiples of the row length
    pieces = chunk_range(5, 50, row=8, max_elems=16)
    assert pieces[0][0] == 5 and pieces[-1][1] == 50
    assert all(b == c for (_, b), (c, _) in zip(pieces, pieces[1:]))
    assert all(b % 8 == 0 for _, b in pieces[:-1]) and all(b - a <= 16 for a, b in pieces)


@pytest.mark.parametrize("rows,cols", [(3, 5), (40, 1), (1000, 333), (257, 4096), (70000, 1)])
def test_keyed_noise_rows_are_drawn_block_by_block_independent_of_the_split(rows, cols):
    """Any row range of a keyed random matrix equals those rows of the whole draw, whatever order the
    ranges are drawn in (so a rank draws only its own rows' blocks and sharding changes nothing)."""
    from growth_ds.ops.noise import NOISE_BLOCK, keyed_randn

    full = keyed_randn(7, "layers.0.mlp.up.weight", "fan_in_split", rows, cols)
    assert full.shape == (rows, cols) and full.dtype == torch.float64
    rng = random.Random(rows)
    cuts = sorted({0, rows, *(rng.randrange(rows) for _ in range(4))})
    ranges = list(zip(cuts[:-1], cuts[1:]))
    rng.shuffle(ranges)
    for a, b in ranges:
        assert torch.equal(keyed_randn(7, "layers.0.mlp.up.weight", "fan_in_split", rows, cols, a, b), full[a:b])
    other = keyed_randn(7, "layers.1.mlp.up.weight", "fan_in_split", rows, cols)
    assert not torch.equal(other, full)  # keyed by the parameter's name
    per = max(1, NOISE_BLOCK // cols)
    if rows > per:  # blocks are independent draws, not one stream cut up
        assert not torch.equal(full[per:2 * per].flatten()[:16], full[:per].flatten()[:16])
    assert abs(float(full.mean())) < 0.2 and 0.8 < float(full.std()) < 1.2 if full.numel() > 100 else True


def _state(shape, seed=0, signed_zeros=True):
    from zero_worker import random_state

    return random_state(shape, seed, signed_zeros=signed_zeros)


def _bits(t):
    return t.contiguous().float().view(torch.int32)


PURE_CASES = [  # (flavour, width, depth, grown-shape changes)
    ("gpt2", "duplicate", "interleave", dict(d_model=64, n_heads=8, n_kv_heads=8, d_ffn=96, n_layers=4)),
    ("gpt2", "lemon", "identity", dict(d_model=48, n_heads=6, n_kv_heads=6, d_ffn=80, n_layers=3, max_seq_len=24)),
    ("gpt2", "zero", "stack", dict(d_model=48, n_heads=6, n_kv_heads=6, d_ffn=80, n_layers=4)),
    ("gpt2", "hypercloning", None, dict(d_model=64, n_heads=8, n_kv_heads=8, d_ffn=96)),
    ("llama", "staged", "interleave", dict(d_model=64, n_heads=8, n_kv_heads=4, d_ffn=96, n_layers=4)),
    ("llama", "lemon", None, dict(d_model=48, n_heads=6, n_kv_heads=3, d_ffn=80)),
    ("llama", "zero", "identity", dict(d_model=48, n_heads=6, n_kv_heads=3, d_ffn=80, n_layers=3)),
    ("llama", "hypercloning", "identity", dict(d_model=64, n_heads=8, n_kv_heads=4, d_ffn=96, n_layers=3)),
    # new units' fan-in relative to the old weight's std (the "std" reduction of the zero method)
    ("llama", "zero-relative", "stack", dict(d_model=48, n_heads=6, n_kv_heads=3, d_ffn=80, n_layers=4)),
]


def case_plan(small, large, width, depth, moments, seed):
    from zero_worker import case_plan as plan

    return plan(small, large, width, depth, moments, seed=seed)


def _pure_case(flavour, width, depth, changes):
    """(plan, small state, ops.grow of it, PlanCache) of one PURE_CASES entry (adjoint moments, seed 3)."""
    small = small_shape(flavour, tied_embeddings=flavour == "gpt2")
    plan = case_plan(small, dataclasses.replace(small, **changes), width, depth, "adjoint", seed=3)
    state = _state(small)
    return plan, state, grow(state, plan), PlanCache(plan)


@pytest.mark.parametrize("flavour,width,depth,changes", PURE_CASES,
                         ids=[f"{c[0]}-{c[1]}+{c[2]}" for c in PURE_CASES])
def test_piecewise_growth_equals_reference_bit_for_bit(flavour, width, depth, changes):
    """Every new parameter computed from only the old rows its new range needs (random, row-unaligned cuts)
    equals growth_ds.ops.grow on the full state, bit for bit: values, both moments, signed zeros."""
    plan, state, ref, cache = _pure_case(flavour, width, depth, changes)
    rng = random.Random(0)
    for name, spec in parameter_schema(plan.grown_shape).items():
        g = cache.growth(name, spec)  # (parameters of one kind share derived data; names key the noise)
        src = source_name(plan, name)
        old = [state.params[src], state.exp_avg[src], state.exp_avg_sq[src]]
        cuts = sorted({0, g.new_numel, *(rng.randrange(g.new_numel) for _ in range(2))})
        for a, b in zip(cuts[:-1], cuts[1:]):
            out = grow_rows_reference(g, a, b, old)
            into = [torch.full((b - a,), float("nan")) for _ in range(3)]
            grow_rows_reference(g, a, b, old, into=into)  # float32 fast path where it is exact
            for c, field in enumerate(("params", "exp_avg", "exp_avg_sq")):
                want = getattr(ref, field)[name].reshape(-1)[a:b]
                got = out[c] if out[c] is not None else torch.zeros(b - a)
                assert torch.equal(_bits(got), _bits(want)), (name, field, a, b)
                assert torch.equal(_bits(into[c]), _bits(want)), (name, field, a, b, "compute_into")
            # the same from old data in chunks cut at random points (owner boundaries inside rows), each
            # chunk its own tensor: the executor computes from partitions and peers' segments in place
            ivs = g.needs(a, b)
            chunks = []
            for s, e in ivs:
                cuts_ = sorted({s, e, *(rng.randrange(s, e) for _ in range(2))})
                for u, v in zip(cuts_[:-1], cuts_[1:]):
                    chunks.append((u, v, [torch.cat([torch.zeros(3), f.reshape(-1)[u:v]]) for f in old][:g.channels], 3))
            red = g.reduce(state.params[src].reshape(-1)) if g.reductions else None
            into = [torch.full((b - a,), float("nan")) for _ in range(3)]
            g.compute_into(a, b, OldData(ivs, chunks=chunks), red, into)
            for c, field in enumerate(("params", "exp_avg", "exp_avg_sq")):
                want = getattr(ref, field)[name].reshape(-1)[a:b]
                assert torch.equal(_bits(into[c]), _bits(want)), (name, field, a, b, "chunks")
            if g.mode == "rows":  # exactly the rows of the range's sources are read
                i0, i1 = g.rows_of(a, b)
                srows = g.a0.map.src[i0:i1] if not g.a0.identity else torch.arange(i0, i1)
                want_rows = srows[srows >= 0]
                if bool((srows < 0).any()) and not g.a0.mean and not g.value_zero:
                    want_rows = torch.cat([want_rows, torch.zeros(1, dtype=torch.long)])
                assert g.needs(a, b) == runs_to_intervals(torch.unique(want_rows), g.d1), (name, a, b)
                assert intervals_numel(g.needs(a, b)) <= (i1 - i0 + 1) * g.d1


@pytest.mark.parametrize("flavour,width,depth,changes", PURE_CASES,
                         ids=[f"{c[0]}-{c[1]}+{c[2]}" for c in PURE_CASES])
def test_host_route_for_accelerator_slices_equals_the_reference(flavour, width, depth, changes):
    """Slices on an accelerator are computed on the host from a host copy of the piece's old elements
    (ParamGrowth.compute_on_host): the same bits as ops.grow, values and both moments."""
    plan, state, ref, cache = _pure_case(flavour, width, depth, changes)
    rng = random.Random(1)
    for name, spec in parameter_schema(plan.grown_shape).items():
        g = cache.growth(name, spec)
        src = source_name(plan, name)
        flat = [t.reshape(-1) for t in (state.params[src], state.exp_avg[src], state.exp_avg_sq[src])]
        red = g.reduce(flat[0]) if g.reductions else None
        cuts = sorted({0, g.new_numel, *(rng.randrange(g.new_numel) for _ in range(2))})
        for a, b in zip(cuts[:-1], cuts[1:]):
            ivs = g.needs(a, b)
            data = torch.stack([torch.cat([f[s:e] for s, e in ivs]) if ivs else f[:0] for f in flat[:g.channels]])
            into = [torch.full((b - a,), float("nan")) for _ in range(3)]
            g.compute_on_host(a, b, OldData(ivs, data), red, into)
            for c, field in enumerate(("params", "exp_avg", "exp_avg_sq")):
                want = getattr(ref, field)[name].reshape(-1)[a:b]
                assert torch.equal(_bits(into[c]), _bits(want)), (name, field, a, b)


@pytest.mark.parametrize("width", ["duplicate", "staged"])
def test_float32_fast_path_keeps_signed_zeros_and_underflow_exact(width):
    """The float32 fast path against the float64 reference on adversarial values: -0.0, +0.0 and negative
    subnormals whose scaled value rounds to zero (the reference keeps -0 there, but +0 for exact zeros)."""
    small = small_shape("llama")
    plan = make_plan(small, dataclasses.replace(small, d_model=64, n_heads=8, n_kv_heads=4, d_ffn=96), width=width,
                     seed=1, moments="adjoint")
    state = _state(small)
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([-0.0, 0.0, -1e-45, 1e-45, -3e-45, -1.2e-38, 5e-39])
    for field in (state.params, state.exp_avg, state.exp_avg_sq):
        for t in field.values():
            flat = t.view(-1)
            idx = torch.randint(0, flat.numel(), (min(64, flat.numel()),), generator=g)
            flat[idx] = special[torch.randint(0, len(special), (idx.numel(),), generator=g)]
    ref = grow(state, plan)
    cache = PlanCache(plan)
    fast = 0
    for name, spec in parameter_schema(plan.grown_shape).items():
        gr = ParamGrowth(plan, name, spec, cache)
        fast += gr.mode == "rows" and gr.fast_value and gr.fast_moment
        old = [state.params[name], state.exp_avg[name], state.exp_avg_sq[name]]
        into = [torch.empty(gr.new_numel) for _ in range(3)]
        grow_rows_reference(gr, 0, gr.new_numel, old, into=into)
        for c, field in enumerate(("params", "exp_avg", "exp_avg_sq")):
            assert torch.equal(_bits(into[c]), _bits(getattr(ref, field)[name].reshape(-1))), (name, field)
    assert fast >= 5


@pytest.mark.parametrize("width,depth", [("duplicate", "identity"), ("staged", "interleave")])
def test_tiled_maps_take_the_one_pass_block_path(width, depth, monkeypatch):
    """Duplication and staged maps tile old rows and columns: every fast channel is written by strided
    block copies straight from the received rows (no row gather), and still equals the reference bit for
    bit on row-unaligned pieces."""
    small = small_shape("llama")
    plan = make_plan(small, dataclasses.replace(small, d_model=64, n_heads=8, n_kv_heads=4, d_ffn=96, n_layers=4),
                     width=width, depth=depth, seed=2, moments="adjoint")
    state = _state(small, signed_zeros=False)  # (an exact zero in an old weight takes the gathering path)
    ref = grow(state, plan)
    gathered = []
    monkeypatch.setattr(ParamGrowth, "_fast_rows", lambda self, *a: gathered.append(self.name))
    cache = PlanCache(plan)
    rows = 0
    for name, spec in parameter_schema(plan.grown_shape).items():
        g = ParamGrowth(plan, name, spec, cache)
        rows += g.mode == "rows"
        src = source_name(plan, name)
        old = [state.params[src], state.exp_avg[src], state.exp_avg_sq[src]]
        cuts = [0, g.new_numel // 3 + 1, g.new_numel] if g.new_numel > 2 else [0, g.new_numel]
        for a, b in zip(cuts[:-1], cuts[1:]):
            into = [torch.full((b - a,), float("nan")) for _ in range(3)]
            grow_rows_reference(g, a, b, old, into=into)
            for c, field in enumerate(("params", "exp_avg", "exp_avg_sq")):
                want = getattr(ref, field)[name].reshape(-1)[a:b]
                assert torch.equal(_bits(into[c]), _bits(want)), (name, field, a, b)
    assert rows >= 8 and not gathered, gathered


@pytest.mark.parametrize("pieces", [[(12, 20), (31, 40)], [(s, s + 2) for s in range(10, 58, 4)]])
def test_packing_on_numpy_and_torch_agree_on_channel_major_planes(pieces):
    """The exchange packs host memory through numpy views and other devices through torch views; both write
    the same elements into a channel-major plane (channel c at c * plane stride), for few and many runs."""
    import numpy as np

    from growth_ds.distributed.zero.exchange import pack as _pack, pack_host as _pack_host
    from growth_ds.distributed.zero.layout import Slot

    flats = [torch.randn(80) for _ in range(3)]
    lo, offset = 8, 5  # this rank holds flat [8, 70) of the parameter at offset 5 of its partitions
    slot = Slot("w", (7, 10), 70, [0, 8, 70], flats, offset, 62, [f.numpy() for f in flats])
    n = sum(e - s for s, e in pieces)
    want = torch.cat([torch.cat([f[s - lo + offset:e - lo + offset] for s, e in pieces]) for f in flats])
    for stride in (n, n + 7):  # a plane of exactly this request, and one shared with others
        a, b = torch.full((3 * stride + 3,), float("nan")), torch.full((3 * stride + 3,), float("nan"))
        _pack_host(np.ndarray((3, n), np.float32, a.numpy(), 4 * 2, (4 * stride, 4)), slot, lo, pieces)
        _pack(b.as_strided((3, n), (stride, 1), 2), 3, slot, lo, pieces)
        for t in (a, b):
            got = torch.cat([t[2 + c * stride:2 + c * stride + n] for c in range(3)])
            assert torch.equal(got, want)
        assert torch.equal(a.isnan(), b.isnan()) and int(a.isnan().sum()) == 3 * stride + 3 - 3 * n


def test_stacked_packing_equals_packing_each_request():
    """Requests of one kind whose slots lie at one stride in the same partitions (every layer under ZeRO-3)
    are packed as one strided copy per piece and channel; the planes hold what packing each request alone
    writes, and a request off the stride, with other pieces or channels starts a new run."""
    import numpy as np

    from growth_ds.distributed.zero.exchange import pack_host as _pack_host
    from growth_ds.distributed.zero.exchange import pack_host_stacked as _pack_host_stacked
    from growth_ds.distributed.zero.exchange import stackable as _stackable
    from growth_ds.distributed.zero.layout import Slot
    from growth_ds.distributed.zero.schedule import Request, Send

    flats = [torch.randn(400) for _ in range(3)]
    host = [f.numpy() for f in flats]
    lo = 8  # every member holds flat [8, 40) of its parameter
    offsets = [3, 40, 77, 114, 190, 190]  # a stride of 37, a gap, then the same source twice (stride 0)
    pieces = [(10, 14), (20, 31)]
    items = []
    for m, off in enumerate(offsets):
        slot = Slot(f"l{m}", (4, 10), 40, [0, 8, 40], flats, off, 32, host)
        req = Request(m, 1, "piece", 0, 0, pieces, 3)
        items.append(Send(m, req, slot, lo, pieces if m % 2 else list(pieces), 15))
    items.append(Send(6, Request(6, 1, "piece", 0, 0, pieces, 1), Slot("x", (4, 10), 40, [0, 8, 40], flats, 227, 32,
                                                                  host), lo, pieces, 15))
    runs, j = [], 0
    while j < len(items):
        k = _stackable(items, j)
        runs.append((j, k))
        j = k
    assert runs == [(0, 4), (4, 6), (6, 7)]
    n, na = 15, 15 * 6  # a 3-channel plane holds the six 3-channel requests
    a, b = np.full(4 * na, np.nan, np.float32), np.full(4 * na, np.nan, np.float32)
    for j, k in runs[:2]:
        _pack_host_stacked(a, j * n, na, n, items[j:k])
    for m in range(6):
        _pack_host(np.ndarray((3, n), np.float32, b, 4 * m * n, (4 * na, 4)), items[m][2], lo, pieces)
    assert np.array_equal(a[:3 * na], b[:3 * na]) and not np.isnan(a[:3 * na]).any()
    want = np.concatenate([host[c][s - lo + off:e - lo + off] for c in range(3) for s, e in pieces
                           for off in [offsets[2]]])
    assert np.array_equal(np.concatenate([a[c * na + 2 * n:c * na + 3 * n] for c in range(3)]), want)


@pytest.mark.parametrize("flavour,width,depth,changes", PURE_CASES,
                         ids=[f"{c[0]}-{c[1]}+{c[2]}" for c in PURE_CASES])
def test_stacked_kinds_equal_reference_bit_for_bit(flavour, width, depth, changes):
    """ParamGrowth.stack_into (one op per block for every layer of a kind, a leading layer dimension over
    parameters laid out at a stride in shared memory, as under ZeRO-3) writes what growth_ds.ops.grow does,
    bit for bit; members off the stride (a gap in the layout) are split into their own ops; where it declines
    (returns False) it has written nothing the per-parameter path does not rewrite."""
    small = small_shape(flavour, tied_embeddings=flavour == "gpt2")
    plan = case_plan(small, dataclasses.replace(small, **changes), width, depth, "adjoint", seed=3)
    state = _state(small, signed_zeros=False)
    ref = grow(state, plan)
    cache = PlanCache(plan)
    schema = parameter_schema(plan.grown_shape)
    growths = [cache.growth(n, s) for n, s in schema.items()]
    kinds = {}
    for g in growths:
        kinds.setdefault(g.kind, []).append(g)
    olds = sorted({g.source for g in growths})  # every old parameter at its own place in one flat per channel
    where, pos = {}, 0
    for n in olds:
        where[n] = pos
        pos += state.params[n].numel() + 5
    old_flats = [torch.cat([torch.cat([getattr(state, f)[n].reshape(-1), torch.zeros(5)]) for n in olds])
                 for f in ("params", "exp_avg", "exp_avg_sq")]
    rng = random.Random(1)
    stacked = 0
    for members in kinds.values():
        g0 = members[0]
        if len(members) < 2 or g0.mode != "rows":
            continue
        for g in members:
            g.old_has_zero = bool((state.params[g.source] == 0).any())
        rows = sorted({0, g0.D0, rng.randrange(g0.D0)})
        for r0, r1 in zip(rows[:-1], rows[1:]):
            a, b = r0 * g0.D1, r1 * g0.D1
            n = b - a
            # new slices at a stride, with a gap before the last member (that one needs an op of its own)
            starts = [m * (n + 3) + (7 if m == len(members) - 1 else 0) for m in range(len(members))]
            new_flats = [torch.full((starts[-1] + n + 4,), float("nan")) for _ in range(3)]
            group = []
            for g, st in zip(members, starts):
                ivs = g.needs(a, b)
                chunks = [(u, v, old_flats, where[g.source] + u) for u, v in ivs]
                group.append((g, OldData(ivs, chunks=chunks, contiguous=True), [f[st:st + n] for f in new_flats]))
            done = g0.stack_into(a, b, group)
            stacked += done
            for g, old, views in group:
                if not done:
                    red = g.reduce(state.params[g.source].reshape(-1)) if g.reductions else None
                    g.compute_into(a, b, old, red, views)
                for c, field in enumerate(("params", "exp_avg", "exp_avg_sq")):
                    want = getattr(ref, field)[g.name].reshape(-1)[a:b]
                    assert torch.equal(_bits(views[c]), _bits(want)), (g.name, field, a, b, done)
            untouched = torch.ones(new_flats[0].numel(), dtype=torch.bool)
            for st in starts:
                untouched[st:st + n] = False
            assert all(bool(f[untouched].isnan().all()) for f in new_flats)  # nothing outside the slices
    if width in ("duplicate", "staged"):  # (the float32 block path: every factor a power of two, no noise)
        assert stacked > 0, "the stacked path never ran"
    # members at one stride in one storage become one op; a gap, a negative stride or another storage cut
    a, b = torch.zeros(100), torch.zeros(100)
    assert _strided_runs([a] * 4, [0, 10, 20, 37], [5, 5, 5, 9]) == [(0, 3, 10, 0), (3, 4, 0, 0)]
    assert _strided_runs([a, a, b], [20, 10, 30], [0, 4, 8]) == [(0, 1, 0, 0), (1, 2, 0, 0), (2, 3, 0, 0)]
    assert _strided_runs([a, a, a], [0, 10, 20], [8, 4, 0]) == [(0, 1, 0, 0), (1, 2, 0, 0), (2, 3, 0, 0)]


def test_schedule_serves_every_new_element_exactly_once():
    small = small_shape("llama")
    plan = make_plan(small, dataclasses.replace(small, d_model=48, n_heads=6, n_kv_heads=3, d_ffn=80, n_layers=3),
                     width="lemon", depth="identity", seed=1)
    cache = PlanCache(plan)
    growths = [ParamGrowth(plan, n, s, cache) for n, s in parameter_schema(plan.grown_shape).items()]
    for world in (1, 2, 3, 4):
        bounds = []
        for g in growths:  # ZeRO-3 layout: ceil(numel / ws) per rank
            pn = -(-g.new_numel // world)
            bounds.append([min(r * pn, g.new_numel) for r in range(world)] + [g.new_numel])
        rounds = make_schedule(growths, bounds, world, bucket_elems=512)
        tail = 0
        seen = {p: torch.zeros(g.new_numel, dtype=torch.long) for p, g in enumerate(growths)}
        for rnd in rounds:
            for req in rnd.requests:
                if req.kind == "piece":
                    assert bounds[req.param][req.rank] <= req.start < req.stop <= bounds[req.param][req.rank + 1]
                    seen[req.param][req.start:req.stop] += 1
            for r in range(world):  # a rank's load stays under the bucket unless one piece (a row) is larger
                mine = [q for q in rnd.requests if q.rank == r]
                assert rnd.load[r] <= 512 or len(mine) == 1, (world, r, rnd.load)
            if any(q.kind == "full" for q in rnd.requests):
                assert len(rnd.requests) == 1  # a reduction round holds that one old parameter only
            elif sum(len(q) > 0 for q in [[x for x in rnd.requests if x.rank == r] for r in range(world)]) < world:
                tail += 1  # rounds where a rank idles: the ends of unequal queues
        assert tail <= world, (world, tail)
        assert all(bool((s == 1).all()) for s in seen.values()), world
    # ZeRO-1/2 layout: the flat buffer cut in two, so most parameters lie wholly on one rank; rounds still
    # pair rank 0's parameters with rank 1's instead of taking turns
    total = sum(g.new_numel for g in growths)
    cut, off, bounds = total // 2, 0, []
    for g in growths:
        bounds.append([0, min(max(cut - off, 0), g.new_numel), g.new_numel])
        off += g.new_numel
    rounds = make_schedule(growths, bounds, 2, bucket_elems=512)
    busy = [sum(any(q.rank == r for q in rnd.requests) for rnd in rounds) for r in (0, 1)]
    assert len(rounds) == max(busy) and len(rounds) < 0.6 * sum(busy), (len(rounds), busy)


# ---- distributed runs ---------------------------------------------------------------------------------


def launch(out, tasks, nproc, opts=(), env=None, timeout=900):
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GROWTH_DS_OFFLINE="1")
    full_env.pop("GROWTH_DS_KILL_IN_GROWTH", None)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(WORKER), str(out), tasks, *opts]
    res = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    (out / f"log_{tasks.replace(',', '_')}_{nproc}.txt").write_text(res.stdout[-20000:] + res.stderr[-20000:])
    return res


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every multi-process run of this module, once. Returns the output directory."""
    from zero_worker import universal_case

    from growth_ds.distributed.zero.universal import grow_universal_checkpoint

    out = tmp_path_factory.mktemp("zero")
    # world size 2: memory; ZeRO 1/2/3 x every case (+ bf16); a ZeRO-2 checkpoint for offline growth; three
    # growths in one job; the uninterrupted job; then the same job with rank 1 SIGKILLed mid-growth
    res = launch(out, "memory,cases,save,leak,job,killjob", 2,
                 ["run=ref", "sel=3:full,1:subset,2:mini", "bf16_stages=1,2,3", "mem_cases=1", "mem_stages=1",
                  "cross=2>3,3>1"])
    (out / "killed_rc.txt").write_text(str(res.returncode))
    for task in ("memory", "cases", "save", "leak", "job"):
        assert (out / f"done_{task}_ws2").exists(), res.stdout[-3000:] + res.stderr[-6000:]
    assert not (out / "done_killjob_ws2").exists()
    small, large, kw = universal_case()
    grow_universal_checkpoint(out / "src_ckpt", large, out / "grown_uc", **kw, log=lambda *a: None)
    # world size 4: every method under ZeRO-3, two cases under 1 and 2; memory; load the grown checkpoint
    # under ZeRO-3; dense maps
    _ok(launch(out, "cases,memory,load,dense", 4, ["sel=3:subset,1:mini,2:mini", "mem_cases=1", "load_stage=3"]))
    # world size 1: every method under ZeRO-1; load the grown checkpoint under ZeRO-1
    _ok(launch(out, "cases,load", 1, ["sel=1:subset", "load_stage=1"]))
    # the relaunched killed job resumes from its pre-growth checkpoint and grows again; dense maps
    _ok(launch(out, "job,dense", 2, ["run=killed", "dense_stages=1,3"]))
    # a world size no other run uses (3: partitions of unequal sizes), through the all-to-all a multi-node job
    # uses (every plan, not only those with whole-parameter rounds); ZeRO-Offload at world size 2
    _ok(launch(out, "cases", 3, ["sel=3:subset,1:mini,2:mini"], env={TRANSPORT_ENV: "collective"}))
    _ok(launch(out, "cases", 2, ["sel=3:mini,2:mini,1:mini", "offload=1"]))
    return out


def _cases(out, ws):
    return json.loads((out / f"cases_ws{ws}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4, 1])
def test_grown_partitions_equal_the_reference_bit_for_bit(runs, ws):
    """Gathered after growth (each rank's own slices concatenated), fp32 masters, exp_avg, exp_avg_sq and the
    step equal growth_ds.ops.grow on the full state bit for bit; DeepSpeed's own gather agrees in value;
    the low-precision weights equal their dtype of the masters."""
    from zero_worker import case_list

    recs = _cases(runs, ws)
    assert {r["stage"] for r in recs} == ({1} if ws == 1 else {1, 2, 3})
    main = {r["case"] for r in recs if r["stage"] == (1 if ws == 1 else 3) and r["old_stage"] == r["stage"]}
    assert main == {c[0] for c in case_list("full" if ws == 2 else "subset")}
    for flavour in ("gpt2", "llama"):  # every width and depth method on both flavours
        combos = [c for c in case_list() if c[0] in main and c[0].startswith(flavour)]
        assert {c[3] for c in combos} >= {"duplicate", "lemon", "zero", "hypercloning", "staged"}
        assert {c[4] for c in combos} >= {"stack", "interleave", "identity"}
    if ws == 2:
        assert {r["stage"] for r in recs if r["precision"] == "bf16"} == {1, 2, 3}
        # the grown engine may use another ZeRO stage than the old one
        assert {(r["old_stage"], r["stage"]) for r in recs if r["old_stage"] != r["stage"]} == {(2, 3), (3, 1)}
    for r in recs:
        assert r["ok"], r.get("error")
        where = f"ws{ws} stage {r['stage']} {r['precision']} {r['case']}"
        assert (r["params"], r["exp_avg"], r["exp_avg_sq"], r["step"]) == (0, 0, 0, 0), (where, r["bad_names"])
        assert r.get("ds_gather_value_diff", 0) == 0, where
        assert r["lp_mismatch"] == 0, where
        assert r["rounds"] >= 2, where
        # ranks on one host exchange through shared memory unless a round holds a whole old parameter (then
        # through the all-to-all, the multi-node transport): both give the reference's bits
        assert r["transport"] == ("shm" if ws > 1 and not r["full_rounds"] else "collective"), where
    if ws > 1:
        assert {r["transport"] for r in recs} == {"shm", "collective"}
        # under ZeRO-3 the layers of a kind were computed together (ParamGrowth.stack_into), checked above too
        assert any(r["stacked_pieces"] for r in recs if r["stage"] == 3)
    assert all(r["stacked_pieces"] <= r["pieces"] for r in recs)
    assert any("ds_gather_value_diff" in r for r in recs)  # DeepSpeed's own gather was consulted too


@pytest.mark.slow
def test_same_result_at_world_size_1_2_and_4(runs):
    """One digest of the whole grown state per case, whatever the world size, ZeRO stage and bucket size."""
    digests, where = {}, {}
    for ws in (1, 2, 4):
        for r in _cases(runs, ws):
            if r["precision"] == "fp32":
                digests.setdefault(r["case"], set()).add(r["digest"])
                where.setdefault(r["case"], set()).add((ws, r["stage"]))
    everywhere = [c for c, w in where.items() if {ws for ws, _ in w} == {1, 2, 4}]
    assert len(everywhere) >= 10
    for case, ds in digests.items():
        assert len(ds) == 1, (case, sorted(where[case]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cases_ws3", "cases_ws2_offload"])
def test_world_size_3_and_zero_offload_give_the_same_bits(runs, name):
    """At world size 3 (partitions of unequal sizes; every round through the all-to-all, as across nodes), and
    under ZeRO-Offload (Adam state in host memory, ZeRO-3 parameters too), ZeRO 1, 2 and 3: the grown state is
    ops.grow's bit for bit, its digest is the one world sizes 1, 2 and 4 give (through shared memory where the
    plan allows), and the next step equals the unsharded reference's."""
    recs = json.loads((runs / f"{name}.json").read_text())
    assert {r["stage"] for r in recs} == {1, 2, 3}
    offload = name.endswith("offload")
    for r in recs:  # DeepSpeed did offload (ZeRO-1/2: the optimizer state; ZeRO-3: it and the parameters)
        want = (["offload_optimizer", "offload_param"] if r["stage"] == 3 else ["cpu_offload"]) if offload else []
        assert r["offload"] == offload and r["offloaded"] == want, (r["stage"], r["offloaded"])
    digests = {r["case"]: r["digest"] for ws in (1, 2, 4) for r in _cases(runs, ws)
               if r["precision"] == "fp32" and r["old_stage"] == r["stage"]}
    for r in recs:
        where = f"{name} stage {r['stage']} {r['case']}"
        assert r["ok"], (where, r.get("error"))
        assert (r["params"], r["exp_avg"], r["exp_avg_sq"], r["step"], r["lp_mismatch"]) == (0, 0, 0, 0, 0), where
        assert r["digest"] == digests[r["case"]], where
        assert r["loss_diff"] < 1e-5 and r["step_max_diff"] < 1e-5, (where, r["step_max_diff"])
        if name == "cases_ws3":
            assert r["transport"] == "collective", where


@pytest.mark.slow
def test_next_step_equals_the_unsharded_reference(runs):
    """One DeepSpeed step after growth (same batch on every rank) against the reference decoder + torch AdamW
    holding ops.grow's state: equal loss, parameters within fp32 reduction-order noise."""
    n = 0
    for ws in (1, 2, 4):
        for r in _cases(runs, ws):
            if r["precision"] != "fp32":
                continue
            n += 1
            assert r["loss_diff"] < 1e-5, r
            assert r["step_max_diff"] < 1e-5, (ws, r["stage"], r["case"], r["step_max_diff"])
            assert r["step_after"] == r["ref_step"] + 1  # the grown step (0 under the reset rule), stepped once
    assert n > 50


@pytest.mark.slow
def test_growth_allocates_at_most_one_full_parameter(runs):
    """Tensor memory allocated during grow_engine (every aten op's new storages, tracked live) stays under one
    full parameter: the largest new one in fp32, or the old parameter that GPT-2's mean rows / HyperCloning's
    relative noise reduce (held once, in float64, on one rank), plus O(sum of space sizes) index vectors; and
    within the issue's target of 1.5x the rank's old + new slices."""
    n = 0
    for ws in (2, 4):
        for r in json.loads((runs / f"memory_ws{ws}.json").read_text()):
            assert r["ok"], r.get("error")
            assert (r["params"], r["exp_avg"], r["exp_avg_sq"]) == (0, 0, 0), r
            assert r["peak_bytes"] <= r["bound_bytes"], r
            slices = r["old_slice_bytes"] + r["new_slice_bytes"]
            assert slices + r["peak_bytes"] <= 1.5 * slices, r  # the target: <= 1.5x (old + new slice)
            n += 1
    assert n >= 3


@pytest.mark.slow
def test_dense_maps_are_reduce_scattered_to_the_owners(runs):
    """Dense maps: per-rank partial products summed by one reduce_scatter per parameter equal B W A on the
    full tensors (up to summation order), with fresh Adam state; a trained-looking LiGO operator's maps
    (depth mixing, couplings, noise, norm offsets; GPT-2 and Llama GQA) give its materialised model."""
    recs = json.loads((runs / "dense_ws2.json").read_text()) + json.loads((runs / "dense_ws4.json").read_text())
    assert {(r["ws"], r["stage"]) for r in recs} == {(2, 1), (2, 3), (4, 3)}
    for r in recs:
        assert r["max_rel_err"] < 1e-6 and r["zero_moments"] and r["step"] == 0, r
        assert r["ligo_max_rel_err"] < 1e-5, r


@pytest.mark.slow
def test_three_growths_in_one_job_leak_no_engine(runs):
    rec = json.loads((runs / "leak.json").read_text())
    assert rec["chain_alive_max_rank"] == 0 and rec["chain_refs"] == 9
    assert rec["cycle_alive_max_rank"] == 0
    engine_bytes = 16 * rec["large_params"] / 2  # fp32 master + 2 moments + fp32 weights, per rank
    assert rec["rss_growth_max_rank"] < 0.5 * engine_bytes, rec


@pytest.mark.slow
@pytest.mark.parametrize("ws,stage", [(4, 3), (1, 1)])
def test_grown_universal_checkpoint_loads_at_another_world_size_and_stage(runs, ws, stage):
    """A ZeRO-2 checkpoint of 2 ranks, grown offline, loads at ZeRO-3 on 4 ranks and ZeRO-1 on 1 rank,
    equal to ops.grow of the gathered source bit for bit, with each group's weight decay, and trains."""
    rec = json.loads((runs / f"load_ws{ws}_z{stage}.json").read_text())
    assert rec["ok"], rec.get("error")
    assert (rec["params"], rec["exp_avg"], rec["exp_avg_sq"], rec["step"]) == (0, 0, 0, 0), rec["bad_names"]
    assert rec["lp_mismatch"] == 0
    assert rec["weight_decay"] == [0.1, 0.0]
    assert 0 < rec["loss_after"] < 10


@pytest.mark.slow
def test_universal_checkpoint_of_wrong_shape_is_refused_with_the_parameter_name(runs, tmp_path):
    for ws, stage in ((4, 3), (1, 1)):
        rec = json.loads((runs / f"load_ws{ws}_z{stage}.json").read_text())
        assert rec["refused"] and "layers.0.mlp.up.weight" in rec["refused"], rec["refused"]
    # offline: a source checkpoint that does not match the declared small shape
    from zero_worker import universal_case

    from growth_ds.distributed.zero.universal import grow_universal_checkpoint

    small, large, kw = universal_case()
    meta_path = runs / "src_ckpt" / "step00000003" / "growth_meta.json"
    meta = json.loads(meta_path.read_text())
    wrong = dataclasses.replace(small, d_ffn=small.d_ffn + 8)
    bad_src = tmp_path / "src"
    import shutil

    shutil.copytree(runs / "src_ckpt", bad_src)
    (bad_src / "step00000003" / "growth_meta.json").write_text(json.dumps(dict(meta, shape=wrong.to_dict())))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up\.weight"):
        grow_universal_checkpoint(bad_src, dataclasses.replace(large, d_ffn=large.d_ffn + 16), tmp_path / "out",
                                  **kw, log=lambda *a: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_rank_mid_growth_resumes_to_the_uninterrupted_state(runs):
    """Rank 1 SIGKILLed in the middle of the exchange; the relaunch resumes from the pre-growth checkpoint,
    grows again and ends bit for bit where the uninterrupted job ends."""
    assert int((runs / "killed_rc.txt").read_text()) != 0  # the SIGKILLed job failed
    ref = json.loads((runs / "ref" / "final.json").read_text())
    got = json.loads((runs / "killed" / "final.json").read_text())
    assert not ref["resumed"] and got["resumed"]
    assert got["digest"] == ref["digest"] and got["losses"] == ref["losses"] and got["step"] == ref["step"]


@pytest.mark.slow
def test_offline_growth_is_atomic_and_the_cli_entry_point_works(runs, tmp_path, capsys):
    """SIGKILL in the middle of writing leaves no directory at --out; the rerun (through the CLI entry
    point) writes the same checkpoint as the fixture's."""
    from zero_worker import universal_case

    small, large, kw = universal_case()
    out = tmp_path / "grown"
    code = ("import sys; sys.path.insert(0, 'tests'); from zero_worker import universal_case; "
            "from growth_ds.distributed.zero.universal import grow_universal_checkpoint as g; "
            f"s, l, kw = universal_case(); g({str(runs / 'src_ckpt')!r}, l, {str(out)!r}, **kw)")
    env = dict(os.environ, DS_ACCELERATOR="cpu", GROWTH_DS_UNIVERSAL_KILL_AFTER="5")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == -9, res.stderr[-2000:]
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(n.startswith(".grown.partial-") for n in leftovers) and leftovers
    assert not any((tmp_path / n / "latest_universal").exists() for n in leftovers)

    import yaml

    from growth_ds.cli import main

    (tmp_path / "large.yaml").write_text(yaml.safe_dump(large.to_dict()))
    argv = ["grow", "--from", str(runs / "src_ckpt"), "--to", str(tmp_path / "large.yaml"), "--method",
            "lemon+identity", "--out", str(out), "--seed", str(kw["seed"]), "--moments", kw["moments"]]
    assert main(argv) == 0  # `growth-ds grow --from CKPT_DIR`: a DeepSpeed checkpoint directory
    tag = (out / "latest_universal").read_text()
    ref_dir = runs / "grown_uc" / tag / "zero"
    for p in sorted(ref_dir.rglob("*.pt")):
        a = torch.load(p, weights_only=False)
        b = torch.load(out / tag / "zero" / p.relative_to(ref_dir), weights_only=False)
        a, b = (x["param"] if isinstance(x, dict) and "param" in x else x for x in (a, b))
        if torch.is_tensor(a):
            assert torch.equal(_bits(a), _bits(b)), p
    assert main(argv) == 2  # refuses to replace --out, naming it; nothing written is touched
    assert f"--out {out} exists" in capsys.readouterr().err
    assert (out / "latest_universal").read_text() == tag


@pytest.mark.slow
def test_cli_tag_picks_the_checkpoint_to_grow(runs, tmp_path, capsys):
    """``growth-ds grow --from DIR --tag T`` grows tag T, not the directory's latest; without --tag the latest;
    an unknown tag is refused by name before anything is written."""
    import shutil

    import yaml

    from zero_worker import universal_case

    from growth_ds.cli import main

    small, large, kw = universal_case()
    src = tmp_path / "ckpts"
    shutil.copytree(runs / "src_ckpt", src)
    meta = json.loads((src / "step00000003" / "growth_meta.json").read_text())
    shutil.copytree(src / "step00000003", src / "step00000009")  # a later tag, now the latest
    later = dict(meta, tag="step00000009", progress=dict(meta["progress"], step=9))
    (src / "step00000009" / "growth_meta.json").write_text(json.dumps(later))
    (src / "latest.json").write_text(json.dumps({"tag": "step00000009", "step": 9}))
    (tmp_path / "large.yaml").write_text(yaml.safe_dump(large.to_dict()))
    base = ["grow", "--from", str(src), "--to", str(tmp_path / "large.yaml"), "--method", "lemon+identity",
            "--seed", str(kw["seed"]), "--moments", kw["moments"]]
    for tag, step in (("step00000003", meta["progress"]["step"]), (None, 9)):
        out = tmp_path / f"out_{tag}"
        assert main(base + ["--out", str(out)] + (["--tag", tag] if tag else [])) == 0
        grown_tag = (out / "latest_universal").read_text()
        assert grown_tag == f"{tag or 'step00000009'}_grown"
        grown_meta = json.loads((out / grown_tag / "growth_meta.json").read_text())
        assert grown_meta["progress"]["step"] == step
        assert grown_meta["grown_from"].endswith(tag or "step00000009")
    assert main(base + ["--out", str(tmp_path / "out_bad"), "--tag", "step00000042"]) == 2
    assert "--tag step00000042" in capsys.readouterr().err
    assert not (tmp_path / "out_bad").exists()

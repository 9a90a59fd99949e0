"""Tensor-parallel growth: TP-aware plans, the per-rank shard executor, megatron-core GPTModel at TP=1/2.

The first part is pure math (one process): shards are simulated by splitting full tensors.
The second part runs ``tests/tp_worker.py`` once under ``torchrun --nproc_per_node 2`` (gloo, CPU)
and checks what it recorded.
"""
import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from growth_ds.distributed.tensor_parallel import (ShardGrower, ShardSpec, is_block_diagonal, local_map,
                                                   make_tp_plan, permute_like, reference_shard_spec)
from growth_ds.interop.megatron import megatron_layout, megatron_to_reference, reference_to_megatron
from growth_ds.models import Decoder
from growth_ds.models.schema import parameter_schema
from growth_ds.ops import grow, make_plan
from growth_ds.ops.apply import source_name
from growth_ds.ops.state import TrainingState, load_into
from helpers import batch, randomised_model, small_shape

WIDTH = ["duplicate", "lemon", "zero", "hypercloning", "staged"]


def state_with_moments(shape, seed=0):
    st = TrainingState.from_module(randomised_model(shape, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    st.exp_avg = {n: torch.randn(p.shape, generator=g) for n, p in st.params.items()}
    st.exp_avg_sq = {n: torch.rand(p.shape, generator=g) for n, p in st.params.items()}
    st.step = 4
    return st


def grow_sharded(state, tpp):
    """Grow ``state`` rank by rank from contiguous shards, then reassemble (what TP ranks compute)."""
    tp, plan = tpp.tp, tpp.plan
    growers = [ShardGrower(tpp, r) for r in range(tp)]
    small_schema = parameter_schema(plan.small)
    out = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, spec in parameter_schema(plan.grown_shape).items():
        src = source_name(plan, name)
        layout = reference_shard_spec(small_schema[src], tp, 0)
        shards = lambda t: [dataclasses.replace(layout, tp_rank=r).shard(t) for r in range(tp)]  # noqa: E731
        w = state.params[src]
        std = float(w.double().std())  # hypercloning: the one scalar ranks would all-reduce
        out["params"][name] = layout.unshard([g.value(name, spec, s, full_std=std)
                                              for g, s in zip(growers, shards(w))])
        for field, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            m = getattr(state, field)[src]
            out[field][name] = layout.unshard([g.moment(name, spec, s, power) for g, s in zip(growers, shards(m))])
    return out


def assert_equal_states(got, ref: TrainingState):
    for field in ("params", "exp_avg", "exp_avg_sq"):
        for name, t in getattr(ref, field).items():
            assert torch.equal(got[field][name], t), f"{field} {name}: max diff {(got[field][name] - t).abs().max()}"


def wide(shape, **kw):
    base = dict(d_model=shape.d_model * 2, n_heads=shape.n_heads * 2, n_kv_heads=shape.n_kv_heads * 2,
                d_ffn=shape.d_ffn * 2, n_layers=shape.n_layers + 1)
    base.update(kw)
    return dataclasses.replace(shape, **base)


# ---- pure math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("width", WIDTH)
def test_sharded_growth_equals_reference_executor(width, flavour):
    """Every rank grows its own shards; reassembled, they equal the reference executor under the
    TP-aware plan bit for bit (parameters and both Adam moments), and the plan is block-diagonal."""
    small = small_shape(flavour)
    plan = make_plan(small, wide(small), width=width, depth="identity", seed=5)
    tpp = make_tp_plan(plan, 2)
    for s in ("ffn", "heads", "kv"):
        assert is_block_diagonal(tpp.plan.spaces[s], 2), s
    state = state_with_moments(small)
    assert_equal_states(grow_sharded(state, tpp), grow(state, tpp.plan))


@pytest.mark.parametrize("width", ["duplicate", "staged"])
def test_tp_plan_is_the_source_plan_up_to_a_permutation(width):
    """Noise-free methods at integer ratios: the TP-aware result is the TP=1 result with the new units
    of ffn/heads/kv reordered by ``TPPlan.perm`` (moments included)."""
    small = small_shape("llama")
    plan = make_plan(small, wide(small), width=width, depth="identity", seed=5)
    tpp = make_tp_plan(plan, 2)
    assert tpp.is_permutation and set(tpp.how.values()) == {"permuted"}
    state = state_with_moments(small)
    a, b = grow(state, plan), grow(state, tpp.plan)
    for field in ("params", "exp_avg", "exp_avg_sq"):
        for name, spec in parameter_schema(b.shape).items():
            assert torch.equal(permute_like(tpp, spec, getattr(a, field)[name]), getattr(b, field)[name]), name


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_uneven_copies_are_grown_per_rank_and_stay_lossless(flavour):
    """lemon with d_ffn 48 -> 72 and kv heads 4 -> 6 (uneven copy counts): no permutation exists, so the
    method's rule runs inside each rank's block; still exact, sharded == reference, function kept."""
    small = small_shape(flavour, n_heads=8, n_kv_heads=4)
    large = dataclasses.replace(small, d_model=48, d_ffn=72, n_heads=12, n_kv_heads=6, n_layers=3)
    plan = make_plan(small, large, width="lemon", depth="identity", seed=2)
    tpp = make_tp_plan(plan, 2)
    assert tpp.how["ffn"] == tpp.how["heads"] == "per-rank" and not tpp.is_permutation
    state = state_with_moments(small)
    grown = grow(state, tpp.plan)
    assert_equal_states(grow_sharded(state, tpp), grown)
    ref_small, ref_big = Decoder(small), Decoder(grown.shape)
    load_into(ref_small, state)
    load_into(ref_big, grown)
    x, _ = batch(small)
    with torch.no_grad():
        assert (ref_small(x) - ref_big(x)).abs().max() < 1e-5


def test_tp4_and_tp_plans_nest():
    """TP=4 works too, and a plan block-diagonal for 4 ranks is block-diagonal for 2."""
    small = small_shape("llama", n_heads=8, n_kv_heads=4, d_ffn=64, vocab_size=64)
    plan = make_plan(small, wide(small), width="zero", depth="identity", seed=1)
    tpp = make_tp_plan(plan, 4)
    state = state_with_moments(small)
    assert_equal_states(grow_sharded(state, tpp), grow(state, tpp.plan))
    for s in ("ffn", "heads", "kv"):
        assert is_block_diagonal(tpp.plan.spaces[s], 2)


@pytest.mark.parametrize("field,large,tp", [
    ("n_kv_heads", dict(n_heads=8, n_kv_heads=2), 4),    # old kv 2 over 4 ranks: a query group would be split
    ("n_kv_heads", dict(n_heads=6, n_kv_heads=3), 2),    # new kv 3 over 2 ranks
    ("d_ffn", dict(d_ffn=71), 2),
])
def test_refused_layouts_name_the_field(field, large, tp):
    small = small_shape("llama", n_heads=4, n_kv_heads=2)
    plan = make_plan(small, dataclasses.replace(small, **large), width="lemon")
    with pytest.raises(ValueError, match=field):
        make_tp_plan(plan, tp)


def test_hypercloning_needs_the_global_std():
    """HyperCloning's noise scales with the std of the whole weight: at TP>1 the rank must be given a
    reduction (two scalar all-reduces) or the std; it refuses to guess from its shard."""
    small = small_shape("llama")
    tpp = make_tp_plan(make_plan(small, wide(small, n_layers=small.n_layers), width="hypercloning"), 2)
    spec = parameter_schema(tpp.plan.grown_shape)["layers.0.attn.q.weight"]
    w = randomised_model(small).layers[0].attn.q.weight.detach()
    with pytest.raises(RuntimeError, match="reduce_sum"):
        ShardGrower(tpp, 0).value("layers.0.attn.q.weight", spec, w[: w.shape[0] // 2])
    sums = []

    def fake_reduce(t):  # both ranks' shards: the sum over the group
        sums.append(t.numel())
        other = w[w.shape[0] // 2:].double()
        if t.numel() == 2:
            return t + torch.tensor([float(other.numel()), float(other.sum())], dtype=torch.float64)
        mean = float(w.double().mean())
        return t + ((other - mean) ** 2).sum().reshape(1)

    got = ShardGrower(tpp, 0, fake_reduce).value("layers.0.attn.q.weight", spec, w[: w.shape[0] // 2])
    ref = ShardGrower(tpp, 0).value("layers.0.attn.q.weight", spec, w[: w.shape[0] // 2],
                                    full_std=float(w.double().std()))
    assert sums == [2, 1] and (got - ref).abs().max() < 1e-7


def test_local_map_refuses_a_non_block_diagonal_map():
    small = small_shape("llama")
    plan = make_plan(small, wide(small, n_layers=small.n_layers), width="duplicate")
    assert not is_block_diagonal(plan.spaces["ffn"], 2)  # circular copies cross ranks
    with pytest.raises(ValueError, match="block-diagonal"):
        local_map(plan.spaces["ffn"], 2, 0)


def test_shard_spec_strided_roundtrip():
    """Gated fc1 (stride 2): rank r holds [gate_r; up_r]; unshard(shard) is the identity."""
    full = torch.arange(24.0).reshape(12, 2)  # [gate (6 rows); up (6 rows)]
    shards = [ShardSpec(0, 2, r, 3).shard(full) for r in range(3)]
    assert torch.equal(shards[1], torch.cat([full[2:4], full[8:10]]))
    assert torch.equal(ShardSpec(0, 2, 0, 3).unshard(shards), full)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_megatron_names_roundtrip(flavour):
    """reference -> megatron (fused QKV per group, [gate; up]) -> reference is the identity."""
    shape = small_shape(flavour, tied_embeddings=flavour == "gpt2")
    params = {n: p.detach() for n, p in randomised_model(shape).named_parameters()}
    full = reference_to_megatron(params, shape)
    assert set(full) == set(megatron_layout(shape))
    qkv = full["decoder.layers.0.self_attention.linear_qkv.weight"]
    g, hd = shape.group_size, shape.head_dim
    assert torch.equal(qkv[g * hd:(g + 1) * hd], params["layers.0.attn.k.weight"][:hd])  # group 0: q..q k v
    back = megatron_to_reference(full, shape)
    assert all(torch.equal(back[n], params[n]) for n in params)


# ---- megatron-core, 2 gloo processes ----------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Run(list):
    """Both ranks' result dicts; ``out`` is the worker's directory (checkpoints)."""

    def __init__(self, results, out):
        super().__init__(results)
        self.out = out


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    if importlib.util.find_spec("megatron") is None:
        pytest.skip("megatron-core is not installed")
    out = tmp_path_factory.mktemp("tp_worker")
    worker = os.path.join(os.path.dirname(__file__), "tp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), worker, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    results = [out / f"results.rank{r}.json" for r in range(2)]
    if not all(p.exists() for p in results):
        pytest.fail(f"tp_worker did not finish (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = [json.loads(p.read_text()) for p in results]
    for r in res:
        assert r["ok"], r.get("error")
    return _Run(res, out)


def _growths(res, tp):
    return {k[len(f"tp{tp}."):-len(".lossless")]: v for k, v in res.items()
            if k.startswith(f"tp{tp}.") and k.endswith(".lossless")}


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_model_matches_reference_decoder(tp_run, tp):
    """megatron's GPTModel holding the reference weights computes the reference logits (both flavours)."""
    for flavour in ("gpt2", "llama"):
        assert tp_run[0][f"tp{tp}.{flavour}.small_vs_reference_logits"] < 1e-5
        assert tp_run[0][f"tp{tp}.{flavour}.roundtrip"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_lossless_growth_keeps_logits(tp_run, tp):
    res = tp_run[0]
    lossless = [k for k, v in _growths(res, tp).items() if v]
    assert len(lossless) >= 5
    for key in lossless:
        assert res[f"tp{tp}.{key}.lossless_logits"] < 1e-5, key


@pytest.mark.slow
def test_tp2_growth_equals_tp1_growth_and_the_reference_executor(tp_run):
    """Gathered TP=2 shards (params, exp_avg, exp_avg_sq) equal TP=1 growth under the same TP-aware plan
    and the reference executor on the gathered state, exactly; the source plan differs by the permutation."""
    for res in tp_run:
        for key in _growths(res, 2):
            assert res[f"tp2.{key}.vs_tp1"] == 0.0, key
            assert res[f"tp2.{key}.vs_reference_executor"] == 0.0, key
            assert res[f"tp1.{key}.vs_reference_executor"] == 0.0, key
    permuted = [k for k in tp_run[0] if k.endswith(".source_plan_permuted")]
    assert len(permuted) >= 2 and all(tp_run[0][k] == 0.0 for k in permuted)


@pytest.mark.slow
def test_no_weight_is_gathered_while_growing(tp_run):
    """Growth issues no collective at all, except HyperCloning's scalar all-reduces (<= 2 elements)."""
    assert any(op in ("all_gather", "allgather") for op, _ in tp_run[0]["sanity.collectives"])  # the log works
    for res in tp_run:
        for key in _growths(res, 2):
            calls = res[f"tp2.{key}.collectives"]
            if "hypercloning" in key:
                assert calls and all(op in ("all_reduce", "allreduce") and n <= 2 for op, n in calls), calls
            else:
                assert calls == [], (key, calls)


@pytest.mark.slow
def test_training_after_growth_matches_across_tp(tp_run):
    for flavour in ("gpt2", "llama"):
        a, b = tp_run[0][f"tp1.{flavour}.train_losses"], tp_run[0][f"tp2.{flavour}.train_losses"]
        assert len(a) == len(b) == 10
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
        assert b[-1] < b[0]


@pytest.mark.slow
def test_dist_checkpoint_reloads_at_the_other_tp_size(tp_run):
    res = tp_run[0]
    for flavour in ("gpt2", "llama"):
        for direction in ("tp1_at_tp2", "tp2_at_tp1"):
            assert res[f"reload.{direction}.{flavour}.logits"] < 1e-5
            assert res[f"reload.{direction}.{flavour}.step"] == 10
        assert abs(res[f"reload.tp1_at_tp2.{flavour}.next_loss"] - res[f"reload.tp2_at_tp1.{flavour}.next_loss"]) < 1e-5


@pytest.mark.slow
def test_grow_dist_checkpoint(tp_run):
    """Load at the old shape, grow at TP=2, save at the new shape: lossless and equal to in-memory growth.
    Loading the small checkpoint straight into the grown shape is refused (by growth-ds and by megatron)."""
    res = tp_run[0]
    assert res["ckpt_grow.tp2.llama.cli_rc"] == 0
    for flavour in ("gpt2", "llama"):
        assert res[f"ckpt_grow.tp2.{flavour}.lossless_logits"] < 1e-5
        assert res[f"ckpt_grow.tp2.{flavour}.vs_in_memory"] == 0.0
        ours = res[f"ckpt_grow.tp2.{flavour}.load_small_into_grown.check_shape=True"]
        theirs = res[f"ckpt_grow.tp2.{flavour}.load_small_into_grown.check_shape=False"]
        assert ours.startswith("ValueError") and "grow" in ours
        assert theirs is not None and "shape mismatch" in theirs


_CLI = """
import json, sys, torch
from growth_ds.cli import build_parser
from growth_ds.interop import megatron as gm
args = build_parser().parse_args(sys.argv[1:])
rc = args.func(args)
x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
logits = []
for path in (getattr(args, "from"), args.out):
    model = gm.build_gpt_model(gm.checkpoint_shape(path), perform_initialization=False)
    gm.load_dist_checkpoint(model, torch.optim.AdamW(model.parameters()), path)
    with torch.no_grad():
        logits.append(gm.gather_logits(model, x))
common = gm.checkpoint_common(args.out)
print(json.dumps({"rc": rc, "diff": float((logits[0] - logits[1]).abs().max()), "shape": common["shape"],
                  "step": common["step"], "tp_plan": common["tp_plan"]}))
"""


@pytest.mark.slow
def test_grow_megatron_command_in_one_process(tp_run, tmp_path):
    """``grow-megatron`` without torchrun (TP=1, a 1-process gloo group) on a checkpoint saved at TP=2."""
    import yaml

    import tp_worker

    flavour, small, large, specs = tp_worker.cases()[0]
    to = tmp_path / "large.yaml"
    to.write_text(yaml.safe_dump(large.to_dict()))
    src, out = tp_run.out / f"{flavour}_small_tp2", tmp_path / "grown"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    cmd = [sys.executable, "-c", _CLI, "grow-megatron", "--from", str(src), "--to", str(to), "--method", specs[0],
           "--out", str(out), "--seed", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0 and got["diff"] < 1e-5
    assert got["shape"]["d_model"] == large.d_model and got["step"] == 0  # duplicate: fresh AdamW (reset)
    assert "TP=1" in got["tp_plan"]

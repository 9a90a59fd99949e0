"""The new units' random fan-in, absolute or relative to the std of the old weight they join.

``GrowthPlan.random_relative``: ``random_std`` multiplies the (unbiased, float64) std of the whole old weight, so
the growth equals, bit for bit, one with the absolute std ``random_std * std(old weight)`` chosen per parameter;
it stays lossless (the new units are read with weight 0); a sharded executor reduces that one scalar first.
"""
import dataclasses

import pytest
import torch

from growth_ds.distributed.tensor_parallel import ShardGrower, make_tp_plan, reference_shard_spec
from growth_ds.models.schema import parameter_schema
from growth_ds.ops import grow_module, make_plan
from growth_ds.ops.apply import grow_value, source_name
from growth_ds.ops.noise import has_random_units, needs_full_std
from helpers import batch, grown, loss_of, randomised_model, small_shape


def _wider(small, **kw):
    return dataclasses.replace(grown(small, width=True, depth=False), d_ffn=small.d_ffn * 3, **kw)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_relative_fan_in_equals_the_absolute_std_of_each_weight(flavour):
    """Every grown weight under ``random_relative`` equals the absolute plan at ``c * std(old weight)``."""
    small = small_shape(flavour)
    large = _wider(small, n_layers=small.n_layers + 1)
    model = randomised_model(small, seed=4)
    old = dict(model.named_parameters())
    rel = make_plan(small, large, width="zero", depth="identity", seed=7, random_std=1.5, random_relative=True)
    schema = parameter_schema(rel.grown_shape)
    checked = 0
    for name, spec in schema.items():
        w = old[source_name(rel, name)].detach()
        if not needs_full_std(rel, spec):
            assert not (spec.role in ("weight", "head") and has_random_units(rel, spec)), name
            continue
        std = float(w.double().std())
        absolute = dataclasses.replace(rel, random_std=1.5 * std, random_relative=False)
        assert torch.equal(grow_value(rel, name, spec, w), grow_value(absolute, name, spec, w)), name
        checked += 1
    assert checked >= 4 * large.n_layers  # q, k, v, the MLP input(s): o and down read new units with weight 0


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("ratio", [0.5, 3.0])
def test_relative_fan_in_sets_the_new_rows_scale_and_stays_lossless(flavour, ratio):
    """The new FFN units' fan-in rows have std ``ratio * std(old rows' weight)``; the grown model computes the
    small model's function (loss within 1e-5)."""
    small = small_shape(flavour, d_model=64, n_heads=8, n_kv_heads=4 if flavour == "llama" else 8, head_dim=8,
                        d_ffn=96)
    large = dataclasses.replace(small, d_ffn=96 * 4)
    model = randomised_model(small, seed=2)
    plan = make_plan(small, large, width="zero", seed=1, random_std=ratio, random_relative=True)
    name = "layers.1.mlp.up.weight"
    old_w = dict(model.named_parameters())[name].detach().double()
    big, _ = grow_module(model, torch.optim.AdamW(model.parameters()), plan)
    new_rows = dict(big.named_parameters())[name].detach().double()[96:]
    assert float(new_rows.std()) == pytest.approx(ratio * float(old_w.std()), rel=0.05)
    x, y = batch(small)
    with torch.no_grad():
        assert abs(loss_of(model, x, y).item() - loss_of(big, x, y).item()) < 1e-5


def test_relative_fan_in_under_tensor_parallel_equals_the_reference():
    """At TP=2 each rank grows its shard; the std is the whole weight's (two scalar sums over the group), so the
    reassembled shards equal the reference executor bit for bit; without the reduction a rank refuses to guess."""
    small = small_shape("llama")
    large = _wider(small)
    tpp = make_tp_plan(make_plan(small, large, width="zero", seed=3, random_std=1.0, random_relative=True), 2)
    plan = tpp.plan
    model = randomised_model(small, seed=6)
    old = dict(model.named_parameters())
    small_schema = parameter_schema(small)
    for name, spec in parameter_schema(plan.grown_shape).items():
        if not needs_full_std(plan, spec):
            continue
        w = old[source_name(plan, name)].detach()
        layout = reference_shard_spec(small_schema[source_name(plan, name)], 2, 0)
        shards = [dataclasses.replace(layout, tp_rank=r).shard(w) for r in range(2)]
        sharded = not layout.replicated

        def reduce_sum(t, shards=shards, seen={}):  # what the group's all-reduce of each rank's statistic gives
            xs = [x.double() for x in shards]
            if t.numel() == 2:  # (count, sum)
                tot = sum(torch.tensor([float(x.numel()), float(x.sum())], dtype=torch.float64) for x in xs)
                seen["mean"] = float(tot[1] / tot[0])
                return tot
            return sum(((x - seen["mean"]) ** 2).sum().reshape(1) for x in xs)  # squares about the mean

        got = layout.unshard([ShardGrower(tpp, r, reduce_sum).value(name, spec, s) for r, s in enumerate(shards)])
        assert torch.equal(got, grow_value(plan, name, spec, w)), name
        if sharded:
            with pytest.raises(RuntimeError, match="reduce_sum"):
                ShardGrower(tpp, 0).value(name, spec, shards[0])


@pytest.mark.parametrize("bad", [-0.1, float("nan"), True, "0.1"])
def test_a_bad_fan_in_std_is_refused_by_name(bad):
    small = small_shape("llama")
    with pytest.raises(ValueError, match="random_std"):
        make_plan(small, _wider(small), width="zero", random_std=bad)

"""LiGO: step 0 equals the initialising plan; training the operator on real text lowers the loss;
the small model stays frozen; the materialised state is a plain grown model."""
import dataclasses

import pytest
import torch

from growth_ds.demo import byte_batches
from growth_ds.models import Decoder, build_model, lm_loss
from growth_ds.ops import TrainingState, grow, grow_module, make_plan
from growth_ds.ops.ligo import LigoOperator, materialise_state
from growth_ds.ops.state import load_into
from growth_ds.train.ligo_fit import train_ligo
from helpers import batch, grown, randomised_model, small_shape
from dist_utils import FIXTURE


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("width,depth", [("duplicate", "identity"), ("lemon", "identity"), ("zero", None),
                                         ("staged", "interleave"), ("hypercloning", None)])
def test_step0_equals_the_initialising_plan(flavour, width, depth):
    small = small_shape(flavour)
    model = randomised_model(small)
    plan = make_plan(small, grown(small, True, depth is not None), width=width, depth=depth, seed=1)
    state = TrainingState.from_module(model)
    op = LigoOperator(plan, state.params)
    ref = grow(state, plan)
    mat = op.materialise()
    for name, t in ref.params.items():
        torch.testing.assert_close(mat[name], t, rtol=1e-6, atol=1e-6, msg=name)
    x, y = batch(small)
    big, _ = grow_module(model, None, plan)
    with torch.no_grad():
        assert abs(lm_loss(op(x), y).item() - lm_loss(big(x), y).item()) < 1e-5
    # the large model is a function of operator parameters only: no trainable large weights
    assert not any(p.requires_grad for p in op.skeleton.parameters())


def _text_model(flavour):
    shape = small_shape(flavour, vocab_size=256, max_seq_len=32, d_model=32, d_ffn=64)
    model = build_model(shape, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = FIXTURE.read_text()
    data = byte_batches(text, 32, 16, seed=0)
    for _ in range(40):
        x, y = next(data)
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        opt.step()
    return shape, model, opt, text


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_operator_training_lowers_the_loss(flavour):
    shape, model, opt, text = _text_model(flavour)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    large = dataclasses.replace(shape, d_model=48, n_heads=6, n_kv_heads=3 if flavour == "llama" else 6,
                                d_ffn=96, n_layers=3)
    plan = make_plan(shape, large, width="lemon", depth="identity", seed=0)
    state = TrainingState.from_module(model, opt)
    op = LigoOperator(plan, state.params)
    x_eval, y_eval = next(byte_batches(text, 32, 32, seed=123))
    with torch.no_grad():
        loss0 = lm_loss(op(x_eval), y_eval).item()
    losses = train_ligo(op, byte_batches(text, 32, 16, seed=1), steps=20, lr=3e-3, warmup=2)
    with torch.no_grad():
        loss20 = lm_loss(op(x_eval), y_eval).item()
    assert loss20 < loss0 - 1e-3, (loss0, loss20, losses)
    for n, p in model.named_parameters():  # the small model stayed frozen
        assert torch.equal(p, before[n]), n
    for moments in ("fresh", "plan"):
        grown_state = materialise_state(op, state, moments)
        big = Decoder(grown_state.shape)
        load_into(big, grown_state)
        with torch.no_grad():
            assert abs(lm_loss(big(x_eval), y_eval).item() - loss20) < 1e-5
        assert (grown_state.step == 0) == (moments == "fresh")
        assert all(grown_state.exp_avg[n].shape == t.shape for n, t in grown_state.params.items())


def test_step_flops_counts_model_and_materialisation():
    small = small_shape("llama")
    plan = make_plan(small, grown(small, True, True), width="duplicate", depth="identity")
    op = LigoOperator(plan, TrainingState.from_module(randomised_model(small)).params)
    from growth_ds.shapes import flops_per_token

    f = op.step_flops(1000, 16)
    assert f > flops_per_token(plan.grown_shape, 16) * 1000


def test_cli_grow_ligo(tmp_path):
    from growth_ds.checkpoint import load_state, save_state
    from growth_ds.cli import main
    from growth_ds.train.data import prepare_data
    import yaml

    prepare_data({"sources": [str(FIXTURE)], "vocab_size": 512, "val_fraction": 0.1}, tmp_path / "data")
    small = small_shape("llama", vocab_size=512)
    save_state(TrainingState.from_module(randomised_model(small)), tmp_path / "small.pt")
    (tmp_path / "large.yaml").write_text(yaml.safe_dump(grown(small, True, True).to_dict()))
    args = ["grow", "--from", str(tmp_path / "small.pt"), "--to", str(tmp_path / "large.yaml"), "--method", "ligo",
            "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "big.pt")]
    assert main(args[:-2] + ["--out", str(tmp_path / "x.pt")] + ["--data", str(tmp_path / "nope")]) == 2
    assert main(args + ["--data", str(tmp_path / "data")]) == 0
    big = load_state(tmp_path / "big.pt")
    assert big.shape.n_layers == 4 and big.step == 0


@pytest.mark.parametrize("flavour,tied", [("gpt2", True), ("llama", False)])
@pytest.mark.parametrize("width,depth", [("lemon", "identity"), ("hypercloning", "stack"), ("staged", None)])
def test_dense_maps_equal_the_materialised_operator(flavour, tied, width, depth):
    """The operator written as one dense map per parameter (what the ZeRO executor applies to partitions)
    gives the materialised large model, also after its parameters moved away from the initialising plan."""
    from growth_ds.ops.dense import apply_dense

    small = small_shape(flavour, tied_embeddings=tied)
    state = TrainingState.from_module(randomised_model(small))
    plan = make_plan(small, grown(small, True, depth is not None), width=width, depth=depth, seed=3)
    op = LigoOperator(plan, state.params)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref = op.materialise()
    maps = op.dense_maps()
    assert set(maps) == set(ref)
    for name, m in maps.items():
        torch.testing.assert_close(apply_dense(m, state.params), ref[name].detach(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("policy", ["restart", "rewarm", "continue"])
def test_materialised_state_carries_the_lr_policy_like_grow(policy):
    from growth_ds.ops import LRSchedule

    small = small_shape("llama")
    plan = make_plan(small, grown(small, True, True), width="lemon", depth="identity", seed=1, lr=policy)
    state = TrainingState.from_module(randomised_model(small), step=40)
    state.schedule, state.schedule_step = LRSchedule(1e-3, 10, 200, 0.1), 40
    op = LigoOperator(plan, state.params)
    ref = grow(state, plan)
    for moments in ("fresh", "plan"):
        got = materialise_state(op, state, moments)
        assert (got.schedule, got.schedule_step) == (ref.schedule, ref.schedule_step)
    if policy != "continue":
        assert (ref.schedule, ref.schedule_step) != (state.schedule, state.schedule_step)

"""Growth of the whole training state: Adam moments, step, LR schedule; training after growth;
refused growth leaves everything untouched."""
import copy
import dataclasses

import pytest
import torch

from growth_ds.models import Decoder
from growth_ds.ops import LRPolicy, LRSchedule, TrainingState, grow, grow_module, make_plan
from growth_ds.shapes import ModelShape, validate_growth
from helpers import batch, grown, loss_of, randomised_model, small_shape


def trained(shape, steps=3, seed=0, lr=1e-2):
    """A model and AdamW that took a few steps (non-zero, distinct moments)."""
    model = randomised_model(shape, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for i in range(steps):
        x, y = batch(shape, seed=100 + i)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    return model, opt


def moments(model, opt):
    return {n: (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], int(opt.state[p]["step"]))
            for n, p in model.named_parameters()}


def train(model, opt, steps, shape, seed=7):
    losses = []
    x, y = batch(shape, B=8, seed=seed)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- moments ------------------------------------------------------------------------------------

def test_staged_moments_follow_the_papers_rule():
    """staged x2: copies get m/2, v/4, off-diagonal blocks 0, the tied final norm's moments unscaled, step kept."""
    small = small_shape("gpt2")
    model, opt = trained(small)
    plan = make_plan(small, grown(small, True, False), width="staged")
    big, big_opt = grow_module(model, opt, plan)
    old, new = moments(model, opt), moments(big, big_opt)
    assert {n: s[0].shape for n, s in new.items()} == {n: p.shape for n, p in big.named_parameters()}
    m, v, step = old["layers.0.mlp.up.weight"]
    m2, v2, step2 = new["layers.0.mlp.up.weight"]
    assert step2 == step == 3
    torch.testing.assert_close(m2, torch.block_diag(m, m) / 2, rtol=0, atol=0)
    torch.testing.assert_close(v2, torch.block_diag(v, v) / 4, rtol=0, atol=0)
    m, v, _ = old["tok_emb.weight"]
    torch.testing.assert_close(new["tok_emb.weight"][0], torch.cat([m, m], 1) / 2, rtol=0, atol=0)
    m, v, _ = old["norm.weight"]  # final norm is halved, so its moments are copied unscaled
    torch.testing.assert_close(new["norm.weight"][0], torch.cat([m, m]), rtol=0, atol=0)
    torch.testing.assert_close(new["norm.weight"][1], torch.cat([v, v]), rtol=0, atol=0)
    m, v, _ = old["layers.1.attn.o.bias"]
    torch.testing.assert_close(new["layers.1.attn.o.bias"][1], torch.cat([v, v]) / 4, rtol=0, atol=0)


def test_zero_method_keeps_old_moments_and_zeroes_new():
    small = small_shape("llama")
    model, opt = trained(small)
    plan = make_plan(small, dataclasses.replace(small, d_ffn=64), width="zero")
    big, big_opt = grow_module(model, opt, plan)
    old, new = moments(model, opt), moments(big, big_opt)
    m, v, step = old["layers.1.mlp.down.weight"]
    m2, v2, step2 = new["layers.1.mlp.down.weight"]
    assert step2 == step
    assert torch.equal(m2[:, :48], m) and torch.equal(v2[:, :48], v)
    assert not m2[:, 48:].any() and not v2[:, 48:].any()


def test_adjoint_rule_for_duplicate_fan_in_split():
    """Rows copied c times get m/c; fan-in columns split 1/c keep m (c * 1/c = 1)."""
    small = small_shape("llama")
    model, opt = trained(small)
    plan = make_plan(small, dataclasses.replace(small, d_ffn=96), width="duplicate", moments="adjoint")
    big, big_opt = grow_module(model, opt, plan)
    old, new = moments(model, opt), moments(big, big_opt)
    m = old["layers.0.mlp.gate.weight"][0]
    torch.testing.assert_close(new["layers.0.mlp.gate.weight"][0], torch.cat([m, m]) / 2, rtol=0, atol=0)
    m, v, _ = old["layers.0.mlp.down.weight"]
    torch.testing.assert_close(new["layers.0.mlp.down.weight"][0], torch.cat([m, m], 1), rtol=0, atol=0)
    torch.testing.assert_close(new["layers.0.mlp.down.weight"][1], torch.cat([v, v], 1), rtol=0, atol=0)


def test_reset_rule_is_a_fresh_adamw():
    small = small_shape("llama")
    model, opt = trained(small)
    plan = make_plan(small, grown(small, True, True), width="lemon", depth="identity")
    assert plan.moments == "reset"
    big, big_opt = grow_module(model, opt, plan)
    for n, (m, v, step) in moments(big, big_opt).items():
        assert step == 0 and not m.any() and not v.any(), n
    # a fresh AdamW from the same weights takes the same first step
    ref = copy.deepcopy(big)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    train(big, big_opt, 1, small)
    train(ref, ref_opt, 1, small)
    for (n, p), q in zip(big.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_identity_blocks_start_with_zero_moments():
    small = small_shape("gpt2")
    model, opt = trained(small)
    plan = make_plan(small, dataclasses.replace(small, n_layers=3), depth="identity", positions=[1])
    big, big_opt = grow_module(model, opt, plan)
    old, new = moments(model, opt), moments(big, big_opt)
    for n, (m, v, _) in new.items():
        if n.startswith("layers.1."):
            assert not m.any() and not v.any(), n
    assert torch.equal(new["layers.2.attn.q.weight"][0], old["layers.1.attn.q.weight"][0])
    assert not big.layers[1].attn.o.weight.any() and not big.layers[1].mlp.down.bias.any()


def _hand_staged(model, opt, shape):
    """Staged training's x2 operator written out by hand (Shen et al. 2022, gpt2, tied embeddings)."""
    big = Decoder(dataclasses.replace(shape, d_model=2 * shape.d_model, n_heads=2 * shape.n_heads,
                                      n_kv_heads=2 * shape.n_kv_heads, d_ffn=2 * shape.d_ffn))
    params, ms, vs = {}, {}, {}
    for n, p in model.named_parameters():
        st = opt.state[p]
        m, v = st["exp_avg"], st["exp_avg_sq"]
        if n.endswith(("emb.weight",)):
            params[n], ms[n], vs[n] = torch.cat([p, p], 1), torch.cat([m, m], 1) / 2, torch.cat([v, v], 1) / 4
        elif p.dim() == 2:
            params[n], ms[n], vs[n] = torch.block_diag(p, p), torch.block_diag(m, m) / 2, torch.block_diag(v, v) / 4
        elif n.startswith("norm."):  # ln_f: halved, moments duplicated without scaling
            params[n], ms[n], vs[n] = torch.cat([p, p]) / 2, torch.cat([m, m]), torch.cat([v, v])
        else:
            params[n], ms[n], vs[n] = torch.cat([p, p]), torch.cat([m, m]) / 2, torch.cat([v, v]) / 4
    with torch.no_grad():
        for n, p in big.named_parameters():
            p.copy_(params[n])
    big_opt = torch.optim.AdamW(big.parameters(), lr=1e-2, weight_decay=0.1)
    for n, p in big.named_parameters():
        big_opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": ms[n].clone(), "exp_avg_sq": vs[n].clone()}
    return big, big_opt


def test_next_adamw_step_equals_hand_built_reference():
    small = small_shape("gpt2")
    model, opt = trained(small)
    big, big_opt = grow_module(model, opt, make_plan(small, grown(small, True, False), width="staged"))
    ref, ref_opt = _hand_staged(model, opt, small)
    for (n, p), q in zip(big.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    train(big, big_opt, 2, small)
    train(ref, ref_opt, 2, small)
    for (n, p), q in zip(big.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


# ---- training after growth ----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["duplicate", "lemon", "zero", "hypercloning", "staged"])
def test_training_after_growth_and_symmetry(method):
    """20 AdamW steps: the loss falls. Copies of a duplicated FFN neuron diverge under lemon
    (unequal fan-in split); under duplicate they stay identical (Net2Net's known symmetry: equal
    copies receive equal gradients forever). Under zero, new neurons' zero fan-out starts learning."""
    small = small_shape("llama")
    model, opt = trained(small)
    big, big_opt = grow_module(model, opt, make_plan(small, grown(small, True, False), width=method))
    losses = train(big, big_opt, 20, small)
    assert losses[-1] < losses[0] - 0.05, losses
    up = big.layers[0].mlp.up.weight.detach()
    copy_gap = (up[:48] - up[48:]).abs().max().item()
    if method == "duplicate":
        assert copy_gap < 1e-5, copy_gap
    elif method == "lemon":
        assert copy_gap > 1e-3, copy_gap
    elif method == "zero":
        new_fan_out = big.layers[0].mlp.down.weight.detach()[:, 48:]
        assert new_fan_out.abs().max().item() > 1e-3


# ---- LR schedule --------------------------------------------------------------------------------

def test_lr_policies():
    sched = LRSchedule(peak_lr=1e-3, warmup_steps=10, total_steps=1000)
    small = small_shape("llama")
    model = randomised_model(small)
    state = TrainingState.from_module(model, None, step=400, schedule=sched, schedule_step=400)
    large = grown(small, True, False)
    out = grow(state, make_plan(small, large, width="duplicate"))  # continue
    assert out.schedule == sched and out.schedule_step == 400
    out = grow(state, make_plan(small, large, width="staged", lr=LRPolicy("rewarm", rho=2.0, rewarm_steps=50)))
    assert out.schedule_step == 200 and out.step == 400
    # re-planned: the 600 steps left end the new schedule (800 = 200 + 600), the ramp reaches its value at 250
    assert out.schedule.total_steps == 800
    assert out.schedule.lr(200) == pytest.approx(out.schedule.base(250) / 50)
    assert out.schedule.lr(249) == pytest.approx(out.schedule.base(250))
    assert out.schedule.lr(799) == pytest.approx(sched.lr(999), rel=1e-3)
    out = grow(state, make_plan(small, large, width="lemon"))
    assert out.schedule_step == 0 and out.schedule.total_steps == 600
    assert max(out.schedule.lr(t) for t in range(600)) == pytest.approx(1e-3)
    out = grow(state, make_plan(small, large, width="duplicate", lr="restart"))
    assert out.schedule_step == 0 and out.schedule.lr(0) == sched.lr(0)


# ---- refusals leave everything untouched ---------------------------------------------------------

def snapshot(model, opt):
    return copy.deepcopy(({n: p.detach().clone() for n, p in model.named_parameters()}, opt.state_dict()))


def same(a, b):
    pa, oa = a
    pb, ob = b
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    for k, st in oa["state"].items():
        for key, t in st.items():
            assert torch.equal(t, ob["state"][k][key])


@pytest.mark.parametrize("bad", [
    dict(d_model=16), dict(n_layers=1), dict(n_heads=6, n_kv_heads=4), dict(head_dim=16), dict(vocab_size=80),
    dict(flavour="gpt2", n_kv_heads=4), dict(tied_embeddings=False),
])
def test_validate_growth_names_the_field(bad):
    small = small_shape("llama")
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        large = dataclasses.replace(small, **bad)
        validate_growth(small, large)


def test_refused_growth_leaves_state_unchanged():
    small = small_shape("llama")
    model, opt = trained(small)
    before = snapshot(model, opt)
    bad_calls = [
        lambda: make_plan(small, dataclasses.replace(small, d_model=16), width="lemon"),
        lambda: make_plan(small, dataclasses.replace(small, d_model=48), width="staged"),
        lambda: make_plan(small, dataclasses.replace(small, n_layers=4), depth="nope"),
        lambda: make_plan(small, dataclasses.replace(small, d_model=64)),  # no width method
        # a plan for another small shape: the model does not match it
        lambda: grow_module(model, opt, make_plan(dataclasses.replace(small, d_ffn=40),
                                                  dataclasses.replace(small, d_ffn=80), width="duplicate")),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
        same(before, snapshot(model, opt))
    # a state whose tensors do not match its shape is refused with the parameter's name
    state = TrainingState.from_module(model, opt)
    state.params["layers.1.mlp.up.weight"] = torch.zeros(3, 3)
    kept = {k: v.clone() for k, v in state.params.items()}
    with pytest.raises(ValueError, match="layers.1.mlp.up.weight"):
        grow(state, make_plan(small, grown(small, True, False), width="duplicate"))
    assert all(torch.equal(kept[k], state.params[k]) for k in kept)


def test_shape_yaml_round_trip(tmp_path):
    import yaml

    shape = ModelShape(flavour="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ffn=172,
                       vocab_size=256, max_seq_len=64)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(shape.to_dict()))
    assert ModelShape.from_yaml(path) == shape
    path.write_text("d_model: 64\nwidth: 3\n")
    with pytest.raises(ValueError, match="width"):
        ModelShape.from_yaml(path)

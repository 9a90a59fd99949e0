"""Lossless growth: the grown model computes the small model's function (fp32)."""
import dataclasses

import pytest
import torch

from growth_ds.ops import METHODS, grow_module, make_plan
from helpers import batch, grown, loss_of, randomised_model, small_shape

LOSSLESS_WIDTH = [m for m, v in METHODS.items() if v["width_lossless"]]
LOSSLESS_DEPTH = [m for m, v in METHODS.items() if v["depth_lossless"]]


def assert_same_function(small, big, shape):
    x, y = batch(shape)
    with torch.no_grad():
        a, b = small(x), big(x)
        la, lb = loss_of(small, x, y), loss_of(big, x, y)
    assert (a - b).abs().max().item() < 1e-4, f"max logit diff {(a - b).abs().max().item():.3g}"
    assert abs(la.item() - lb.item()) < 1e-5, f"loss {la.item()} vs {lb.item()}"


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("axes", ["width", "depth", "both"])
@pytest.mark.parametrize("method", LOSSLESS_WIDTH + LOSSLESS_DEPTH)
def test_lossless_methods(method, axes, flavour):
    """Every lossless method x flavour x {width, depth, both}: loss within 1e-5, logits within 1e-4."""
    is_width = method in LOSSLESS_WIDTH
    if axes == "width" and not is_width:
        pytest.skip("a depth method does not act on width")
    # a width method under "depth" runs with an unchanged width (its maps must reduce to identities)
    small = small_shape(flavour)
    large = grown(small, width=axes in ("width", "both"), depth=axes in ("depth", "both"))
    width = method if is_width else ("duplicate" if axes == "both" else None)
    depth = None if axes == "width" else (method if not is_width else "identity")
    model = randomised_model(small)
    plan = make_plan(small, large, width=width, depth=depth, seed=3)
    big, opt = grow_module(model, torch.optim.AdamW(model.parameters()), plan)
    assert big.shape.n_layers == large.n_layers and big.shape.d_model == large.d_model
    assert_same_function(model, big, small)


GQA_CASES = [  # (small heads, small kv) -> (large heads, large kv)
    ((4, 2), (8, 2)), ((4, 2), (6, 3)), ((4, 2), (8, 4)), ((4, 1), (8, 2)), ((4, 2), (4, 4)), ((6, 2), (9, 3)),
]


@pytest.mark.parametrize("heads", GQA_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("method", ["duplicate", "lemon", "zero"])
def test_gqa_heads_and_kv_grow_consistently(heads, method):
    (h, k), (h2, k2) = heads
    small = small_shape("llama", n_heads=h, n_kv_heads=k)
    large = dataclasses.replace(small, n_heads=h2, n_kv_heads=k2, d_ffn=70)
    model = randomised_model(small)
    try:
        plan = make_plan(small, large, width=method)
    except ValueError as e:  # only the zero method may refuse, and only when group size shrinks
        assert method == "zero" and (h2 // k2) < (h // k), e
        assert "n_kv_heads" in str(e)
        return
    big, _ = grow_module(model, None, plan)
    assert_same_function(model, big, small)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lemon", "zero"])
def test_non_integer_width_ratio(method, flavour):
    """d_model 96 -> 160 (and ffn, heads by non-integer ratios) stays exact for lemon and zero."""
    small = small_shape(flavour, d_model=96, head_dim=16, d_ffn=100, n_layers=2)
    large = dataclasses.replace(small, d_model=160, n_heads=6, n_kv_heads=3 if flavour == "llama" else 6,
                                d_ffn=150, n_layers=3)
    model = randomised_model(small)
    plan = make_plan(small, large, width=method, depth="identity")
    big, _ = grow_module(model, None, plan)
    assert big.shape.norm_eps == pytest.approx(small.norm_eps * 96 / 160)
    assert_same_function(model, big, small)


@pytest.mark.parametrize("method", ["duplicate", "hypercloning", "staged"])
def test_non_integer_model_ratio_refused(method):
    small = small_shape("llama", d_model=96, head_dim=16, d_ffn=96)
    large = dataclasses.replace(small, d_model=160, d_ffn=192)
    with pytest.raises(ValueError, match="d_model"):
        make_plan(small, large, width=method)


@pytest.mark.parametrize("method", ["hypercloning", "staged"])
def test_integer_only_methods_refuse_ffn_and_heads(method):
    small = small_shape("llama")
    with pytest.raises(ValueError, match="d_ffn"):
        make_plan(small, dataclasses.replace(small, d_ffn=50), width=method)
    with pytest.raises(ValueError, match="n_heads"):
        make_plan(small, dataclasses.replace(small, n_heads=6, n_kv_heads=2), width=method)


def test_duplicate_allows_non_integer_ffn_and_heads():
    small = small_shape("gpt2")
    large = dataclasses.replace(small, d_ffn=77, n_heads=6, n_kv_heads=6, max_seq_len=24)
    model = randomised_model(small)
    big, _ = grow_module(model, None, make_plan(small, large, width="duplicate"))
    assert_same_function(model, big, small)


@pytest.mark.parametrize("depth", ["stack", "interleave"])
def test_copying_depth_is_not_lossless_and_says_so(depth):
    assert METHODS[depth]["depth_lossless"] is False
    small = small_shape("llama")
    large = dataclasses.replace(small, n_layers=4)
    model = randomised_model(small)
    plan = make_plan(small, large, depth=depth)
    assert not plan.lossless
    big, _ = grow_module(model, None, plan)
    x, y = batch(small)
    with torch.no_grad():
        assert abs(loss_of(model, x, y).item() - loss_of(big, x, y).item()) > 1e-4
    expected = [0, 1, 0, 1] if depth == "stack" else [0, 0, 1, 1]
    assert [e.source for e in plan.layers] == expected


def test_identity_positions():
    small = small_shape("llama", n_layers=3)
    large = dataclasses.replace(small, n_layers=5)
    model = randomised_model(small)
    plan = make_plan(small, large, depth="identity", positions=[0, 4])
    assert [(e.source, e.kind) for e in plan.layers] == [(0, "identity"), (0, "copy"), (1, "copy"), (2, "copy"),
                                                        (2, "identity")]
    big, _ = grow_module(model, None, plan)
    assert_same_function(model, big, small)
    for bad in ([1], [0, 0], [0, 5]):
        with pytest.raises(ValueError, match="positions"):
            make_plan(small, large, depth="identity", positions=bad)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("axes", ["width", "depth", "both"])
def test_recommended_recipe_fills_only_what_grows(axes, flavour):
    """``make_plan(..., recipe="recommended")`` names the methods of the axes that grow (ops.plan.RECIPES) and
    keeps what the caller names; lossless exactly where its methods are (the width's ``zero``)."""
    from growth_ds.ops.plan import RECIPES

    small = small_shape(flavour)
    large = grown(small, width=axes in ("width", "both"), depth=axes in ("depth", "both"))
    plan = make_plan(small, large, recipe="recommended", seed=1)
    rec = RECIPES["recommended"]
    assert plan.width == (rec["width"] if axes != "depth" else None)
    assert plan.depth == (rec["depth"] if axes != "width" else None)
    assert plan.moments == rec["moments"] and plan.lr.kind == rec["lr"]
    model = randomised_model(small)
    big, _ = grow_module(model, torch.optim.AdamW(model.parameters()), plan)
    assert plan.lossless == (METHODS[rec["depth"]]["depth_lossless"] or axes == "width")
    if plan.lossless:
        assert_same_function(model, big, small)
    else:
        x, y = batch(small)
        assert torch.isfinite(loss_of(big, x, y))
    assert (plan.random_std, plan.random_relative) == (rec["random_std"], rec["random_relative"])
    assert make_plan(small, large, recipe="recommended", moments="reset").moments == "reset"
    # the fan-in: a std alone keeps the recipe's mode; the other mode alone takes that mode's default
    p = make_plan(small, large, recipe="recommended", random_std=0.5)
    assert (p.random_std, p.random_relative) == (0.5, rec["random_relative"])
    p = make_plan(small, large, recipe="recommended", random_relative=not rec["random_relative"])
    assert (p.random_std, p.random_relative) == (0.02 if rec["random_relative"] else 1.0, not rec["random_relative"])
    assert make_plan(small, large, width="zero" if axes != "depth" else None,
                     depth="stack" if axes != "width" else None).random_std == 0.02  # no recipe: absolute 0.02
    with pytest.raises(ValueError, match="recipe: unknown"):
        make_plan(small, large, recipe="best")

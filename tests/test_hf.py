"""Hugging Face interop (growth_ds.interop.hf): GPT2LMHeadModel / LlamaForCausalLM import and export.

Small random HF models are built from configs (no hub access), with every weight, norm gain and bias
randomised so that a wrong mapping changes the logits. Import gives transformers' own logits within
1e-5; a grown model exported with save_pretrained and loaded back by transformers gives the small HF
model's logits within 1e-4 for lossless methods.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
import yaml
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from growth_ds.checkpoint import load_state
from growth_ds.interop import hf
from growth_ds.models import Decoder
from growth_ds.ops import grow, make_plan
from growth_ds.ops.state import load_into
from helpers import randomised_model, small_shape

V, T = 96, 16


def gpt2_config(**kw):
    base = dict(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=4, n_inner=48, layer_norm_epsilon=1e-5,
                bos_token_id=None, eos_token_id=None)
    return GPT2Config(**{**base, **kw})


def llama_config(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=T, rms_norm_eps=1e-6, rope_theta=500.0,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    return LlamaConfig(**{**base, **kw})


CONFIGS = {
    "gpt2": lambda: gpt2_config(),
    "gpt2-untied-eps": lambda: gpt2_config(tie_word_embeddings=False, layer_norm_epsilon=1e-3, n_inner=None),
    "gpt2-pytorch-tanh": lambda: gpt2_config(activation_function="gelu_pytorch_tanh"),
    "llama-gqa-untied": lambda: llama_config(),
    "llama-gqa-tied": lambda: llama_config(tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=2,
                                           rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama-mqa-headdim": lambda: llama_config(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
}


def random_hf(config, seed: int = 0):
    """A transformers model with every parameter random (norm gains around 1), in eval mode."""
    cls = GPT2LMHeadModel if config.model_type == "gpt2" else LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "layernorm.weight", "norm.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokens(B: int = 3, seed: int = 0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def ref_logits(state_or_model, x):
    if isinstance(state_or_model, Decoder):
        model = state_or_model
    else:
        model = Decoder(state_or_model.shape)
        load_into(model, state_or_model)
    with torch.no_grad():
        return model(x)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---- import ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_import_matches_transformers(tmp_path, name):
    model = random_hf(CONFIGS[name]())
    model.save_pretrained(tmp_path / "hf")
    x = tokens()
    want = hf_logits(model, x)
    assert want.abs().max() > 1.0  # logits that depend on the weights
    state = hf.load_hf(tmp_path / "hf")
    assert state.exp_avg is None and state.step == 0
    cfg = model.config
    if cfg.model_type == "gpt2":
        assert state.shape.norm_eps == cfg.layer_norm_epsilon and state.shape.max_seq_len == cfg.n_positions
        assert state.shape.d_ffn == (cfg.n_inner or 4 * cfg.n_embd)
    else:
        assert state.shape.n_kv_heads == cfg.num_key_value_heads and state.shape.norm_eps == cfg.rms_norm_eps
        assert state.shape.head_dim == cfg.head_dim and state.shape.rope_theta == cfg.rope_parameters["rope_theta"]
    assert state.shape.tied_embeddings == cfg.tie_word_embeddings
    assert max_diff(ref_logits(state, x), want) < 1e-5
    assert max_diff(hf.from_hf_model(model)(x).detach(), want) < 1e-5  # in memory, same mapping


def test_import_sharded_and_bin_checkpoints(tmp_path):
    model = random_hf(llama_config(num_hidden_layers=3))
    x = tokens()
    want = hf_logits(model, x)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert max_diff(ref_logits(hf.load_hf(tmp_path / "sharded"), x), want) < 1e-5
    # an older pytorch_model.bin of a GPT2Model-style checkpoint: no "transformer." prefix, mask buffers, fp16
    gpt = random_hf(gpt2_config())
    bin_dir = tmp_path / "bin"
    gpt.config.save_pretrained(bin_dir)
    sd = {k.removeprefix("transformer."): v.half() for k, v in gpt.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, T, T, dtype=torch.bool))
    torch.save(sd, bin_dir / "pytorch_model.bin")
    state = hf.load_hf(bin_dir)
    assert state.params["tok_emb.weight"].dtype == torch.float32
    gpt.half().float()  # the reference: the same fp16-rounded weights
    assert max_diff(ref_logits(state, x), hf_logits(gpt, x)) < 1e-5


@pytest.mark.parametrize("config,field", [
    (lambda: gpt2_config(activation_function="gelu"), "activation_function"),
    (lambda: gpt2_config(scale_attn_by_inverse_layer_idx=True), "scale_attn"),
    (lambda: llama_config(attention_bias=True), "attention_bias"),
    (lambda: llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
     "rope_scaling"),
    (lambda: transformers.BertConfig(vocab_size=V), "model_type"),
])
def test_unsupported_configs_are_refused_with_the_field(config, field):
    with pytest.raises(ValueError, match=field):
        hf.shape_from_hf_config(config())


# ---- export ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour,tied", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False)])
def test_export_loads_in_transformers(tmp_path, flavour, tied):
    shape = dataclasses.replace(small_shape(flavour), vocab_size=V, max_seq_len=T, tied_embeddings=tied,
                                norm_eps=2e-5, rope_theta=777.0 if flavour == "llama" else 10000.0)
    model = randomised_model(shape, seed=1)
    out = hf.save_hf(model, tmp_path / "out")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files and not any(f.endswith(".bin") for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == hf.SUPPORTED[flavour]
    assert loaded.config.tie_word_embeddings == tied
    x = tokens()
    assert max_diff(hf_logits(loaded, x), ref_logits(model, x)) < 1e-5
    back = hf.load_hf(out)  # and back: the same shape, bit for bit
    assert back.shape == shape
    assert all(torch.equal(back.params[n], p) for n, p in model.named_parameters())
    with pytest.raises(FileExistsError):
        hf.save_hf(model, out)
    hf.save_hf(model, out, overwrite=True, dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_gpt2_export_refuses_gqa():
    shape = dataclasses.replace(small_shape("gpt2"), n_kv_heads=2)
    with pytest.raises(ValueError, match="n_kv_heads"):
        hf.hf_config(shape)


# ---- growth ---------------------------------------------------------------------------------------
GROWTHS = [  # (HF config, target changes, method)
    ("gpt2", dict(d_model=64, n_heads=8, n_kv_heads=8, d_ffn=96, n_layers=4), "lemon+identity"),
    ("gpt2", dict(d_model=48, n_heads=6, n_kv_heads=6, d_ffn=72), "lemon"),  # non-integer: norm eps rescaled
    ("gpt2-untied-eps", dict(d_model=64, n_heads=8, n_kv_heads=8, d_ffn=256), "duplicate"),
    ("llama-gqa-untied", dict(d_model=64, n_heads=8, n_kv_heads=4, d_ffn=112, n_layers=3), "lemon+identity"),
    ("llama-gqa-untied", dict(d_model=64, n_heads=8, n_kv_heads=4, d_ffn=112, n_layers=4), "staged+identity"),
    ("llama-gqa-tied", dict(d_model=64, n_heads=16, n_kv_heads=4, d_ffn=112), "hypercloning"),
    ("llama-mqa-headdim", dict(d_model=48, n_heads=8, n_kv_heads=2, d_ffn=80, n_layers=3), "zero+identity"),
]


def _target_yaml(tmp_path, shape, changes, keep_norm_eps=False):
    """A --to shape YAML with only sizes (norm_eps / rope_theta come from the source)."""
    large = dataclasses.replace(shape, **changes).to_dict()
    for k in ("norm_eps", "rope_theta"):
        large.pop(k)
    path = tmp_path / "to.yaml"
    path.write_text(yaml.safe_dump(large))
    return path


@pytest.mark.parametrize("name,changes,method", GROWTHS, ids=[f"{g[0]}-{g[2]}" for g in GROWTHS])
def test_grown_export_reproduces_small_hf_model(tmp_path, name, changes, method):
    small = random_hf(CONFIGS[name]())
    small.save_pretrained(tmp_path / "small")
    shape = hf.shape_from_hf_config(small.config)
    to = _target_yaml(tmp_path, shape, changes)
    from growth_ds.cli import _parse_methods

    width, depth = _parse_methods(method)
    plan = hf.grow_hf(tmp_path / "small", to, tmp_path / "big", width=width, depth=depth, seed=1)
    assert plan.lossless
    big = AutoModelForCausalLM.from_pretrained(tmp_path / "big").eval()
    grown_shape = hf.shape_from_hf_config(big.config)
    for k, v in changes.items():
        assert getattr(grown_shape, k) == v
    assert grown_shape.norm_eps == pytest.approx(plan.grown_shape.norm_eps, rel=1e-12)
    assert grown_shape.rope_theta == shape.rope_theta
    if changes["d_model"] % shape.d_model:  # LEMON on a non-integer ratio: the exported eps is rescaled
        assert grown_shape.norm_eps != shape.norm_eps
    x = tokens()
    assert max_diff(hf_logits(big, x), hf_logits(small, x)) < 1e-4


def _grow_args(argv):
    """`growth-ds grow --from-hf ...` through the real CLI."""
    from growth_ds import cli

    return lambda: cli.main(argv)


def _convert(argv):
    from growth_ds import cli

    return cli.main(["convert", *argv])


def test_cli_grow_from_hf_and_convert_both_ways(tmp_path, capsys):
    small = random_hf(CONFIGS["llama-gqa-untied"]())
    small.save_pretrained(tmp_path / "small")
    x = tokens()
    want = hf_logits(small, x)
    shape = hf.shape_from_hf_config(small.config)
    to = _target_yaml(tmp_path, shape, dict(d_model=64, n_heads=8, n_kv_heads=4, d_ffn=112, n_layers=3))
    out = tmp_path / "big"
    argv = ["grow", "--from-hf", str(tmp_path / "small"), "--to", str(to), "--method", "lemon+identity",
            "--out", str(out), "--dtype", "float32"]
    assert _grow_args(argv)() == 0
    assert max_diff(hf_logits(AutoModelForCausalLM.from_pretrained(out), x), want) < 1e-4

    # HF -> growth-ds checkpoint -> grown by `growth-ds grow` -> HF
    ckpt = tmp_path / "small.pt"
    assert _convert([str(tmp_path / "small"), str(ckpt)]) == 0
    state = load_state(ckpt)
    assert state.shape == shape and max_diff(ref_logits(state, x), want) < 1e-5
    assert _convert([str(tmp_path / "small"), str(ckpt)]) == 2  # exists: refused, untouched
    captured = capsys.readouterr()
    assert "exists" in captured.out + captured.err
    # --shape is for plain torch files: a Hugging Face source's config.json gives it
    assert _convert([str(tmp_path / "small"), str(tmp_path / "other.pt"), "--shape", str(to)]) == 2
    captured = capsys.readouterr()
    assert "--shape" in captured.out + captured.err and not (tmp_path / "other.pt").exists()
    large = hf._target_shape(to, shape)
    grown_state = grow(state, make_plan(shape, large, width="lemon", depth="identity"))
    from growth_ds.checkpoint import save_state

    save_state(grown_state, tmp_path / "grown.pt")
    assert _convert([str(tmp_path / "grown.pt"), str(tmp_path / "grown-hf")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "grown-hf")
    assert max_diff(hf_logits(back, x), want) < 1e-4
    assert _convert([str(tmp_path / "grown-hf"), str(tmp_path / "again.pt"), "--dtype", "bfloat16"]) == 0
    assert load_state(tmp_path / "again.pt").params["tok_emb.weight"].dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "grown-hf" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 4 and cfg["max_position_embeddings"] == T


def test_grow_from_hf_refuses_a_different_rope_base(tmp_path):
    small = random_hf(CONFIGS["llama-gqa-untied"]())
    small.save_pretrained(tmp_path / "small")
    shape = hf.shape_from_hf_config(small.config)
    to = tmp_path / "to.yaml"
    to.write_text(yaml.safe_dump(dataclasses.replace(shape, d_model=64, n_heads=8, n_kv_heads=4, d_ffn=112,
                                                     rope_theta=10000.0).to_dict()))
    with pytest.raises(ValueError, match="rope_theta"):
        hf.grow_hf(tmp_path / "small", to, tmp_path / "big", width="lemon")
    assert not (tmp_path / "big").exists()

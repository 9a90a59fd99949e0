"""Hugging Face ``transformers`` interop: ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` <-> the reference decoder.

Import reads a local checkpoint directory (``config.json`` + ``model.safetensors``, sharded
``*.safetensors`` with an index, or ``pytorch_model*.bin``) into a :class:`~growth_ds.ops.TrainingState`
(weights only); export writes any reference model, grown or not, with ``save_pretrained`` (safetensors).
Nothing is downloaded: ``transformers`` (the ``hf`` extra) is used for configs and ``save_pretrained``.

Parameter correspondence (``L`` = ``layers.{i}.`` on the reference side)::

    GPT2LMHeadModel (prefix transformer.)     reference                 notes
    wte.weight           [V, d]               tok_emb.weight
    wpe.weight           [P, d]               pos_emb.weight
    h.i.ln_1.{weight,bias}                    L attn_norm.*             LayerNorm(eps = layer_norm_epsilon)
    h.i.attn.c_attn.weight  [d, 3d]           L attn.{q,k,v}.weight     Conv1D is (in, out): transposed, then
    h.i.attn.c_attn.bias    [3d]              L attn.{q,k,v}.bias       split into q | k | v column blocks
    h.i.attn.c_proj.{weight [d, d], bias}     L attn.o.*                transposed
    h.i.ln_2.*                                L mlp_norm.*
    h.i.mlp.c_fc.{weight [d, f], bias}        L mlp.up.*                transposed; activation gelu_new (tanh)
    h.i.mlp.c_proj.{weight [f, d], bias}      L mlp.down.*              transposed
    ln_f.*                                    norm.*
    lm_head.weight (untied only)              lm_head.weight

    LlamaForCausalLM (prefix model.)
    embed_tokens.weight                       tok_emb.weight
    layers.i.input_layernorm.weight           L attn_norm.weight        RMSNorm(eps = rms_norm_eps)
    layers.i.self_attn.{q,k,v,o}_proj.weight  L attn.{q,k,v,o}.weight   same (out, in) layout; RoPE rotate-half,
                                                                        GQA: query head h reads kv head h // (H/K)
    layers.i.post_attention_layernorm.weight  L mlp_norm.weight
    layers.i.mlp.{gate,up,down}_proj.weight   L mlp.{gate,up,down}.weight   SwiGLU (silu)
    norm.weight                               norm.weight
    lm_head.weight (untied only)              lm_head.weight

Config correspondence: ``max_seq_len`` = ``n_positions`` / ``max_position_embeddings``, ``norm_eps`` =
``layer_norm_epsilon`` / ``rms_norm_eps`` (a LEMON-grown model's rescaled eps is exported as is),
``rope_theta`` = the default RoPE's theta, ``tied_embeddings`` = ``tie_word_embeddings``. Configs the
reference decoder cannot reproduce exactly (another activation, biases on Llama projections, RoPE
scaling, GPT-2's per-layer attention scaling, cross-attention) are refused with the field named.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

from growth_ds import atomic
from growth_ds.models.schema import param_shape, parameter_schema
from growth_ds.ops.state import TrainingState
from growth_ds.shapes import ModelShape

Tensors = Dict[str, torch.Tensor]
SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the hf extra is installed in CI
        raise ImportError("Hugging Face interop needs transformers: pip install 'growth-ds[hf]'") from e
    return transformers


def _dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# ---- configs ------------------------------------------------------------------------------------
def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _rope(cfg) -> tuple:
    """(rope_type, theta) from a transformers v5 ``rope_parameters`` or v4 ``rope_theta``/``rope_scaling``."""
    params = _get(cfg, "rope_parameters")
    if isinstance(params, dict) and params:
        return params.get("rope_type", params.get("type", "default")), float(params.get("rope_theta", 10000.0))
    scaling = _get(cfg, "rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    return kind, float(_get(cfg, "rope_theta", 10000.0))


def shape_from_hf_config(cfg) -> ModelShape:
    """The :class:`ModelShape` of a ``GPT2Config`` / ``LlamaConfig`` (object or its dict).

    Raises ``ValueError`` naming the config field for anything the reference decoder does not compute
    exactly the way ``transformers`` does.
    """
    kind = _get(cfg, "model_type")
    if kind == "gpt2":
        d, heads = _get(cfg, "n_embd", 768), _get(cfg, "n_head", 12)
        act = _get(cfg, "activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise ValueError(f"activation_function: {act!r} is not GELU's tanh approximation {GPT2_ACTIVATIONS}, "
                             f"which the reference gpt2 flavour computes")
        if not _get(cfg, "scale_attn_weights", True) or _get(cfg, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("scale_attn_weights / scale_attn_by_inverse_layer_idx: only 1/sqrt(head_dim) attention "
                             "scaling is supported")
        if _get(cfg, "add_cross_attention", False):
            raise ValueError("add_cross_attention: cross-attention layers are not part of the reference decoder")
        if d % heads:
            raise ValueError(f"n_embd: {d} is not divisible by n_head={heads}")
        return ModelShape(flavour="gpt2", n_layers=_get(cfg, "n_layer", 12), d_model=d, n_heads=heads,
                          n_kv_heads=heads, head_dim=d // heads, d_ffn=_get(cfg, "n_inner") or 4 * d,
                          vocab_size=_get(cfg, "vocab_size"), max_seq_len=_get(cfg, "n_positions", 1024),
                          tied_embeddings=bool(_get(cfg, "tie_word_embeddings", True)),
                          norm_eps=float(_get(cfg, "layer_norm_epsilon", 1e-5)))
    if kind == "llama":
        act = _get(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act: {act!r}; the reference llama flavour is SwiGLU with silu")
        for key in ("attention_bias", "mlp_bias"):
            if _get(cfg, key, False):
                raise ValueError(f"{key}: biases on Llama projections are not part of the reference decoder")
        rope_type, theta = _rope(cfg)
        if rope_type != "default":
            raise ValueError(f"rope_scaling: RoPE type {rope_type!r} is not supported (only plain RoPE)")
        d, heads = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
        head_dim = _get(cfg, "head_dim") or d // heads
        return ModelShape(flavour="llama", n_layers=_get(cfg, "num_hidden_layers"), d_model=d, n_heads=heads,
                          n_kv_heads=_get(cfg, "num_key_value_heads") or heads, head_dim=head_dim,
                          d_ffn=_get(cfg, "intermediate_size"), vocab_size=_get(cfg, "vocab_size"),
                          max_seq_len=_get(cfg, "max_position_embeddings", 2048),
                          tied_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
                          norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)), rope_theta=theta)
    raise ValueError(f"model_type: {kind!r} is not supported; supported: {sorted(SUPPORTED)} "
                     f"({', '.join(SUPPORTED.values())})")


def hf_config(shape: ModelShape, **overrides):
    """A ``GPT2Config`` or ``LlamaConfig`` computing exactly what the reference decoder of ``shape`` does.

    ``overrides`` are passed on (e.g. ``bos_token_id``/``eos_token_id``, which default to ``None``:
    the tokenizer is the training run's, not GPT-2's or Llama's).
    """
    tf = _transformers()
    common = dict(vocab_size=shape.vocab_size, tie_word_embeddings=shape.tied_embeddings, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, architectures=[SUPPORTED[shape.flavour]])
    if shape.flavour == "gpt2":
        if shape.n_kv_heads != shape.n_heads:
            raise ValueError(f"n_kv_heads: GPT2LMHeadModel has no grouped-query attention "
                             f"({shape.n_kv_heads} kv heads for {shape.n_heads} query heads)")
        if shape.n_heads * shape.head_dim != shape.d_model:
            raise ValueError(f"head_dim: GPT2LMHeadModel needs n_heads * head_dim == d_model, got "
                             f"{shape.n_heads} * {shape.head_dim} != {shape.d_model}")
        kw = dict(n_positions=shape.max_seq_len, n_embd=shape.d_model, n_layer=shape.n_layers, n_head=shape.n_heads,
                  n_inner=shape.d_ffn, activation_function="gelu_new", layer_norm_epsilon=shape.norm_eps,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
                  scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
        return tf.GPT2Config(**{**common, **kw, **overrides})
    kw = dict(hidden_size=shape.d_model, intermediate_size=shape.d_ffn, num_hidden_layers=shape.n_layers,
              num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads, head_dim=shape.head_dim,
              hidden_act="silu", max_position_embeddings=shape.max_seq_len, rms_norm_eps=shape.norm_eps,
              rope_theta=shape.rope_theta, attention_bias=False, mlp_bias=False, attention_dropout=0.0)
    try:
        return tf.LlamaConfig(**{**common, **kw, **overrides})
    except ValueError as e:
        raise ValueError(f"LlamaConfig refuses {shape.describe()}: {e}") from e


# ---- state dicts --------------------------------------------------------------------------------
def _strip(sd: Tensors, prefix: str) -> Tensors:
    """Drop the base-model prefix (``transformer.`` / ``model.``) where present."""
    out = {}
    for k, v in sd.items():
        out[k[len(prefix):] if k.startswith(prefix) else k] = v
    return out


def params_from_hf(sd: Tensors, shape: ModelShape, dtype=torch.float32) -> Tensors:
    """Reference-model parameters (``parameter_schema`` names) from a ``transformers`` state dict."""
    dtype = _dtype(dtype)
    gpt2 = shape.flavour == "gpt2"
    sd = _strip(sd, "transformer." if gpt2 else "model.")
    used, out = set(), {}

    def take(key) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"{key}: missing from the checkpoint ({shape.describe()})")
        used.add(key)
        return sd[key]

    hq, hk = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    if gpt2:
        out["tok_emb.weight"] = take("wte.weight")
        out["pos_emb.weight"] = take("wpe.weight")[: shape.max_seq_len]
        for i in range(shape.n_layers):
            h, L = f"h.{i}.", f"layers.{i}."
            for hf_norm, ref_norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out[L + ref_norm + ".weight"] = take(h + hf_norm + ".weight")
                out[L + ref_norm + ".bias"] = take(h + hf_norm + ".bias")
            w, b = take(h + "attn.c_attn.weight").t(), take(h + "attn.c_attn.bias")  # Conv1D (in, out) -> (out, in)
            for proj, (lo, hi) in zip("qkv", ((0, hq), (hq, hq + hk), (hq + hk, hq + 2 * hk))):
                out[L + f"attn.{proj}.weight"] = w[lo:hi]
                out[L + f"attn.{proj}.bias"] = b[lo:hi]
            out[L + "attn.o.weight"] = take(h + "attn.c_proj.weight").t()
            out[L + "attn.o.bias"] = take(h + "attn.c_proj.bias")
            out[L + "mlp.up.weight"] = take(h + "mlp.c_fc.weight").t()
            out[L + "mlp.up.bias"] = take(h + "mlp.c_fc.bias")
            out[L + "mlp.down.weight"] = take(h + "mlp.c_proj.weight").t()
            out[L + "mlp.down.bias"] = take(h + "mlp.c_proj.bias")
        out["norm.weight"], out["norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
    else:
        out["tok_emb.weight"] = take("embed_tokens.weight")
        for i in range(shape.n_layers):
            h, L = f"layers.{i}.", f"layers.{i}."
            out[L + "attn_norm.weight"] = take(h + "input_layernorm.weight")
            for proj in "qkvo":
                out[L + f"attn.{proj}.weight"] = take(h + f"self_attn.{proj}_proj.weight")
            out[L + "mlp_norm.weight"] = take(h + "post_attention_layernorm.weight")
            for proj in ("gate", "up", "down"):
                out[L + f"mlp.{proj}.weight"] = take(h + f"mlp.{proj}_proj.weight")
        out["norm.weight"] = take("norm.weight")
    if not shape.tied_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    # left over: a tied lm_head copy, GPT-2's causal-mask buffers, RoPE's inv_freq; anything else is an error
    ignorable = ("lm_head.weight", ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
    extra = [k for k in sd if k not in used and not k.endswith(ignorable)]
    if extra:
        raise ValueError(f"checkpoint: {len(extra)} tensor(s) the reference decoder has no place for, "
                         f"e.g. {extra[:4]}")
    schema = parameter_schema(shape)
    for name, spec in schema.items():
        want = param_shape(shape, spec)
        if tuple(out[name].shape) != want:
            raise ValueError(f"{name}: the checkpoint's tensor has shape {tuple(out[name].shape)}, "
                             f"{shape.describe()} needs {want}")
    return {name: out[name].detach().to(dtype).contiguous() for name in schema}


def params_to_hf(params: Tensors, shape: ModelShape, dtype=None, copy: bool = False) -> Tensors:
    """A ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` state dict from reference parameters (tied head omitted).

    Tensors may share storage with ``params`` unless ``copy``.
    """
    dtype = _dtype(dtype)

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return (t.to(dtype, copy=copy) if dtype is not None else (t.clone() if copy else t)).contiguous()

    sd: Tensors = {}
    if shape.flavour == "gpt2":
        hf_config(shape)  # refuses GQA / head_dim layouts GPT-2 cannot hold
        p = "transformer."
        sd[p + "wte.weight"] = params["tok_emb.weight"]
        sd[p + "wpe.weight"] = params["pos_emb.weight"]
        for i in range(shape.n_layers):
            h, L = f"{p}h.{i}.", f"layers.{i}."
            for hf_norm, ref_norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                sd[h + hf_norm + ".weight"] = params[L + ref_norm + ".weight"]
                sd[h + hf_norm + ".bias"] = params[L + ref_norm + ".bias"]
            sd[h + "attn.c_attn.weight"] = torch.cat([params[L + f"attn.{x}.weight"] for x in "qkv"], 0).t()
            sd[h + "attn.c_attn.bias"] = torch.cat([params[L + f"attn.{x}.bias"] for x in "qkv"], 0)
            sd[h + "attn.c_proj.weight"] = params[L + "attn.o.weight"].t()
            sd[h + "attn.c_proj.bias"] = params[L + "attn.o.bias"]
            sd[h + "mlp.c_fc.weight"] = params[L + "mlp.up.weight"].t()
            sd[h + "mlp.c_fc.bias"] = params[L + "mlp.up.bias"]
            sd[h + "mlp.c_proj.weight"] = params[L + "mlp.down.weight"].t()
            sd[h + "mlp.c_proj.bias"] = params[L + "mlp.down.bias"]
        sd[p + "ln_f.weight"], sd[p + "ln_f.bias"] = params["norm.weight"], params["norm.bias"]
    else:
        p = "model."
        sd[p + "embed_tokens.weight"] = params["tok_emb.weight"]
        for i in range(shape.n_layers):
            h, L = f"{p}layers.{i}.", f"layers.{i}."
            sd[h + "input_layernorm.weight"] = params[L + "attn_norm.weight"]
            for proj in "qkvo":
                sd[h + f"self_attn.{proj}_proj.weight"] = params[L + f"attn.{proj}.weight"]
            sd[h + "post_attention_layernorm.weight"] = params[L + "mlp_norm.weight"]
            for proj in ("gate", "up", "down"):
                sd[h + f"mlp.{proj}_proj.weight"] = params[L + f"mlp.{proj}.weight"]
        sd[p + "norm.weight"] = params["norm.weight"]
    if not shape.tied_embeddings:
        sd["lm_head.weight"] = params["lm_head.weight"]
    return {k: cast(v) for k, v in sd.items()}


# ---- reading a checkpoint directory --------------------------------------------------------------
def _weight_files(path: Path) -> list:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            return [path / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or a sharded index")


def read_hf_state_dict(path: str | Path) -> Tensors:
    """Every tensor of a local ``save_pretrained`` directory (safetensors or ``.bin``, sharded or not)."""
    from safetensors.torch import load_file

    sd: Tensors = {}
    for f in _weight_files(Path(path)):
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f), device="cpu"))
        else:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def read_hf_config(path: str | Path):
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    return _transformers().AutoConfig.from_pretrained(str(path), local_files_only=True)


def _with_max_seq_len(shape: ModelShape, max_seq_len: Optional[int]) -> ModelShape:
    if max_seq_len is None or max_seq_len == shape.max_seq_len:
        return shape
    if shape.flavour == "gpt2" and max_seq_len > shape.max_seq_len:
        raise ValueError(f"max_seq_len: GPT-2 has {shape.max_seq_len} learned positions, cannot use {max_seq_len}")
    return dataclasses.replace(shape, max_seq_len=max_seq_len)


def load_hf(path: str | Path, dtype=torch.float32, max_seq_len: Optional[int] = None) -> TrainingState:
    """Import a local ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` directory as a weights-only training state.

    ``max_seq_len`` overrides the context length (Llama: only the RoPE table size; GPT-2: keeps the
    first positions), e.g. to grow a model whose config says 131072 positions into a 4096-token shape.
    """
    shape = _with_max_seq_len(shape_from_hf_config(read_hf_config(path)), max_seq_len)
    state = TrainingState(shape, params_from_hf(read_hf_state_dict(path), shape, dtype))
    state.validate()
    return state


def from_hf_model(model, dtype=torch.float32):
    """A reference :class:`~growth_ds.models.Decoder` with the weights of an in-memory HF model."""
    from growth_ds.models import Decoder

    shape = shape_from_hf_config(model.config)
    params = params_from_hf(model.state_dict(), shape, dtype)
    ref = Decoder(shape).to(_dtype(dtype))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(params[name])
    return ref


# ---- export -------------------------------------------------------------------------------------
def _shape_and_params(source) -> tuple:
    """``(shape, params)`` of a Decoder, a TrainingState, or a ``(shape, params)`` pair."""
    if isinstance(source, TrainingState):
        return source.shape, source.params
    if isinstance(source, tuple) and len(source) == 2:
        return source
    if hasattr(source, "shape") and isinstance(source.shape, ModelShape):
        return source.shape, {n: p for n, p in source.named_parameters()}
    raise TypeError(f"expected a Decoder, a TrainingState or (shape, params), got {type(source).__name__}")


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def to_hf_model(source, dtype=None, copy: bool = True, **config_overrides):
    """The ``transformers`` model (eval mode) of a reference model / training state.

    ``copy=False`` lets it share storage with ``source`` where the dtype allows (no second copy of a
    large model); ``config_overrides`` go to :func:`hf_config`.
    """
    tf = _transformers()
    shape, params = _shape_and_params(source)
    dtype = _dtype(dtype) or torch.float32
    cls = getattr(tf, SUPPORTED[shape.flavour])
    config = hf_config(shape, **config_overrides)
    sd = params_to_hf(params, shape, dtype, copy=copy)
    kw = {"dtype": dtype} if int(tf.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}
    with _no_progress_bars():  # built on the meta device and filled from sd: no random init
        model = cls.from_pretrained(None, config=config, state_dict=sd, **kw)
    return model.eval()


def save_hf(source, out_dir: str | Path, dtype=None, overwrite: bool = False, **config_overrides) -> Path:
    """``save_pretrained`` (safetensors) of a reference model / training state into ``out_dir``.

    Written into a temporary sibling directory and renamed, so ``out_dir`` is never half written;
    an existing ``out_dir`` is replaced only with ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    model = to_hf_model(source, dtype, copy=False, **config_overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        kw = {"safe_serialization": True} if "safe_serialization" in \
            inspect.signature(model.save_pretrained).parameters else {}
        with _no_progress_bars():
            model.save_pretrained(str(tmp), **kw)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no safetensors file into {tmp}")
        atomic.replace_dir(out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- growth-ds checkpoints and training runs -----------------------------------------------------
def _run_checkpoint(path: Path) -> Optional[Path]:
    """The checkpoints directory of a training run (RUN_DIR or RUN_DIR/checkpoints), if ``path`` is one."""
    for cand in (path, path / "checkpoints"):
        if (cand / "latest.json").is_file():
            return cand
    return None


def load_run(path: str | Path, tag: Optional[str] = None) -> TrainingState:
    """Weights (fp32 masters) of a training run's latest complete checkpoint (or ``tag``), any ZeRO stage."""
    ckpt = _run_checkpoint(Path(path))
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no checkpoints/latest.json (not a growth-ds training run)")
    tag = tag or json.loads((ckpt / "latest.json").read_text())["tag"]
    meta_path = ckpt / tag / "growth_meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{ckpt / tag}: incomplete checkpoint (no growth_meta.json)")
    meta = json.loads(meta_path.read_text())
    shape = ModelShape.from_dict(meta["shape"])
    if meta.get("zero_stage", 0) == 0:
        states = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = states["module"]
    else:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    names = parameter_schema(shape)
    params = {n: sd[n].detach().float().clone() for n in names}
    state = TrainingState(shape, params, step=int(meta["progress"]["step"]),
                          extra={"source": str(ckpt / tag)})
    state.validate()
    return state


def load_any(src: str | Path, shape: Optional[ModelShape] = None, dtype=torch.float32,
             max_seq_len: Optional[int] = None) -> TrainingState:
    """A Hugging Face directory, a training run directory, or a growth-ds / plain torch checkpoint file."""
    from growth_ds.checkpoint import load_state

    src = Path(src)
    if src.is_dir() and (src / "config.json").is_file():
        if shape is not None:
            raise ValueError(f"--shape: only for a plain torch checkpoint file; {src} is a Hugging Face directory, "
                             f"whose config.json gives the shape")
        return load_hf(src, dtype, max_seq_len)
    if max_seq_len is not None:
        raise ValueError("--max-seq-len: only for Hugging Face sources")
    if shape is not None and src.is_dir():
        raise ValueError(f"--shape: only for a plain torch checkpoint file; {src} is a training run directory, "
                         f"whose checkpoints record their shape")
    return load_run(src) if src.is_dir() else load_state(src, shape)


def convert(src: str | Path, out: str | Path, to: Optional[str] = None, dtype=None,
            shape: Optional[ModelShape] = None, max_seq_len: Optional[int] = None, overwrite: bool = False) -> str:
    """Convert between a Hugging Face directory and growth-ds (checkpoint file, or training run as source).

    ``to``: ``hf`` or ``growth-ds``; default: a Hugging Face source becomes a growth-ds checkpoint file,
    anything else a Hugging Face directory. Returns a one-line summary.
    """
    from growth_ds.checkpoint import save_state

    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    is_hf = src.is_dir() and (src / "config.json").is_file()
    to = to or ("growth-ds" if is_hf else "hf")
    if to not in ("hf", "growth-ds"):
        raise ValueError(f"--to: expected hf or growth-ds, got {to!r}")
    if out.exists() and not overwrite:  # before any work
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    state = load_any(src, shape, torch.float32, max_seq_len)
    if to == "hf":
        save_hf(state, out, dtype, overwrite=overwrite)
    else:
        d = _dtype(dtype)
        if d is not None:
            state.params = {k: v.to(d) for k, v in state.params.items()}
        save_state(state, out, overwrite=overwrite)
    return f"wrote {out} ({to}): {state.shape.describe()}"


def _target_shape(path: str | Path, small: ModelShape) -> ModelShape:
    """The ``--to`` shape; ``rope_theta`` / ``norm_eps`` not set in the YAML are taken from the source."""
    import yaml

    large = ModelShape.from_yaml(path)
    raw = yaml.safe_load(Path(path).read_text()) or {}
    raw = raw.get("model", raw) if isinstance(raw.get("model"), dict) else raw
    if "rope_theta" not in raw:
        large = dataclasses.replace(large, rope_theta=small.rope_theta)
    elif large.rope_theta != small.rope_theta and small.flavour == "llama":
        raise ValueError(f"rope_theta: the source uses {small.rope_theta}, {path} sets {large.rope_theta}; "
                         f"changing RoPE's base is not function preserving")
    if "norm_eps" not in raw:
        large = dataclasses.replace(large, norm_eps=small.norm_eps)
    return large


def grow_hf(src: str | Path, to: str | Path, out: str | Path, *, width: Optional[str] = None,
            depth: Optional[str] = None, seed: int = 0, moments: Optional[str] = None, lr: Optional[str] = None,
            plan_options: Optional[dict] = None, dtype=None, max_seq_len: Optional[int] = None,
            overwrite: bool = False):
    """Grow a Hugging Face model directory straight into a grown Hugging Face directory. Returns the plan.

    ``to``: the target shape's YAML (``rope_theta`` / ``norm_eps`` it does not set are the source's);
    ``width`` / ``depth`` and the rest are :func:`growth_ds.ops.make_plan`'s arguments (``plan_options``: its
    other keyword arguments, e.g. ``recipe``, ``random_std``, ``random_relative``).
    """
    from growth_ds.ops import grow, make_plan

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --force to replace it")
    state = load_hf(src, torch.float32, max_seq_len)
    large = _target_shape(to, state.shape)
    plan = make_plan(state.shape, large, width=width, depth=depth, seed=seed, moments=moments, lr=lr,
                     **(plan_options or {}))
    save_hf(grow(state, plan), out, dtype, overwrite=overwrite)
    return plan


__all__ = ["shape_from_hf_config", "hf_config", "params_from_hf", "params_to_hf", "read_hf_state_dict", "load_hf",
           "from_hf_model", "to_hf_model", "save_hf", "load_run", "load_any", "convert", "grow_hf"]

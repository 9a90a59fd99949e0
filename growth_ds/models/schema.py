"""Parameter schema of the reference decoder: every parameter's axes named by space, and its role.

Spaces: ``vocab``, ``pos`` (learned positions), ``model`` (residual stream), ``ffn`` (MLP hidden,
shared by gate and up), ``heads`` (query heads x head_dim), ``kv`` (KV heads x head_dim).
Roles: ``embedding`` (rows are tokens/positions, columns live in ``model``), ``head`` (untied output
layer), ``weight`` (a linear ``y = W x``: axes ``(out, in)``), ``bias``, ``norm`` (gain), ``norm_bias``.

Growth never needs names beyond this table: executors look up a parameter's spaces here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from growth_ds.shapes import ModelShape


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its axes (spaces, outermost first), role and place in the network."""

    axes: Tuple[str, ...]
    role: str
    layer: Optional[int] = None       # decoder layer index, None for embeddings/final norm/head
    module: str = ""                  # e.g. "attn.q", "mlp.down", "attn_norm", "norm", "tok_emb"
    residual_out: bool = False        # writes into the residual stream from inside a block
    final_norm: bool = False          # the norm feeding the output layer


def layer_schema(shape: ModelShape, i: int) -> Dict[str, ParamSpec]:
    """Schema of decoder layer ``i`` (names relative to the model root)."""
    gpt2 = shape.flavour == "gpt2"
    p = f"layers.{i}."
    out: Dict[str, ParamSpec] = {}

    def add(name, axes, role, module, residual_out=False):
        out[p + name] = ParamSpec(tuple(axes), role, i, module, residual_out)

    add("attn_norm.weight", ("model",), "norm", "attn_norm")
    if gpt2:
        add("attn_norm.bias", ("model",), "norm_bias", "attn_norm")
    for proj, space in (("q", "heads"), ("k", "kv"), ("v", "kv")):
        add(f"attn.{proj}.weight", (space, "model"), "weight", f"attn.{proj}")
        if gpt2:
            add(f"attn.{proj}.bias", (space,), "bias", f"attn.{proj}")
    add("attn.o.weight", ("model", "heads"), "weight", "attn.o", residual_out=True)
    if gpt2:
        add("attn.o.bias", ("model",), "bias", "attn.o", residual_out=True)
    add("mlp_norm.weight", ("model",), "norm", "mlp_norm")
    if gpt2:
        add("mlp_norm.bias", ("model",), "norm_bias", "mlp_norm")
        add("mlp.up.weight", ("ffn", "model"), "weight", "mlp.up")
        add("mlp.up.bias", ("ffn",), "bias", "mlp.up")
        add("mlp.down.weight", ("model", "ffn"), "weight", "mlp.down", residual_out=True)
        add("mlp.down.bias", ("model",), "bias", "mlp.down", residual_out=True)
    else:
        add("mlp.gate.weight", ("ffn", "model"), "weight", "mlp.gate")
        add("mlp.up.weight", ("ffn", "model"), "weight", "mlp.up")
        add("mlp.down.weight", ("model", "ffn"), "weight", "mlp.down", residual_out=True)
    return out


def parameter_schema(shape: ModelShape) -> Dict[str, ParamSpec]:
    """Ordered ``{name: ParamSpec}`` for every parameter of ``build_model(shape)``.

    The order equals ``model.named_parameters()`` order.
    """
    gpt2 = shape.flavour == "gpt2"
    schema: Dict[str, ParamSpec] = {"tok_emb.weight": ParamSpec(("vocab", "model"), "embedding", None, "tok_emb")}
    if gpt2:
        schema["pos_emb.weight"] = ParamSpec(("pos", "model"), "embedding", None, "pos_emb")
    for i in range(shape.n_layers):
        schema.update(layer_schema(shape, i))
    schema["norm.weight"] = ParamSpec(("model",), "norm", None, "norm", final_norm=True)
    if gpt2:
        schema["norm.bias"] = ParamSpec(("model",), "norm_bias", None, "norm", final_norm=True)
    if not shape.tied_embeddings:
        schema["lm_head.weight"] = ParamSpec(("vocab", "model"), "head", None, "lm_head")
    return schema


def param_shape(shape: ModelShape, spec: ParamSpec) -> Tuple[int, ...]:
    return tuple(shape.space_dim(s) for s in spec.axes)

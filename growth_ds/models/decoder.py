"""The reference decoder: one readable pre-norm GPT in plain torch, two flavours.

``gpt2``: LayerNorm, GELU MLP, learned positions, biases, (multi-head) attention.
``llama``: RMSNorm, SwiGLU MLP, rotary positions, no biases, grouped-query attention.

No distributed code lives here; parallelism (DeepSpeed ZeRO, Megatron TP) is applied from outside.
Parameter names and axes are listed in :mod:`growth_ds.models.schema`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from growth_ds.shapes import ModelShape


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(shape: ModelShape) -> nn.Module:
    if shape.flavour == "gpt2":
        return nn.LayerNorm(shape.d_model, eps=shape.norm_eps)
    return RMSNorm(shape.d_model, eps=shape.norm_eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float):
    """cos/sin tables, each ``[max_seq_len, head_dim // 2]`` (rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: ``[B, H, T, hd]``; rotates the pairs ``(x[..., i], x[..., i + hd/2])``."""
    T = x.shape[-2]
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        bias = shape.flavour == "gpt2"
        self.n_heads, self.n_kv_heads, self.head_dim = shape.n_heads, shape.n_kv_heads, shape.head_dim
        self.q = nn.Linear(shape.d_model, shape.n_heads * shape.head_dim, bias=bias)
        self.k = nn.Linear(shape.d_model, shape.n_kv_heads * shape.head_dim, bias=bias)
        self.v = nn.Linear(shape.d_model, shape.n_kv_heads * shape.head_dim, bias=bias)
        self.o = nn.Linear(shape.n_heads * shape.head_dim, shape.d_model, bias=bias)

    def forward(self, x, rope=None):
        B, T, _ = x.shape  # batch, sequence, d_model
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        group = self.n_heads // self.n_kv_heads  # query head h reads kv head h // group
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.swiglu = shape.flavour == "llama"
        bias = not self.swiglu
        if self.swiglu:
            self.gate = nn.Linear(shape.d_model, shape.d_ffn, bias=False)
        self.up = nn.Linear(shape.d_model, shape.d_ffn, bias=bias)
        self.down = nn.Linear(shape.d_ffn, shape.d_model, bias=bias)

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.attn_norm = make_norm(shape)
        self.attn = Attention(shape)
        self.mlp_norm = make_norm(shape)
        self.mlp = MLP(shape)

    def forward(self, x, rope=None):
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """``model(tokens[B, T]) -> logits[B, T, vocab_size]``."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.d_model)
        if shape.flavour == "gpt2":
            self.pos_emb = nn.Embedding(shape.max_seq_len, shape.d_model)
        else:
            cos, sin = rope_tables(shape.head_dim, shape.max_seq_len, shape.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.layers = nn.ModuleList(Block(shape) for _ in range(shape.n_layers))
        self.norm = make_norm(shape)
        if not shape.tied_embeddings:
            self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)

    def forward(self, tokens):
        B, T = tokens.shape
        if T > self.shape.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.shape.max_seq_len}")
        x = self.tok_emb(tokens)  # (B, T, d_model)
        rope = None
        if self.shape.flavour == "gpt2":
            x = x + self.pos_emb(torch.arange(T, device=tokens.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        for layer in self.layers:
            x = layer(x, rope)
        x = self.norm(x)
        head = self.tok_emb.weight if self.shape.tied_embeddings else self.lm_head.weight
        return F.linear(x, head)  # (B, T, vocab)


def init_weights(model: Decoder, seed: int = 0, std: float = 0.02) -> None:
    """GPT-2 initialisation: N(0, std), residual output projections N(0, std / sqrt(2 L)), zero biases."""
    g = torch.Generator().manual_seed(seed)
    resid_std = std / math.sqrt(2 * model.shape.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("attn.o.weight", "mlp.down.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * resid_std)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_model(shape: ModelShape, seed: int = 0) -> Decoder:
    """A freshly initialised reference decoder for ``shape`` (fp32, CPU)."""
    model = Decoder(shape)
    init_weights(model, seed)
    return model


def lm_loss(logits, targets):
    """Mean next-token cross entropy; ``logits[B, T, V]``, ``targets[B, T]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

"""Shared fixtures-as-functions for the tests: small shapes, randomised models, fixed batches."""
from __future__ import annotations

import dataclasses

import torch

from growth_ds.models import build_model, lm_loss
from growth_ds.shapes import ModelShape


def small_shape(flavour: str, **kw) -> ModelShape:
    base = dict(flavour=flavour, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2 if flavour == "llama" else 4,
                head_dim=8, d_ffn=48, vocab_size=64, max_seq_len=16)
    base.update(kw)
    return ModelShape(**base)


def grown(shape: ModelShape, width: bool, depth: bool, **kw) -> ModelShape:
    changes = {}
    if width:
        changes.update(d_model=shape.d_model * 2, n_heads=shape.n_heads * 2, n_kv_heads=shape.n_kv_heads * 2,
                       d_ffn=shape.d_ffn * 2)
    if depth:
        changes.update(n_layers=shape.n_layers + 2)
    changes.update(kw)
    return dataclasses.replace(shape, **changes)


def randomised_model(shape: ModelShape, seed: int = 0):
    """A model whose norms and biases are random too, so that growth must get all of them right."""
    model = build_model(shape, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.mul_(5.0)  # larger weights: logits that actually depend on every parameter
    return model


def batch(shape: ModelShape, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab_size, (B, shape.max_seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, x, y) -> torch.Tensor:
    return lm_loss(model(x), y)

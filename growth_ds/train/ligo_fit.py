"""Fitting a LiGO operator: the training loop of :class:`growth_ds.ops.ligo.LigoOperator`.

The operator itself (its parameters, materialisation, dense maps) is pure growth math in
:mod:`growth_ds.ops.ligo`; this module trains it on the LM loss with AdamW, the small model frozen,
optionally data-parallel through an ``all_reduce`` gradient hook (the trainer passes one averaging
over its ranks).
"""
from __future__ import annotations

from typing import Iterable, List

import torch

from growth_ds.models import lm_loss
from growth_ds.ops.ligo import LigoOperator


def train_ligo(op: LigoOperator, batches: Iterable, steps: int = 100, lr: float = 1e-3,
               weight_decay: float = 0.0, warmup: int = 10, grad_clip: float = 1.0, log=None,
               all_reduce=None) -> List[float]:
    """Train the operator on the LM loss (small model frozen). ``batches`` yields ``(x, y)``.

    AdamW with linear warmup then constant LR (the paper trains ~100 steps). ``all_reduce`` (optional)
    averages gradients across data-parallel ranks. Returns the loss of every step.
    """
    params = [p for p in op.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    it = iter(batches)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        x, y = next(it)
        loss = lm_loss(op(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:
            if p.grad is None:  # e.g. a depth row that only feeds zeroed outputs
                p.grad = torch.zeros_like(p)
            if all_reduce is not None:
                all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        losses.append(loss.item())
        if log is not None:
            log(step, loss.item())
    return losses


__all__ = ["train_ligo"]

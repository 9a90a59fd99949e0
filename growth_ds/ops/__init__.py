"""Growth operators as pure math: plans, width/depth maps, and their application to a training state.

    from growth_ds.ops import make_plan, grow_module, grow, METHODS
    plan = make_plan(small_shape, large_shape, width="lemon", depth="identity", seed=0)
    big_model, big_optimizer = grow_module(small_model, small_optimizer, plan)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from growth_ds.ops.apply import grow, source_name
from growth_ds.ops.dense import DenseMap, apply_dense
from growth_ds.ops.lr import LRPolicy, LRSchedule
from growth_ds.ops.plan import (DEPTH_METHODS, METHODS, MOMENT_RULES, WIDTH_METHODS, DepthEntry, GrowthPlan,
                                make_plan)
from growth_ds.ops.state import TrainingState, load_into, make_adamw


def grow_module(model, optimizer: Optional[torch.optim.Optimizer], plan: GrowthPlan
                ) -> Tuple[torch.nn.Module, Optional[torch.optim.AdamW]]:
    """Grow a reference model and its AdamW. Returns a new model and a new ``torch.optim.AdamW``
    (same hyper-parameters and param groups, grown moments and step) ready to step; the optimizer
    is ``None`` when ``optimizer`` is. The inputs are not modified.
    """
    from growth_ds.models import Decoder

    if optimizer is not None and not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"grow_module grows Adam/AdamW state, got {type(optimizer).__name__}")
    if optimizer is not None and any(g.get("amsgrad") for g in optimizer.param_groups):
        raise ValueError("amsgrad: max_exp_avg_sq is not grown; use amsgrad=False")
    state = TrainingState.from_module(model, optimizer)
    new_state = grow(state, plan)
    big = Decoder(new_state.shape)
    load_into(big, new_state)
    if optimizer is None:
        return big, None
    group_of_old = {}
    by_param = {p: n for n, p in model.named_parameters()}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of_old[by_param[p]] = gi
    group_of = {n: group_of_old[source_name(plan, n)] for n, _ in big.named_parameters()}
    return big, make_adamw(big, new_state, like=optimizer, group_of=group_of)


__all__ = ["make_plan", "grow", "grow_module", "METHODS", "WIDTH_METHODS", "DEPTH_METHODS", "MOMENT_RULES",
           "GrowthPlan", "DepthEntry", "TrainingState", "LRPolicy", "LRSchedule", "DenseMap", "apply_dense"]

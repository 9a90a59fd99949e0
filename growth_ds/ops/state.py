"""The training state growth acts on, and its round trip to a torch model + AdamW."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from growth_ds.models.schema import param_shape, parameter_schema
from growth_ds.ops.lr import LRSchedule
from growth_ds.shapes import ModelShape

Tensors = Dict[str, torch.Tensor]


@dataclass
class TrainingState:
    """Everything growth maps, keyed by reference-model parameter name.

    ``step`` is the optimizer step (Adam's bias correction); ``schedule_step`` the position in
    ``schedule``. ``extra`` (data position, RNG states, ...) passes through growth unchanged.
    """

    shape: ModelShape
    params: Tensors
    exp_avg: Optional[Tensors] = None
    exp_avg_sq: Optional[Tensors] = None
    step: int = 0
    schedule: Optional[LRSchedule] = None
    schedule_step: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first parameter or moment that does not fit ``shape``."""
        schema = parameter_schema(self.shape)
        for label, tensors in (("parameter", self.params), ("exp_avg", self.exp_avg),
                               ("exp_avg_sq", self.exp_avg_sq)):
            if tensors is None:
                continue
            missing = [n for n in schema if n not in tensors]
            extra = [n for n in tensors if n not in schema]
            if missing or extra:
                raise ValueError(f"{label} names do not match shape {self.shape.describe()}: "
                                 f"missing {missing[:4]}, unexpected {extra[:4]}")
            for name, spec in schema.items():
                want = param_shape(self.shape, spec)
                if tuple(tensors[name].shape) != want:
                    raise ValueError(f"{label} {name}: shape {tuple(tensors[name].shape)} does not match "
                                     f"{want} expected for {self.shape.describe()}")
        if (self.exp_avg is None) != (self.exp_avg_sq is None):
            raise ValueError("exp_avg and exp_avg_sq must be given together")
        if self.step < 0:
            raise ValueError(f"step must be >= 0, got {self.step}")

    # ---- torch module / optimizer round trip -------------------------------------------------
    @classmethod
    def from_module(cls, model, optimizer: Optional[torch.optim.Optimizer] = None, **kw) -> "TrainingState":
        """Snapshot (copies) of ``model``'s parameters and an Adam-family optimizer's moments."""
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = cls(model.shape, params, **kw)
        if optimizer is not None:
            by_param = {p: n for n, p in model.named_parameters()}
            m, v, steps = {}, {}, set()
            for group in optimizer.param_groups:
                for p in group["params"]:
                    name = by_param[p]
                    st = optimizer.state.get(p, {})
                    if "exp_avg" in st:
                        m[name], v[name] = st["exp_avg"].detach().clone(), st["exp_avg_sq"].detach().clone()
                        steps.add(int(st["step"]))
                    else:  # not stepped yet: zero moments
                        m[name], v[name] = torch.zeros_like(p), torch.zeros_like(p)
                        steps.add(0)
            if len(steps) > 1:
                raise ValueError(f"optimizer parameters disagree on the step count: {sorted(steps)}")
            state.exp_avg, state.exp_avg_sq, state.step = m, v, steps.pop() if steps else 0
        return state


def load_into(model, state: TrainingState) -> None:
    """Copy ``state.params`` into ``model`` (shapes checked)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state.params[name])


def make_adamw(model, state: TrainingState, like: Optional[torch.optim.Optimizer] = None,
               group_of: Optional[Dict[str, int]] = None) -> torch.optim.AdamW:
    """A ``torch.optim.AdamW`` over ``model`` holding ``state``'s moments and step.

    ``like`` supplies hyper-parameters and param-group structure; ``group_of`` maps each parameter
    name to its group index in ``like`` (default: everything in group 0).
    """
    named = list(model.named_parameters())
    if like is None:
        opt = torch.optim.AdamW([p for _, p in named])
    else:
        groups = [dict((k, v) for k, v in g.items() if k != "params") | {"params": []} for g in like.param_groups]
        for name, p in named:
            groups[(group_of or {}).get(name, 0)]["params"].append(p)
        opt = torch.optim.AdamW([g for g in groups if g["params"]])
    if state.exp_avg is not None:
        for name, p in named:
            opt.state[p] = {
                "step": torch.tensor(float(state.step)),
                "exp_avg": state.exp_avg[name].clone().to(p.dtype),
                "exp_avg_sq": state.exp_avg_sq[name].clone().to(p.dtype),
            }
    return opt

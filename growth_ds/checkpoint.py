"""Single-file torch checkpoints of a :class:`TrainingState`, written atomically.

Format (``format: growth-ds/1``): ``shape`` (dict), ``model`` (name -> tensor), ``exp_avg``,
``exp_avg_sq`` (name -> tensor, optional), ``step``, ``schedule`` (dict or None), ``schedule_step``, ``extra``.
Also read: ``{"model": state_dict, "optimizer": torch_optimizer.state_dict(), "step": n, "shape": {...}}``
as saved by a plain training loop over the reference model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from growth_ds import atomic
from growth_ds.models.schema import parameter_schema
from growth_ds.ops.lr import LRSchedule
from growth_ds.ops.state import TrainingState
from growth_ds.shapes import ModelShape

FORMAT = "growth-ds/1"


def atomic_torch_save(obj, path: str | Path, overwrite: bool = False) -> None:
    """Write ``obj`` to ``path`` via a temp file in the same directory, fsync, then rename
    (:func:`growth_ds.atomic.replace_on_success`).

    A crash leaves either the old file or the new one, never a partial file. Refuses to replace an
    existing file unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--force) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replace_on_success(path, "wb") as f:
        torch.save(obj, f)


def save_state(state: TrainingState, path: str | Path, overwrite: bool = False) -> None:
    state.validate()
    atomic_torch_save({
        "format": FORMAT, "shape": state.shape.to_dict(), "model": state.params,
        "exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq, "step": state.step,
        "schedule": None if state.schedule is None else state.schedule.to_dict(),
        "schedule_step": state.schedule_step, "extra": state.extra,
    }, path, overwrite)


def load_state(path: str | Path, shape: Optional[ModelShape] = None) -> TrainingState:
    """Read a checkpoint; ``ValueError`` naming the problem if it is corrupt or does not fit ``shape``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a torch file
        raise ValueError(f"checkpoint {path} is corrupt or not a torch checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"checkpoint {path} has no 'model' entry")
    stored = ckpt.get("shape")
    if stored is None and shape is None:
        raise ValueError(f"checkpoint {path} records no shape; pass one (--shape)")
    ck_shape = ModelShape.from_dict(stored) if stored is not None else shape
    if shape is not None and stored is not None and ModelShape.from_dict(stored) != shape:
        raise ValueError(f"checkpoint {path} holds {ck_shape.describe()}, not {shape.describe()}")
    exp_avg, exp_avg_sq, step = ckpt.get("exp_avg"), ckpt.get("exp_avg_sq"), int(ckpt.get("step", 0))
    opt = ckpt.get("optimizer")
    if exp_avg is None and isinstance(opt, dict) and "state" in opt:
        names = list(parameter_schema(ck_shape))
        exp_avg, exp_avg_sq, steps = {}, {}, set()
        order = [i for g in opt["param_groups"] for i in g["params"]]
        if len(order) != len(names):
            raise ValueError(f"checkpoint {path}: optimizer has {len(order)} parameters, the model {len(names)}")
        for idx, name in zip(order, names):
            st = opt["state"].get(idx)
            if st is None:
                raise ValueError(f"checkpoint {path}: optimizer has no state for {name}")
            exp_avg[name], exp_avg_sq[name] = st["exp_avg"], st["exp_avg_sq"]
            steps.add(int(st["step"]))
        step = steps.pop()
    sched = ckpt.get("schedule")
    state = TrainingState(ck_shape, dict(ckpt["model"]), exp_avg, exp_avg_sq, step,
                          LRSchedule.from_dict(sched) if sched else None, int(ckpt.get("schedule_step", step)),
                          dict(ckpt.get("extra") or {}))
    state.validate()
    return state

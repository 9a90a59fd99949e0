"""Offline growth of DeepSpeed ZeRO checkpoints through DeepSpeed's universal-checkpoint format.

    growth-ds grow --from CKPT_DIR --to large.yaml --method lemon+identity --out GROWN_DIR
    # then, at any world size and ZeRO stage, with "checkpoint": {"load_universal": true}:
    load_universal_checkpoint(engine, GROWN_DIR)

A universal checkpoint holds, per parameter, its full fp32 value and Adam moments
(``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``) plus a global ``zero/optimizer_state.pt``.
:func:`grow_universal_checkpoint` converts a ZeRO-1/2/3 checkpoint to that format if it is not already
(``deepspeed.checkpoint.ds_to_universal``), checks every parameter's shape against the small model,
then streams over the *new* parameters: it reads the source parameter's three tensors (memory-mapped),
computes the grown tensors a bounded block of rows at a time with the same exact arithmetic as the
ZeRO executor (bit-identical to ``growth_ds.ops.grow``) and writes them. Peak memory is about one new
parameter plus one old one, never the model.

The written folder loads under every stage: per-parameter files use the ``{"param": tensor}`` form that
both the ZeRO-1/2 and the ZeRO-3 universal loaders accept, ``optimizer_state.pt`` carries both the
stage-1/2 keys and the stage-3 ``optimizer_state_dict`` (with the step), and the model-states file is
written under both names (``mp_rank_00_model_states.pt`` and ``zero_pp_rank_0_mp_rank_00_model_states.pt``).

Atomicity: everything is written into ``.<out>.partial-<pid>`` next to ``--out`` and renamed into place
at the end; a crash at any point leaves no directory at ``--out`` (and never a ``latest_universal``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Optional, Sequence, Tuple

import torch

from growth_ds.distributed.engine_state import link_optimizer_state
from growth_ds.distributed.zero.intervals import chunk_range
from growth_ds.distributed.zero.old_data import OldData
from growth_ds.distributed.zero.param_growth import ParamGrowth, PlanCache
from growth_ds.models.schema import param_shape, parameter_schema
from growth_ds.ops.plan import GrowthPlan, make_plan
from growth_ds.shapes import ModelShape

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
MODEL_STATE_NAMES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
FAIL_ENV = "GROWTH_DS_UNIVERSAL_KILL_AFTER"  # tests: SIGKILL self after this many parameters were written
ROWS_ELEMS = 1 << 20  # new elements computed per block


# ---- locating and reading checkpoints ----------------------------------------------------------


def resolve_checkpoint(src: str | Path) -> Tuple[Path, Optional[dict]]:
    """``(tag directory, growth-ds meta or None)`` for a growth-ds trainer checkpoint directory
    (``latest.json``), a DeepSpeed checkpoint directory (``latest`` / ``latest_universal``) or a tag
    directory itself."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint directory {src} does not exist")
    tag_dir = None
    if (src / "latest.json").exists():
        tag_dir = src / json.loads((src / "latest.json").read_text())["tag"]
    elif _is_tag_dir(src):
        tag_dir = src
    else:
        for ptr in ("latest_universal", "latest"):
            if (src / ptr).exists():
                tag_dir = src / (src / ptr).read_text().strip()
                break
    if tag_dir is None or not _is_tag_dir(tag_dir):
        raise ValueError(f"{src}: no DeepSpeed checkpoint found (expected latest.json, latest, latest_universal, "
                         f"or a tag directory holding *_model_states.pt)")
    meta_path = tag_dir / "growth_meta.json"
    return tag_dir, json.loads(meta_path.read_text()) if meta_path.exists() else None


def _is_tag_dir(d: Path) -> bool:
    return d.is_dir() and (any(d.glob("*_model_states.pt")) or (d / "zero" / "optimizer_state.pt").exists())


def select_tag(src: str | Path, tag: Optional[str] = None) -> Path:
    """``src`` itself, or its tag directory ``src/tag`` (checked: a checkpoint tag, and complete when ``src``
    is a growth-ds run's checkpoint directory)."""
    if not tag:
        return Path(src)
    tag_dir = Path(src) / tag
    if not _is_tag_dir(tag_dir):
        raise ValueError(f"--tag {tag}: {tag_dir} is not a checkpoint tag of {src}")
    if (tag_dir.parent / "latest.json").exists() and not (tag_dir / "growth_meta.json").exists():
        raise ValueError(f"--tag {tag}: {tag_dir} is incomplete (a growth-ds run's save that did not finish: "
                         f"no growth_meta.json)")
    return tag_dir


def is_universal(tag_dir: Path) -> bool:
    return (tag_dir / "zero" / "optimizer_state.pt").exists()


def to_universal(tag_dir: Path, out_tag_dir: Path, loadable: bool = False) -> Path:
    """Convert a ZeRO checkpoint tag to the universal format (``deepspeed.checkpoint.ds_to_universal``).

    ``loadable``: also write the model-states file under the names both the ZeRO-1/2 and the ZeRO-3
    loaders look for (``ds_to_universal`` writes only ``zero/``), so an engine of any stage and world size
    can ``load_checkpoint`` it with ``load_universal``."""
    from deepspeed.checkpoint import ds_to_universal

    out_tag_dir.parent.mkdir(parents=True, exist_ok=True)
    ds_to_universal.main(SimpleNamespace(input_folder=str(tag_dir), output_folder=str(out_tag_dir),
                                         num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                         strict=True, inject_missing_state=True))
    if loadable:
        ms = _model_states(tag_dir)
        for name in MODEL_STATE_NAMES:
            _save(ms, out_tag_dir / name)
        names = [d.name for d in (out_tag_dir / "zero").iterdir() if d.is_dir()]
        step = universal_step(out_tag_dir, names[0]) if names else 0
        _save(_optimizer_state(out_tag_dir, step), out_tag_dir / "zero" / "optimizer_state.pt")
    return out_tag_dir


def _load(path: Path):
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # not a zipfile checkpoint: mmap unsupported
            return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})") from e


def read_param(udir: Path, name: str, key: str, shape: Sequence[int], label: str = "checkpoint") -> torch.Tensor:
    """One tensor of a universal checkpoint, checked against ``shape`` (``ValueError`` naming the parameter)."""
    path = udir / "zero" / name / f"{key}.pt"
    if not path.exists():
        raise ValueError(f"{label} parameter {name}: {path} is missing")
    obj = _load(path)
    t = obj["param"] if isinstance(obj, dict) else obj
    want = tuple(int(s) for s in shape)
    n = 1
    for s in want:
        n *= s
    if t.numel() != n or (t.dim() > 1 and tuple(t.shape) != want):
        raise ValueError(f"{label} parameter {name}: {key}.pt has shape {tuple(t.shape)}, the model expects {want}")
    return t.detach().reshape(want)


def check_universal(udir: Path, shapes: Dict[str, Sequence[int]], label: str = "checkpoint",
                    keys: Sequence[str] = KEYS) -> None:
    """Every parameter of ``shapes`` exists in ``udir`` with that shape (``ValueError`` naming the first that
    does not). Files are memory-mapped, so this reads no tensor data."""
    for name, shp in shapes.items():
        for key in keys:
            read_param(udir, name, key, shp, label)


def universal_step(udir: Path, any_param: str) -> int:
    """The Adam step of a universal checkpoint (ZeRO-1/2: ``step.pt`` per parameter; ZeRO-3: the global
    optimizer state)."""
    p = udir / "zero" / any_param / "step.pt"
    if p.exists():
        return int(float(_load(p)))
    sd = _load(udir / "zero" / "optimizer_state.pt")
    inner = sd.get("optimizer_state_dict", {})
    st = inner.get("state", {})
    return int(float(st[0]["step"])) if 0 in st and "step" in st[0] else 0


# ---- growing ------------------------------------------------------------------------------------


def _grow_tensor(g: ParamGrowth, old: Sequence[torch.Tensor], old_has_moments: bool) -> list:
    """The new parameter's value, exp_avg, exp_avg_sq (float32, full), computed a block of rows at a time
    through the exact executor arithmetic."""
    shape = g.new_shape
    out = [torch.empty(shape, dtype=torch.float32) for _ in KEYS]
    flat = [t.reshape(-1) for t in out]
    ch = g.channels
    old_flat = [t.reshape(-1) for t in old[:ch]]
    red = g.reduce(old_flat[0]) if g.reductions else None
    pieces = chunk_range(0, g.new_numel, g.D1, ROWS_ELEMS) if g.mode == "rows" else [(0, g.new_numel)]
    for s, e in pieces:
        ivs = g.needs(s, e)
        data = torch.stack([torch.cat([f[a:b] for a, b in ivs]) if ivs else f[:0] for f in old_flat])
        g.compute_into(s, e, OldData(ivs, data), red, [f[s:e] for f in flat])
    if not old_has_moments:
        out[1].zero_(), out[2].zero_()
    return out


def _save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _optimizer_state(src_udir: Path, step: int) -> dict:
    """A global optimizer state that the ZeRO-1/2 and ZeRO-3 universal loaders both accept."""
    import deepspeed

    sd = torch.load(src_udir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    sd = {k: v for k, v in sd.items() if k not in ("fp32_flat_groups", "single_partition_of_fp32_groups",
                                                    "base_optimizer_state", "param_slice_mappings")}
    groups = sd.get("param_groups")
    inner = sd.get("optimizer_state_dict") or {}
    if groups is None:
        groups = inner.get("param_groups", [])
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in groups]
    sd["param_groups"] = groups
    sd["optimizer_state_dict"] = {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": groups}
    sd.setdefault("ds_version", deepspeed.__version__)
    sd.setdefault("loss_scaler", None)
    sd.setdefault("dynamic_loss_scale", False)
    sd.setdefault("overflow", False)
    return sd


def _model_states(src_tag: Path, shape: Optional[ModelShape] = None, info: Optional[dict] = None) -> dict:
    """The source's model-states dict for a universal checkpoint: no module weights (universal loads read
    ``zero/<name>/fp32.pt``); ``param_shapes`` of ``shape`` (default: the source's) and ``info`` as
    ``growth`` when given."""
    files = [src_tag / n for n in MODEL_STATE_NAMES if (src_tag / n).exists()] or \
        sorted(src_tag.glob("*_model_states.pt"))
    if not files:
        raise ValueError(f"{src_tag}: no model-states file")
    ms = _load(files[0])
    out = {k: v for k, v in ms.items() if k not in ("module", "optimizer")}
    out["module"] = {}  # universal loads never read it; weights live in zero/<name>/fp32.pt
    if shape is not None:
        out["param_shapes"] = [OrderedDict((n, torch.Size(param_shape(shape, s)))
                                           for n, s in parameter_schema(shape).items())]
    out.setdefault("universal_checkpoint_info", {"universal_checkpoint_version": 0.4})
    if info is not None:
        out["growth"] = info
    return out


def grow_universal_checkpoint(src: str | Path, large: ModelShape, out_dir: str | Path, *,
                              width: Optional[str] = None, depth: Optional[str] = None, seed: int = 0,
                              moments: Optional[str] = None, lr=None, positions=None,
                              small: Optional[ModelShape] = None, tag: Optional[str] = None,
                              overwrite: bool = False, plan: Optional[GrowthPlan] = None,
                              plan_options: Optional[dict] = None, log=print) -> dict:
    """Grow the DeepSpeed checkpoint at ``src`` into a universal checkpoint of ``large`` at ``out_dir``.

    ``src``: a growth-ds trainer checkpoint directory, a DeepSpeed checkpoint directory or a tag directory,
    of any ZeRO stage and world size (universal or not). The small shape comes from the trainer's
    ``growth_meta.json`` or ``small``. Method arguments are those of :func:`growth_ds.ops.make_plan`
    (``plan_options``: its other keyword arguments, e.g. ``recipe``, ``random_std``, ``random_relative``).
    Writes ``out_dir/<tag>/`` (default tag: ``<source tag>_grown``) and ``out_dir/latest_universal``.
    Raises ``ValueError`` naming the parameter if the checkpoint does not fit the small shape, and
    ``FileExistsError`` if ``out_dir`` exists and not ``overwrite``. Returns a summary dict.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"--out {out_dir} exists; pass --force to replace it")
    src_tag, meta = resolve_checkpoint(src)
    if meta is not None and "shape" in meta:
        recorded = ModelShape.from_dict(meta["shape"])
        if small is not None and small != recorded:
            raise ValueError(f"--shape: the checkpoint records {recorded.describe()}, not {small.describe()}")
        small = recorded
    if small is None:
        raise ValueError(f"{src}: the checkpoint records no model shape; pass the small shape (--shape)")
    if plan is None:
        plan = make_plan(small, large, width=width, depth=depth, seed=seed, moments=moments, lr=lr,
                         positions=positions, **(plan_options or {}))
    grown = plan.grown_shape
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    kill_after = int(os.environ.get(FAIL_ENV, "0"))
    try:
        if is_universal(src_tag):
            udir = src_tag
        else:
            log(f"converting {src_tag} to the universal format")
            udir = to_universal(src_tag, staging / ".source_universal" / src_tag.name)
        small_schema = parameter_schema(small)
        small_shapes = {n: param_shape(small, s) for n, s in small_schema.items()}
        check_universal(udir, small_shapes, label="source checkpoint", keys=("fp32",))
        has_moments = all((udir / "zero" / n / "exp_avg.pt").exists() for n in small_shapes)
        if has_moments:
            check_universal(udir, small_shapes, label="source checkpoint", keys=("exp_avg", "exp_avg_sq"))
        old_step = universal_step(udir, next(iter(small_shapes))) if has_moments else 0
        step = 0 if plan.moments == "reset" else old_step
        new_tag = tag or f"{src_tag.name}_grown"
        dest = staging / new_tag
        cache = PlanCache(plan)
        n_done, bytes_written = 0, 0
        for name, spec in parameter_schema(grown).items():
            g = cache.growth(name, spec)
            keys = KEYS[:g.channels] if has_moments else KEYS[:1]
            old = [read_param(udir, g.source, k, small_shapes[g.source], "source checkpoint") for k in keys]
            if len(old) < 3 and g.channels == 3:
                old += [torch.zeros(small_shapes[g.source])] * (3 - len(old))
            new = _grow_tensor(g, old, has_moments)
            for key, t in zip(KEYS, new):
                _save({"param": t, "cat_dim": 0}, dest / "zero" / name / f"{key}.pt")
                bytes_written += t.numel() * 4
            _save(torch.tensor(float(step)), dest / "zero" / name / "step.pt")
            del old, new
            n_done += 1
            if kill_after and n_done >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        _save(_optimizer_state(udir, step), dest / "zero" / "optimizer_state.pt")
        info = {"from": str(src_tag), "plan": plan.describe(), "step": step, "small": small.to_dict(),
                "shape": grown.to_dict()}
        ms = _model_states(src_tag if any(src_tag.glob("*_model_states.pt")) else udir, grown, info)
        for name in MODEL_STATE_NAMES:
            _save(ms, dest / name)
        if meta is not None:
            new_meta = dict(meta, tag=new_tag, shape=grown.to_dict(), grown_from=str(src_tag),
                            growth={"width": plan.width, "depth": plan.depth, "moments": plan.moments,
                                    "lr_policy": plan.lr.kind, "seed": plan.seed})
            if meta.get("schedule") and meta.get("progress"):
                from growth_ds.ops.lr import LRSchedule

                sched, sstep = plan.lr.apply(LRSchedule.from_dict(meta["schedule"]),
                                             meta["progress"].get("schedule_step", 0))
                new_meta["schedule"] = sched.to_dict()
                new_meta["progress"] = dict(meta["progress"], schedule_step=sstep,
                                            stage=meta["progress"].get("stage", 0) + 1)
            (dest / "growth_meta.json").write_text(json.dumps(new_meta, indent=1))
        shutil.rmtree(staging / ".source_universal", ignore_errors=True)
        (staging / "latest_universal").write_text(new_tag)
        _fsync_dir(dest)
        _fsync_dir(staging)
        if out_dir.exists():  # overwrite: the old directory goes only once the new one is complete
            old_out = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
            os.replace(out_dir, old_out)
            os.replace(staging, out_dir)
            shutil.rmtree(old_out, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary = {"out": str(out_dir), "tag": new_tag, "params": n_done, "step": step, "shape": grown.describe(),
               "bytes": bytes_written, "seconds": time.time() - t0}
    log(f"wrote {out_dir}/{new_tag}: {grown.describe()}, step {step}, moments={plan.moments}")
    return summary


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ---- loading into an engine -------------------------------------------------------------------


def engine_param_shapes(engine) -> Dict[str, Tuple[int, ...]]:
    return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()}


def load_universal_checkpoint(engine, load_dir: str | Path, tag: Optional[str] = None):
    """Load a (grown) universal checkpoint into ``engine`` at any world size and ZeRO stage.

    Checks first that every parameter of the engine's model has files of its shape (``ValueError`` naming
    the parameter: ZeRO-3's loader checks nothing and would silently shift every later parameter), then
    calls ``engine.load_checkpoint`` (the engine's config needs ``"checkpoint": {"load_universal": true}``)
    and restores each param group's hyper-parameters (ZeRO-3's universal loader copies group 0's, e.g.
    its weight decay, into every group). Returns ``engine.load_checkpoint``'s result.
    """
    load_dir = Path(load_dir)
    if tag is None:
        ptr = load_dir / "latest_universal"
        if not ptr.exists():
            raise ValueError(f"{load_dir}: no latest_universal; pass the tag")
        tag = ptr.read_text().strip()
    udir = load_dir / tag
    if not is_universal(udir):
        raise ValueError(f"{udir} is not a universal checkpoint (no zero/optimizer_state.pt)")
    if not engine.load_universal_checkpoint():
        raise ValueError('the engine was not configured for universal checkpoints: add '
                         '"checkpoint": {"load_universal": true} to its DeepSpeed config')
    check_universal(udir, engine_param_shapes(engine), label="universal checkpoint")
    groups = torch.load(udir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False).get(
        "param_groups")
    result = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if groups and len(groups) == len(base.param_groups):
        for live, saved in zip(base.param_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    live[k] = v
    link_optimizer_state(engine)
    return result


__all__ = ["check_universal", "grow_universal_checkpoint", "is_universal", "load_universal_checkpoint",
           "read_param", "resolve_checkpoint", "select_tag", "to_universal", "universal_step"]

"""Run configuration (YAML) for staged pretraining, validated before any training starts.

    run:       {name, out_dir, seed}
    data:      growth_ds.train.data.prepare_data keys (sources, vocab_size, val_fraction, seed) + dir
    train:     seq_len, micro_batch_size, grad_accum, lr, min_lr_ratio, warmup_steps, total_steps,
               schedule (cosine | wsd), decay_fraction (wsd: the final fraction of the run that decays),
               decay_shape (linear | 1-sqrt), mup (hidden matrices' LR x base d_model / d_model),
               weight_decay, betas, grad_clip, eval_every, eval_batches | eval_tokens, save_every, keep_last,
               log_every (steps between plain progress lines when not on a terminal; 0: ~20 per run)
    deepspeed: zero_stage (0-3), precision (fp32 | bf16), extra (merged into the DeepSpeed config)
    monitor:   {tensorboard, csv, tensorboard_dir} (growth_ds.train.monitor)
    stages:    - shape: PATH.yaml | {ModelShape fields}
                 lr: peak LR of this stage (default train.lr)
                 until: {steps: N} | {tokens: N}          (every stage but the last)
                 until: {auto: {threshold | law, max_tokens, rho, min_points, skip_points, patience,
                                signal (val | train), every}}
                                                          (grow when the fitted slope d ln L / d ln C
                                                           crosses the boundary; ``when: auto`` too;
                                                           signal train: the mean train loss of every
                                                           ``every`` steps, default 25)
               - shape: ...
                 grow: {width, depth, moments, lr, rho, rewarm_steps, positions, seed, reinit, recipe,
                        fan_in_std, fan_in_relative}
                       (recipe: recommended fills the methods not named: ops.plan.RECIPES)

Every error is a ``ValueError`` whose message starts with the offending key, e.g.
``stages[1].grow.width: unknown width method 'lemonade'``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from growth_ds.shapes import ModelShape

TRAIN_DEFAULTS = dict(seq_len=64, micro_batch_size=8, grad_accum=1, lr=3e-3, min_lr_ratio=0.1, warmup_steps=20,
                      total_steps=200, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, grad_clip=1.0, eval_every=20,
                      eval_batches=4, save_every=50, keep_last=2, log_every=0, checkpoint_before_growth=True,
                      budget="steps", schedule="cosine", decay_fraction=0.2, decay_shape="linear", mup=False,
                      eval_tokens=None)
DS_DEFAULTS = dict(zero_stage=0, precision="fp32", extra={})
GROW_KEYS = {"width", "depth", "moments", "lr", "rho", "rewarm_steps", "horizon", "positions", "seed",
             "method", "steps", "ligo_lr", "reinit", "recipe", "fan_in_std", "fan_in_relative"}
# fan_in_std: std of the random fan-in of new units (zero width, lemon's residue columns; GrowthPlan.random_std);
# fan_in_relative: true makes it a multiple of the std of the old weight each new unit joins. Either left out: the
# recipe's (recommended: 2 x the old std), else 0.02 absolute / 1.0 relative
# method: ligo (width/depth then name the initialising plan); reinit: true replaces the grown model by a random
# init of the new shape with a fresh optimizer (a control: what the transferred weights are worth)


@dataclass
class Stage:
    shape: ModelShape
    until_steps: Optional[int] = None
    until_tokens: Optional[int] = None
    until_auto: Optional[Dict[str, Any]] = None   # GrowthTrigger arguments (when: auto)
    grow: Dict[str, Any] = field(default_factory=dict)
    lr: Optional[float] = None                    # this stage's peak LR (None: train.lr)


@dataclass
class RunConfig:
    name: str
    out_dir: Path
    seed: int
    data: Dict[str, Any]
    train: Dict[str, Any]
    deepspeed: Dict[str, Any]
    stages: List[Stage]
    source: Optional[Path] = None
    raw: Dict[str, Any] = field(default_factory=dict)

    def scratch(self) -> "RunConfig":
        """The same run with only the final shape, trained from scratch for the same steps."""
        cfg = copy.deepcopy(self)
        cfg.stages = [Stage(self.stages[-1].shape, lr=self.stages[-1].lr)]
        cfg.name = self.name + "-scratch"
        return cfg

    def tokens_per_step(self, world_size: int) -> int:
        t = self.train
        return t["micro_batch_size"] * t["grad_accum"] * world_size * t["seq_len"]

    def stage_lr(self, i: int) -> float:
        """Peak LR of stage ``i``: its own ``lr``, else ``train.lr``."""
        lr = self.stages[i].lr
        return float(self.train["lr"] if lr is None else lr)

    def eval_batches(self) -> int:
        """Per-rank batches of the fixed validation set: ``eval_tokens`` (independent of the world size:
        every rank evaluates the whole set) rounded up to micro-batches, else ``eval_batches``."""
        t = self.train
        if t.get("eval_tokens"):
            return -(-int(t["eval_tokens"]) // (t["micro_batch_size"] * t["seq_len"]))
        return t["eval_batches"]

    def total_steps(self, world_size: int, step: int = 0, flops: float = 0.0, stage: int = 0) -> int:
        """Steps of this run. ``budget: flops`` lengthens a staged run until its FLOPs match the final
        shape trained from scratch for ``total_steps`` (the comparison at equal compute).

        ``step``, ``flops``, ``stage``: where the run is now (at a growth: what it really spent, LiGO's
        operator steps and an early ``until: auto`` included); the stages from ``stage`` on are planned by
        their ``until`` (``max_tokens`` for ``auto``)."""
        from growth_ds.shapes import flops_per_token

        t = self.train
        if t["budget"] == "steps" or len(self.stages) == 1:
            return t["total_steps"]
        tps = self.tokens_per_step(world_size)
        target = flops_per_token(self.stages[-1].shape, t["seq_len"]) * tps * t["total_steps"]
        spent = flops
        for st in self.stages[stage:-1]:
            tokens = st.until_tokens if st.until_tokens is not None else (st.until_auto or {}).get("max_tokens", 0)
            end = st.until_steps if st.until_steps is not None else -(-int(tokens) // tps)
            spent += flops_per_token(st.shape, t["seq_len"]) * tps * max(0, end - step)
            step = max(step, end)
        per_step = flops_per_token(self.stages[-1].shape, t["seq_len"]) * tps
        return step + max(1, int(-(-(target - spent) // per_step)))


def _shape(value, where: str, base: Path) -> ModelShape:
    try:
        if isinstance(value, (str, Path)):
            path = Path(value)
            if not path.is_absolute() and not path.exists():
                path = base / path
            return ModelShape.from_yaml(path)
        if isinstance(value, dict):
            return ModelShape.from_dict(value)
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from e
    raise ValueError(f"{where}: expected a shape YAML path or a mapping, got {type(value).__name__}")


def _check_keys(d: dict, allowed, where: str):
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def parse_config(raw: Dict[str, Any], source: Optional[Path] = None) -> RunConfig:
    """Validate a config mapping; every growth is planned (dry run) so bad stages fail here."""
    from growth_ds.ops import make_plan

    if not isinstance(raw, dict):
        raise ValueError("config: expected a mapping at the top level")
    _check_keys(raw, {"run", "data", "train", "deepspeed", "stages", "schedule", "monitor"}, "config")
    from growth_ds.train.monitor import MONITOR_KEYS

    monitor = raw.get("monitor") or {}
    if not isinstance(monitor, dict):
        raise ValueError(f"monitor: expected a mapping, got {monitor!r}")
    _check_keys(monitor, MONITOR_KEYS, "monitor")
    base = source.parent if source else Path.cwd()
    run = raw.get("run") or {}
    _check_keys(run, {"name", "out_dir", "seed"}, "run")
    train = dict(TRAIN_DEFAULTS)
    _check_keys(raw.get("train") or {}, TRAIN_DEFAULTS, "train")
    train.update(raw.get("train") or {})
    for k in ("seq_len", "micro_batch_size", "grad_accum", "total_steps", "eval_every", "eval_batches", "save_every"):
        if not isinstance(train[k], int) or train[k] < 1:
            raise ValueError(f"train.{k}: must be a positive integer, got {train[k]!r}")
    if train["budget"] not in ("steps", "flops"):
        raise ValueError(f"train.budget: must be steps or flops, got {train['budget']!r}")
    from growth_ds.ops.lr import DECAY_SHAPES, SCHEDULE_KINDS

    if train["schedule"] not in SCHEDULE_KINDS:
        raise ValueError(f"train.schedule: must be one of {SCHEDULE_KINDS}, got {train['schedule']!r}")
    if train["decay_shape"] not in DECAY_SHAPES:
        raise ValueError(f"train.decay_shape: must be one of {DECAY_SHAPES}, got {train['decay_shape']!r}")
    if not isinstance(train["decay_fraction"], (int, float)) or not 0 < train["decay_fraction"] <= 1:
        raise ValueError(f"train.decay_fraction: must be in (0, 1], got {train['decay_fraction']!r}")
    if train["eval_tokens"] is not None and (not isinstance(train["eval_tokens"], int) or train["eval_tokens"] < 1):
        raise ValueError(f"train.eval_tokens: must be a positive integer, got {train['eval_tokens']!r}")
    if not isinstance(train["mup"], bool):
        raise ValueError(f"train.mup: must be true or false, got {train['mup']!r}")
    ds = dict(DS_DEFAULTS)
    _check_keys(raw.get("deepspeed") or {}, DS_DEFAULTS, "deepspeed")
    ds.update(raw.get("deepspeed") or {})
    if ds["zero_stage"] not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {ds['zero_stage']!r}")
    if ds["precision"] not in ("fp32", "bf16"):
        raise ValueError(f"deepspeed.precision: must be fp32 or bf16, got {ds['precision']!r}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ValueError("stages: need a non-empty list of stages")
    stages: List[Stage] = []
    for i, st in enumerate(stages_raw):
        where = f"stages[{i}]"
        if not isinstance(st, dict) or "shape" not in st:
            raise ValueError(f"{where}.shape: every stage needs a shape")
        stage = Stage(_shape(st["shape"], f"{where}.shape", base))
        _check_keys(st, {"shape", "until", "when", "grow", "name", "lr"}, where)
        if "lr" in st:
            if not isinstance(st["lr"], (int, float)) or isinstance(st["lr"], bool) or not st["lr"] > 0:
                raise ValueError(f"{where}.lr: must be a positive number, got {st['lr']!r}")
            stage.lr = float(st["lr"])
        until = st.get("until", st.get("when"))
        last = i == len(stages_raw) - 1
        if until == "auto" or (isinstance(until, dict) and "auto" in until):
            if last:
                raise ValueError(f"{where}.until: the last stage runs to train.total_steps")
            stage.until_auto = _auto_trigger_args(until, f"{where}.until.auto", base)
        elif until is not None:
            if last:
                raise ValueError(f"{where}.until: the last stage runs to train.total_steps")
            if not isinstance(until, dict) or len(until) != 1 or not set(until) <= {"steps", "tokens"}:
                raise ValueError(f"{where}.until: expected {{steps: N}} or {{tokens: N}}, got {until!r}")
            (kind, value), = until.items()
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}.until.{kind}: must be a positive integer, got {value!r}")
            setattr(stage, f"until_{kind}", value)
        elif not last:
            raise ValueError(f"{where}.until: every stage but the last needs until: {{steps: N}} or {{tokens: N}}")
        grow = st.get("grow") or {}
        if i == 0 and grow:
            raise ValueError(f"{where}.grow: the first stage is trained from scratch")
        _check_keys(grow, GROW_KEYS, f"{where}.grow")
        if grow.get("method") not in (None, "ligo"):
            raise ValueError(f"{where}.grow.method: only 'ligo' (a learned operator) is a method; fixed methods "
                             f"go in grow.width / grow.depth")
        if "fan_in_std" in grow and not (isinstance(grow["fan_in_std"], (int, float)) and
                                         not isinstance(grow["fan_in_std"], bool) and grow["fan_in_std"] > 0):
            raise ValueError(f"{where}.grow.fan_in_std: must be a positive number, got {grow['fan_in_std']!r}")
        if "fan_in_relative" in grow and not isinstance(grow["fan_in_relative"], bool):
            raise ValueError(f"{where}.grow.fan_in_relative: must be true or false, got {grow['fan_in_relative']!r}")
        if "reinit" in grow and not isinstance(grow["reinit"], bool):
            raise ValueError(f"{where}.grow.reinit: must be true or false, got {grow['reinit']!r}")
        if grow.get("method") == "ligo":
            if grow.get("moments") not in (None, "fresh", "plan"):
                raise ValueError(f"{where}.grow.moments: ligo takes fresh (the paper) or plan, got {grow['moments']!r}")
        if i > 0:
            prev = stages[-1].shape
            try:
                policy = _lr_policy(grow)
                ligo = grow.get("method") == "ligo"
                make_plan(prev, stage.shape, width=grow.get("width") or ("lemon" if ligo else None),
                          depth=grow.get("depth"), seed=grow.get("seed", 0),
                          moments=None if ligo else grow.get("moments"), lr=policy,
                          positions=grow.get("positions"), recipe=grow.get("recipe"))
            except ValueError as e:
                msg = str(e)
                key = msg.split(":", 1)[0]
                sub = f"grow.{key}" if key in GROW_KEYS else "shape"
                raise ValueError(f"{where}.{sub}: {msg}") from e
        stage.grow = grow
        stages.append(stage)
        if i > 0 and stages[i - 1].until_auto is not None:
            try:
                make_trigger(stages[i - 1].until_auto, stages[i - 1].shape.n_params, stage.shape.n_params)
            except ValueError as e:
                raise ValueError(f"stages[{i - 1}].until.auto: {e}") from e
    steps = [s.until_steps for s in stages if s.until_steps is not None]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"stages: until.steps must increase, got {steps}")
    if steps and train["budget"] == "steps" and steps[-1] >= train["total_steps"]:
        raise ValueError(f"stages: growth at step {steps[-1]} is not before train.total_steps={train['total_steps']}")
    if train["budget"] == "flops" and len(stages) > 1:  # the small stages must leave compute for the last one
        from growth_ds.shapes import flops_per_token

        spent, step = 0.0, 0
        for st in stages[:-1]:
            if st.until_steps is not None:
                spent += flops_per_token(st.shape, train["seq_len"]) * (st.until_steps - step)
                step = st.until_steps
        budget = flops_per_token(stages[-1].shape, train["seq_len"]) * train["total_steps"]
        if spent >= budget:
            raise ValueError(f"stages: the stages before the last spend {spent / budget:.2f}x the budget "
                             f"(train.total_steps={train['total_steps']} steps of the last shape) before growing")
    name = run.get("name") or (source.stem if source else "run")
    out_dir = Path(run.get("out_dir") or Path("runs") / name)
    data = dict(raw.get("data") or {})
    return RunConfig(name, out_dir, int(run.get("seed", 0)), data, train, ds, stages, source, raw)


AUTO_KEYS = {"threshold", "law", "rho", "max_tokens", "max_flops", "min_points", "skip_points", "patience",
             "signal", "every"}
AUTO_SIGNALS = ("val", "train")  # what the trigger fits: the eval points' val loss, or the mean train loss of
# every ``every`` steps (dense and free; on a constant LR, e.g. WSD's stable phase, it follows the val curve)


def _auto_trigger_args(until, where: str, base: Path) -> Dict[str, Any]:
    """Validate ``until: {auto: {...}}`` (``when: auto``): a slope threshold or a fitted law
    (``growth-ds plan`` writes one) and a hard ``max_tokens`` cap."""
    args = dict(until["auto"] or {}) if isinstance(until, dict) else {}
    _check_keys(args, AUTO_KEYS, where)
    if args.get("signal", "val") not in AUTO_SIGNALS:
        raise ValueError(f"{where}.signal: must be one of {AUTO_SIGNALS}, got {args['signal']!r}")
    if "every" in args and (not isinstance(args["every"], int) or args["every"] < 1):
        raise ValueError(f"{where}.every: must be a positive integer, got {args['every']!r}")
    if "max_tokens" not in args and "max_flops" not in args:
        raise ValueError(f"{where}.max_tokens: when: auto needs a hard cap so a bad fit cannot run forever")
    if "threshold" not in args and "law" not in args:
        raise ValueError(f"{where}: give a slope threshold or a law (JSON from `growth-ds plan` / fit_from_logs)")
    if "law" in args:
        law = Path(args["law"])
        if not law.is_absolute() and not law.exists():
            law = base / law
        if not law.is_file():
            raise ValueError(f"{where}.law: {args['law']} does not exist")
        args["law"] = str(law)
    return args


def make_trigger(args: Dict[str, Any], n_params: int, next_n_params: int):
    from growth_ds.schedule import GrowthTrigger, law_from_json

    kw = {k: v for k, v in args.items() if k not in ("signal", "every")}  # (the trainer's: what it feeds)
    if "law" in kw:
        kw["law"] = law_from_json(Path(kw["law"]).read_text())
    return GrowthTrigger(kw.pop("threshold", None), n_params=n_params, next_n_params=next_n_params, **kw)


def _lr_policy(grow: dict):
    from growth_ds.ops import LRPolicy

    if "lr" not in grow and not {"rho", "rewarm_steps", "horizon"} & set(grow):
        return None
    kw = {k: grow[k] for k in ("rho", "rewarm_steps", "horizon") if k in grow}
    return LRPolicy(grow.get("lr", "rewarm" if "rho" in grow else "continue"), **kw)


def fan_in(grow: dict) -> dict:
    """``make_plan``'s ``random_std`` / ``random_relative`` from a stage's ``grow:`` block: only those it names
    (make_plan fills the rest from the recipe, or 0.02 absolute / 1.0 relative)."""
    kw = {}
    if "fan_in_relative" in grow:
        kw["random_relative"] = bool(grow["fan_in_relative"])
    if "fan_in_std" in grow:
        kw["random_std"] = float(grow["fan_in_std"])
    return kw


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: {path} does not exist")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"config: {path} is not valid YAML: {e}") from e
    return parse_config(raw, path)

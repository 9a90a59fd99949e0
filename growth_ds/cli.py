"""``growth-ds`` command line: demo | train | check | report | plan | data | grow | grow-megatron | convert | verify."""
from __future__ import annotations

import argparse
import sys


def _parse_methods(method: str):
    """``lemon`` / ``identity`` / ``lemon+identity`` -> (width, depth)."""
    from growth_ds.ops import DEPTH_METHODS, WIDTH_METHODS

    width = depth = None
    for part in method.split("+"):
        if part in WIDTH_METHODS and width is None:
            width = part
        elif part in DEPTH_METHODS and depth is None:
            depth = part
        else:
            raise ValueError(f"--method: unknown or repeated method {part!r}; width methods {WIDTH_METHODS}, "
                             f"depth methods {DEPTH_METHODS}, combine as WIDTH+DEPTH")
    return width, depth


def _plan_args(args):
    """(width, depth, make_plan's other options) of ``growth-ds grow``: ``--method recommended`` names the saving
    study's recipe (``make_plan(recipe="recommended")``); ``--fan-in-std`` / ``--fan-in-relative`` the new
    units' random fan-in."""
    opts = {}
    if args.method == "recommended":
        width = depth = None
        opts["recipe"] = "recommended"
    else:
        width, depth = _parse_methods(args.method)
    if getattr(args, "fan_in_std", None) is not None:
        opts["random_std"] = args.fan_in_std
    if getattr(args, "fan_in_relative", None):
        opts["random_relative"] = True
    return width, depth, opts


def cmd_grow(args) -> int:
    from pathlib import Path

    from growth_ds.checkpoint import load_state, save_state
    from growth_ds.interop.megatron import is_dist_checkpoint
    from growth_ds.interop.megatron_lm import ITER_RE, is_run_root
    from growth_ds.ops import grow, make_plan
    from growth_ds.shapes import ModelShape

    src = getattr(args, "from")
    megatron = src is not None and (is_dist_checkpoint(src) or is_run_root(src) or bool(ITER_RE.match(Path(src).name)))
    kind = "hf" if getattr(args, "from_hf", None) else "dist" if megatron else \
        "deepspeed" if Path(src).is_dir() else "file"
    _check_grow_options(args, kind)
    if kind == "hf":
        return cmd_grow_from_hf(args)
    if kind == "dist":  # a megatron-core dist checkpoint: TP-aware growth
        return cmd_grow_dist(args)
    if kind == "deepspeed":  # a DeepSpeed ZeRO / universal checkpoint directory
        return cmd_grow_deepspeed(args)
    out = Path(args.out)
    if out.exists() and not args.force:  # before any work: nothing already saved is touched
        raise FileExistsError(f"--out {out} exists; pass --force to replace it")
    shape = ModelShape.from_yaml(args.shape) if args.shape else None
    state = load_state(getattr(args, "from"), shape)
    large = ModelShape.from_yaml(args.to)
    if args.method == "ligo":
        grown, plan = _grow_ligo(args, state, large)
    else:
        width, depth, opts = _plan_args(args)
        plan = make_plan(state.shape, large, width=width, depth=depth, seed=args.seed, moments=args.moments,
                         lr=args.lr_policy, **opts)
        grown = grow(state, plan)
    save_state(grown, out, overwrite=args.force)
    print(plan.describe())
    rule = plan.moments if args.method != "ligo" else \
        f"plan ({plan.moments})" if args.moments == "plan" else "fresh"
    print(f"wrote {out}: {grown.shape.describe()}, step {grown.step}, moments={rule}")
    return 0


_GROW_KINDS = {"hf": "a Hugging Face directory (--from-hf)", "dist": "a megatron-core dist checkpoint",
               "deepspeed": "a DeepSpeed checkpoint directory", "file": "a checkpoint file"}
_GROW_ONLY = {  # option: (the sources it applies to, what it is for)
    "tag": (("deepspeed",), "the tag of a DeepSpeed checkpoint directory"),
    "tp": (("dist",), "the TP size of a megatron-core dist checkpoint"),
    "iteration": (("dist",), "the iteration of a Megatron-LM checkpoint root"),
    "no_optim": (("dist",), "weights only, for a megatron checkpoint"),
    "target_tp": (("dist",), "the next Megatron-LM job's TP size"),
    "target_pp": (("dist",), "the next Megatron-LM job's PP size"),
    "dtype": (("hf",), "the dtype of the grown Hugging Face weights"),
    "max_seq_len": (("hf",), "the context length of an imported Hugging Face model"),
}
_LIGO_ONLY = ("init", "steps", "data", "ligo_lr", "batch_size", "seq_len")
_FIXED_ONLY = ("fan_in_std", "fan_in_relative")  # the fixed plans' new units (ligo learns its operator)


def _check_grow_options(args, kind: str) -> None:
    """Refuse, before any work, an option that the source ``kind`` (or the method) would silently ignore."""
    for opt, (kinds, what) in _GROW_ONLY.items():
        if getattr(args, opt, None) is not None and kind not in kinds:
            raise ValueError(f"--{opt.replace('_', '-')}: {what}; --from is {_GROW_KINDS[kind]}")
    if kind == "hf":  # the output is a Hugging Face directory: weights only, their shape in config.json
        for opt, why in (("shape", "the source's shape is its config.json"),
                         ("moments", "the output holds weights only (no optimizer state)"),
                         ("lr_policy", "the output holds weights only (no LR schedule)")):
            if getattr(args, opt, None) is not None:
                raise ValueError(f"--{opt.replace('_', '-')}: not an option of --from-hf: {why}")
    if args.method == "ligo":
        if kind != "file":
            raise ValueError(f"--method ligo: offline LiGO grows checkpoint files; --from is {_GROW_KINDS[kind]}, "
                             f"which takes fixed methods (or use method: ligo in the trainer's stage config)")
        if args.moments in ("adjoint", "reset"):
            raise ValueError(f"--moments {args.moments}: ligo's grown moments are fresh (a new AdamW, step 0) "
                             f"or plan (the --init plan's rule on the small model's moments)")
        for opt in _FIXED_ONLY:
            if getattr(args, opt, None) is not None:
                raise ValueError(f"--{opt.replace('_', '-')}: an option of the fixed methods, not of --method ligo")
    else:
        for opt in _LIGO_ONLY:
            if getattr(args, opt, None) is not None:
                raise ValueError(f"--{opt.replace('_', '-')}: an option of --method ligo")


def _grow_ligo(args, state, large):
    """LiGO: train the operator ``--steps`` steps on ``--data`` (a prepared token store), then materialise."""
    import json
    from pathlib import Path

    from growth_ds.ops import make_plan
    from growth_ds.ops.ligo import LigoOperator, materialise_state
    from growth_ds.train.data import Batches, TokenStore
    from growth_ds.train.ligo_fit import train_ligo

    if not args.data:
        raise ValueError("--data: ligo trains its operator on text; give a prepared data dir (growth-ds data prepare)")
    info = json.loads((Path(args.data) / "data.json").read_text())
    if info["stats"]["vocab_size"] != state.shape.vocab_size:
        raise ValueError(f"--data: tokenizer vocab {info['stats']['vocab_size']} != model vocab {state.shape.vocab_size}")
    width, depth = _parse_methods(args.init or "lemon")
    if depth is None and large.n_layers != state.shape.n_layers:
        depth = "identity"
    moments = args.moments or "fresh"
    plan = make_plan(state.shape, large, width=width, depth=depth, seed=args.seed, lr=args.lr_policy or "restart")
    op = LigoOperator(plan, state.params)
    steps = 100 if args.steps is None else args.steps
    seq_len = min(128 if args.seq_len is None else args.seq_len, state.shape.max_seq_len)
    batches = Batches(TokenStore.open(info["train"]), seq_len, args.batch_size or 8, args.seed)
    losses = train_ligo(op, batches, steps=steps, lr=args.ligo_lr or 1e-3,
                        log=lambda i, l: print(f"ligo step {i + 1}/{steps}: loss {l:.4f}") if (i + 1) % 10 == 0 else None)
    print(f"ligo: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} operator steps")
    return materialise_state(op, state, moments), plan


def cmd_grow_from_hf(args) -> int:
    """``growth-ds grow --from-hf DIR --to SHAPE --method M --out HF_DIR``."""
    from growth_ds.interop.hf import SUPPORTED, grow_hf

    width, depth, opts = _plan_args(args)
    plan = grow_hf(args.from_hf, args.to, args.out, width=width, depth=depth, seed=args.seed, moments=args.moments,
                   lr=args.lr_policy, plan_options=opts, dtype=getattr(args, "dtype", None),
                   max_seq_len=getattr(args, "max_seq_len", None), overwrite=args.force)
    print(plan.describe())
    print(f"wrote {args.out}: {plan.grown_shape.describe()} ({SUPPORTED[plan.large.flavour]}, safetensors)")
    return 0


def cmd_grow_dist(args) -> int:
    """``growth-ds grow`` / ``grow-megatron`` for a megatron-core dist checkpoint directory (``--tp``)."""
    import torch.distributed as dist

    from growth_ds.interop.megatron_checkpoint import grow_dist_checkpoint
    from growth_ds.shapes import ModelShape

    large = ModelShape.from_yaml(args.to)
    small = ModelShape.from_yaml(args.shape) if getattr(args, "shape", None) else None
    width, depth, opts = _plan_args(args)
    grown = grow_dist_checkpoint(getattr(args, "from"), large, args.out, width=width, depth=depth, seed=args.seed,
                                 moments=args.moments, lr=args.lr_policy, plan_options=opts,
                                 tp=getattr(args, "tp", None), small=small,
                                 overwrite=args.force, iteration=getattr(args, "iteration", None),
                                 no_optim=bool(getattr(args, "no_optim", None)),
                                 target_tp=getattr(args, "target_tp", None), target_pp=getattr(args, "target_pp", None),
                                 stream=False if getattr(args, "in_memory", None) else None)
    if dist.get_rank() == 0:
        print(grown.plan.describe())
        print(grown.tp_plan.describe())
        print(f"wrote {args.out}: {grown.shape.describe()}, step {grown.step}, moments={grown.plan.moments}, "
              f"TP={grown.tp_plan.tp}")
    return 0


def cmd_grow_deepspeed(args) -> int:
    """``growth-ds grow --from CKPT_DIR ...``: a DeepSpeed checkpoint directory -> a grown universal one."""
    from growth_ds.distributed.zero.universal import grow_universal_checkpoint, select_tag
    from growth_ds.shapes import ModelShape

    large = ModelShape.from_yaml(args.to)
    small = ModelShape.from_yaml(args.shape) if getattr(args, "shape", None) else None
    width, depth, opts = _plan_args(args)
    src = select_tag(getattr(args, "from"), getattr(args, "tag", None))  # default: the directory's latest
    summary = grow_universal_checkpoint(src, large, args.out, width=width, depth=depth,
                                        seed=args.seed, moments=getattr(args, "moments", None),
                                        lr=getattr(args, "lr_policy", None), small=small, plan_options=opts,
                                        overwrite=getattr(args, "force", False))
    print(f"{summary['params']} parameters, {summary['bytes'] / 2**20:.1f} MiB of new state in "
          f"{summary['seconds']:.1f}s")
    return 0


def cmd_convert(args) -> int:
    from growth_ds.interop.hf import convert
    from growth_ds.shapes import ModelShape

    shape = ModelShape.from_yaml(args.shape) if args.shape else None
    print(convert(args.src, args.out, to=args.to, dtype=args.dtype, shape=shape, max_seq_len=args.max_seq_len,
                  overwrite=args.force))
    return 0


def cmd_data_prepare(args) -> int:
    """``growth-ds data prepare CONFIG.yaml [--out DIR]``: run ``prepare_data`` on ``data:``."""
    import json

    from growth_ds.train.data import prepare_from_config

    print(json.dumps(prepare_from_config(args.config, args.out), indent=1))
    return 0


def cmd_verify(args) -> int:
    import torch

    from growth_ds.checkpoint import load_state
    from growth_ds.models import Decoder
    from growth_ds.ops.state import load_into

    models = []
    for path in (args.small, args.grown):
        st = load_state(path)
        m = Decoder(st.shape)
        load_into(m, st)
        models.append(m)
    g = torch.Generator().manual_seed(0)
    T = min(m.shape.max_seq_len for m in models)
    x = torch.randint(0, models[0].shape.vocab_size, (4, T), generator=g)
    with torch.no_grad():
        diff = (models[0](x) - models[1](x)).abs().max().item()
    print(f"max |logit difference| on a random batch: {diff:.3e}")
    return 0 if diff <= args.tol else 1


def cmd_demo(args) -> int:
    mode, other = (("--ops", ("config", "nproc")) if args.ops else ("the main job", ("steps", "seed")))
    for opt in other:
        if getattr(args, opt) is not None:
            raise ValueError(f"--{opt}: not an option of {mode}")
    if args.ops:
        from growth_ds.demo import run_ops_demo

        run_ops_demo(steps=60 if args.steps is None else args.steps, seed=args.seed or 0)
        return 0
    from growth_ds.demo import run_main_job

    return run_main_job(args.config, nproc=2 if args.nproc is None else args.nproc)


def cmd_train(args) -> int:
    from growth_ds.train.config import load_config
    from growth_ds.train.trainer import train

    cfg = load_config(args.config)
    resume = "always" if args.resume else ("never" if args.no_resume else "auto")
    result = train(cfg, scratch=args.scratch, resume=resume, run_dir=args.run_dir, progress_bar=not args.no_progress,
                   init_from=args.init_from)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"finished: step {result['step']}, stage {result['stage']}, val loss {result['val_loss']:.4f}, "
              f"{result['flops']:.3e} FLOPs")
    return 0


def cmd_check(args) -> int:
    from growth_ds.train.config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: ok ({len(cfg.stages)} stage(s): "
          + " -> ".join(s.shape.describe() for s in cfg.stages) + ")")
    return 0


def cmd_plan(args) -> int:
    from pathlib import Path

    from growth_ds import atomic
    from growth_ds.schedule import (fit_from_logs, format_stage_table, law_from_json, load_metrics, plan_stages,
                                    plot_fit)
    from growth_ds.shapes import ModelShape

    if bool(args.law) == bool(args.logs):
        raise ValueError("plan: give exactly one of --law LAW.json or --logs RUN_DIR/metrics.jsonl ...")
    outs = [Path(args.out), Path(args.out).with_suffix(".law.json")] if args.out else []
    for o in outs:  # before any work; a config's `until: {auto: {law: ...}}` may read these files
        if o.exists() and not args.force:
            raise FileExistsError(f"--out: {o} exists; pass --force to replace it")
        if args.law and o.resolve() == Path(args.law).resolve():
            raise ValueError(f"--out: {o} is the --law being read")
    if args.law and (args.form is not None or args.bootstrap is not None):
        raise ValueError(f"--{'form' if args.form is not None else 'bootstrap'}: options of fitting --logs; "
                         f"--law {args.law} is already fitted")
    law = law_from_json(Path(args.law).read_text()) if args.law else \
        fit_from_logs(args.logs, form=args.form or "chinchilla", n_boot=args.bootstrap or 0)
    shapes = [ModelShape.from_yaml(p) for p in args.shapes]
    plan = plan_stages(law, args.budget, shapes, rho=args.rho)
    print(format_stage_table(plan))
    if args.out:
        for o, text in zip(outs, (plan.to_json(indent=2), law.to_json())):
            atomic.write_text(o, text)
        print(f"wrote {outs[0]} and the law to {outs[1]}")
    if args.png:
        points = load_metrics(args.logs) if args.logs else None
        plot_fit(points, law, plan, args.png)
        print(f"plot: {args.png}")
    return 0


def cmd_report(args) -> int:
    from growth_ds.train.report import report, report_many

    if len(args.run_root) > 1:
        if args.staged or args.scratch:
            raise ValueError("report: --staged/--scratch name the runs of one RUN_ROOT; with several, each root "
                             "holds staged/ and scratch/")
        _, lines = report_many(args.run_root, args.png)
    else:
        _, lines = report(args.run_root[0], args.staged, args.scratch, args.png)
    print("\n".join(lines))
    return 0


def _add_fan_in_options(p: argparse.ArgumentParser) -> None:
    """``--fan-in-std`` / ``--fan-in-relative`` of the offline growth commands (:func:`_plan_args`)."""
    p.add_argument("--fan-in-std", type=float, help="std of the new units' random fan-in: absolute (default "
                   "0.02) or, with --fan-in-relative or --method recommended, a multiple of the std of the old "
                   "weight each joins (default 1; recommended: 2)")
    p.add_argument("--fan-in-relative", action="store_true", default=None,
                   help="--fan-in-std relative to the std of the old weight each new unit joins")


def build_parser() -> argparse.ArgumentParser:
    from growth_ds.interop.hf import DTYPES

    p = argparse.ArgumentParser(prog="growth-ds", description="Grow trained GPT models and their training state.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job: scratch vs staged run on the embedded corpus, then the report")
    d.add_argument("--config", default=None, help="default: configs/demo.yaml")
    d.add_argument("--nproc", type=int, help="processes (torchrun; default 2)")
    d.add_argument("--ops", action="store_true", help="instead: grow a small model with every lossless method")
    d.add_argument("--steps", type=int, help="--ops: training steps before growth (default 60)")
    d.add_argument("--seed", type=int, help="--ops: the seed of the model, data and growth plans (default 0)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="staged (or --scratch) pretraining on DeepSpeed; run under a launcher")
    t.add_argument("config")
    t.add_argument("--scratch", action="store_true", help="train only the final shape from scratch (baseline)")
    once = t.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true", help="require resuming from the latest checkpoint")
    once.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    t.add_argument("--init-from", metavar="CKPT_DIR", help="start from this checkpoint when the run has none of its "
                   "own: e.g. one grown offline by `growth-ds grow --from CKPT_DIR` (any world size, ZeRO stage)")
    t.add_argument("--run-dir", default=None, help="default: run.out_dir/staged (or /scratch)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("check", help="validate a run config (shapes, stages, growth methods)")
    c.add_argument("config")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("report", help="compare a staged run with its from-scratch baseline (several roots: "
                       "paired seeds, with mean, 90%% CI and a one-sided paired test)")
    r.add_argument("run_root", nargs="+", help="directory holding staged/ and scratch/ (one per seed)")
    r.add_argument("--staged", default=None)
    r.add_argument("--scratch", default=None)
    r.add_argument("--png", default=None, help="default: RUN_ROOT/report.png (several: next to the first root)")
    r.set_defaults(func=cmd_report)

    pl = sub.add_parser("plan", help="fit a scaling law and plan stages: which shapes, when to grow, the saving")
    pl.add_argument("--shapes", nargs="+", required=True, help="candidate shape YAMLs, small -> large")
    pl.add_argument("--budget", type=float, required=True, help="compute budget in FLOPs")
    pl.add_argument("--law", help="a fitted law (JSON)")
    pl.add_argument("--logs", nargs="+", help="metrics.jsonl files or run dirs to fit the law on")
    pl.add_argument("--form", choices=["chinchilla", "kaplan_ns"], help="--logs: the law's form (default chinchilla)")
    pl.add_argument("--bootstrap", type=int, help="--logs: bootstrap resamples for confidence intervals (default 0)")
    pl.add_argument("--rho", type=float, default=None, help="growth discount (1 = ideal lossless growth)")
    pl.add_argument("--out", help="write the stage plan (JSON) here, and the law next to it (.law.json)")
    pl.add_argument("--force", action="store_true", help="replace --out (and its .law.json) if they exist")
    pl.add_argument("--png", help="plot of fits, data points and boundaries")
    pl.set_defaults(func=cmd_plan)

    gm = sub.add_parser("grow-megatron", help="grow a megatron-core dist checkpoint (torch_dist) one parameter at "
                                              "a time and save it at the new shape; torchrun -nproc N spreads "
                                              "the work")
    gm.add_argument("--from", required=True, metavar="DIR", help="dist checkpoint directory")
    gm.add_argument("--to", required=True, metavar="SHAPE_YAML", help="target ModelShape YAML")
    gm.add_argument("--method", required=True, help="WIDTH, DEPTH or WIDTH+DEPTH, e.g. lemon+identity; or "
                                                    "recommended (the saving study's recipe, README Results)")
    _add_fan_in_options(gm)
    gm.add_argument("--out", required=True, metavar="DIR", help="output dist checkpoint directory")
    gm.add_argument("--tp", type=int, help="the TP size whose block-diagonal plan is applied (default 1; with "
                                           "--in-memory: the growth's TP size, default the world size)")
    gm.add_argument("--shape", help="ModelShape YAML of the checkpoint when it records none")
    gm.add_argument("--seed", type=int, default=0)
    gm.add_argument("--moments", choices=["adjoint", "reset"], help="default: the method's paper")
    gm.add_argument("--lr-policy", choices=["continue", "rewarm", "lemon", "restart"])
    gm.add_argument("--force", action="store_true", help="replace --out if it exists")
    gm.add_argument("--iteration", type=int, help="Megatron-LM checkpoint root: the iter_* to grow (default: "
                                                  "latest_checkpointed_iteration.txt)")
    gm.add_argument("--target-tp", type=int, help="Megatron-LM run: the next job's TP size (checked; written "
                                                "into args)")
    gm.add_argument("--target-pp", type=int, help="Megatron-LM run: the next job's PP size (checked; written "
                                                "into args)")
    gm.add_argument("--no-optim", action="store_true", default=None, help="weights only (no optimizer state)")
    gm.add_argument("--in-memory", action="store_true", default=None,
                    help="grow each process's TP shard of the whole model in memory (TP=N over N processes) "
                         "instead of streaming one parameter at a time")
    gm.set_defaults(func=cmd_grow_dist)

    cv = sub.add_parser(
        "convert", help="Hugging Face GPT2LMHeadModel/LlamaForCausalLM directory <-> growth-ds checkpoint or run",
        description="SRC: a Hugging Face model directory (config.json + safetensors/.bin), a growth-ds checkpoint "
                    "file, or a training run directory (its latest complete checkpoint, any ZeRO stage). "
                    "A Hugging Face SRC becomes a growth-ds checkpoint file; anything else a Hugging Face "
                    "directory written with save_pretrained (safetensors).")
    cv.add_argument("src")
    cv.add_argument("out")
    cv.add_argument("--to", choices=["hf", "growth-ds"], default=None, help="output format (default: the other one)")
    cv.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the written weights")
    cv.add_argument("--shape", default=None, help="ModelShape YAML of a plain torch checkpoint that records none")
    cv.add_argument("--max-seq-len", type=int, default=None, help="Hugging Face SRC: override the context length")
    cv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    cv.set_defaults(func=cmd_convert)

    da = sub.add_parser("data", help="corpus, tokenizer and token stores")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    dp = da_sub.add_parser("prepare", help="build tokenizer + train/val token stores")
    dp.add_argument("config", help="YAML file with a `data:` section")
    dp.add_argument("--out", default=None,
                    help="output directory (default: where `growth-ds train` looks: data.out_dir, else "
                         "run.out_dir/data, else runs/<run.name or the config's stem>/data)")
    dp.set_defaults(func=cmd_data_prepare)

    g = sub.add_parser("grow", help="grow a saved checkpoint (model + optimizer + step) into a larger shape")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", metavar="CKPT", help="checkpoint file (growth-ds or plain torch), a megatron "
                     "dist checkpoint directory, a Megatron-LM checkpoint root (latest_checkpointed_iteration.txt, "
                     "iter_*/) or iter_* folder, or a DeepSpeed checkpoint directory (written as a universal one)")
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face GPT2LMHeadModel/LlamaForCausalLM directory; "
                     "--out is then a grown Hugging Face directory (save_pretrained, safetensors)")
    g.add_argument("--to", required=True, metavar="SHAPE_YAML", help="target ModelShape YAML")
    g.add_argument("--method", required=True, help="WIDTH, DEPTH or WIDTH+DEPTH, e.g. lemon+identity; recommended "
                                                   "(the saving study's recipe, README Results); or ligo")
    _add_fan_in_options(g)
    g.add_argument("--out", required=True, help="output checkpoint file (atomic write)")
    g.add_argument("--shape", help="ModelShape YAML of the checkpoint when it records none")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--moments", choices=["adjoint", "reset", "fresh", "plan"],
                   help="default: the method's paper (ligo: fresh; plan = the initialising plan's rule)")
    g.add_argument("--lr-policy", choices=["continue", "rewarm", "lemon", "restart"])
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
    g.add_argument("--init", help="ligo: the fixed plan the operator starts from (default lemon[+identity])")
    g.add_argument("--steps", type=int, help="ligo: operator training steps (default 100)")
    g.add_argument("--data", help="ligo: prepared data dir (tokenizer + token store) to train the operator on")
    g.add_argument("--ligo-lr", type=float, help="ligo: the operator's learning rate (default 1e-3)")
    g.add_argument("--batch-size", type=int, help="ligo: sequences per operator step (default 8)")
    g.add_argument("--seq-len", type=int, help="ligo: tokens per sequence (default 128, at most the context)")
    g.add_argument("--tp", type=int, help="megatron dist checkpoint: the TP size whose block-diagonal plan is "
                                          "applied (default 1; with --in-memory: the growth's TP size, default "
                                          "the world size)")
    g.add_argument("--iteration", type=int, help="Megatron-LM checkpoint root: the iter_* to grow (default: "
                                                 "latest_checkpointed_iteration.txt)")
    g.add_argument("--target-tp", type=int, help="Megatron-LM run: the next job's TP size (checked; written "
                                                "into args)")
    g.add_argument("--target-pp", type=int, help="Megatron-LM run: the next job's PP size (checked; written "
                                                "into args)")
    g.add_argument("--no-optim", action="store_true", default=None,
                   help="megatron checkpoint: grow the weights only (no optimizer state)")
    g.add_argument("--in-memory", action="store_true", default=None,
                   help="megatron checkpoint: grow each process's TP shard of the whole model in memory instead "
                        "of streaming one parameter at a time (the default; memory bounded by one parameter)")
    g.add_argument("--tag", help="DeepSpeed checkpoint directory: the tag to grow (default: latest)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="--from-hf: dtype of the saved Hugging Face weights (default float32)")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="--from-hf: context length of the imported model (e.g. below Llama's config value)")
    g.set_defaults(func=cmd_grow)

    v = sub.add_parser("verify", help="max logit difference between a small and a grown checkpoint")
    v.add_argument("small")
    v.add_argument("grown")
    v.add_argument("--tol", type=float, default=1e-4)
    v.set_defaults(func=cmd_verify)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"growth-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

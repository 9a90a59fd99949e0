"""``growth-ds`` command line: demo | grow | verify (train, data, report, plan come with their modules)."""
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


def cmd_grow(args) -> int:
    from pathlib import Path

    from growth_ds.checkpoint import load_state, save_state
    from growth_ds.ops import grow, make_plan
    from growth_ds.shapes import ModelShape

    out = Path(args.out)
    if out.exists() and not args.force:  # before any work: nothing already saved is touched
        raise FileExistsError(f"--out {out} exists; pass --force to replace it")
    shape = ModelShape.from_yaml(args.shape) if args.shape else None
    state = load_state(getattr(args, "from"), shape)
    large = ModelShape.from_yaml(args.to)
    width, depth = _parse_methods(args.method)
    plan = make_plan(state.shape, large, width=width, depth=depth, seed=args.seed, moments=args.moments,
                     lr=args.lr_policy)
    grown = grow(state, plan)
    save_state(grown, out, overwrite=args.force)
    print(plan.describe())
    print(f"wrote {out}: {grown.shape.describe()}, step {grown.step}, moments={plan.moments}")
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
    from growth_ds.demo import run_ops_demo

    run_ops_demo(steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="growth-ds", description="Grow trained GPT models and their training state.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="grow a small model with every lossless method; print the loss table")
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("grow", help="grow a saved checkpoint (model + optimizer + step) into a larger shape")
    g.add_argument("--from", required=True, metavar="CKPT", help="checkpoint file (growth-ds or plain torch)")
    g.add_argument("--to", required=True, metavar="SHAPE_YAML", help="target ModelShape YAML")
    g.add_argument("--method", required=True, help="WIDTH, DEPTH or WIDTH+DEPTH, e.g. lemon+identity")
    g.add_argument("--out", required=True, help="output checkpoint file (atomic write)")
    g.add_argument("--shape", help="ModelShape YAML of the checkpoint when it records none")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--moments", choices=["adjoint", "reset"], help="default: the method's paper")
    g.add_argument("--lr-policy", choices=["continue", "rewarm", "lemon", "restart"])
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
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
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"growth-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""LiGO versus every fixed plan, from the same small checkpoint on the embedded corpus: validation loss
right after growth and after K steps of training the grown model (single process, plain torch).

    python benchmarks/ligo_quality.py [--small-steps 300] [--k 200] [--ligo-steps 100]
"""
from __future__ import annotations

import argparse
import time

import torch
from _runs import REPO

from growth_ds.models import build_model, lm_loss
from growth_ds.ops import TrainingState, grow_module, make_plan
from growth_ds.ops.ligo import LigoOperator, materialise_state
from growth_ds.ops.state import load_into, make_adamw
from growth_ds.shapes import ModelShape
from growth_ds.train.data import Batches, TokenStore, eval_batches, prepare_data
from growth_ds.train.ligo_fit import train_ligo


@torch.no_grad()
def val_loss(model, batches):
    return sum(lm_loss(model(x), y).item() for x, y in batches) / len(batches)


def train(model, opt, batches, steps, lr):
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (i + 1) / 20)
        x, y = next(batches)
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small-steps", type=int, default=300)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--ligo-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    info = prepare_data({"sources": "embedded", "vocab_size": 2048, "val_fraction": 0.02},
                        REPO / "runs" / "bench_ligo" / "data")
    train_tokens, val_tokens = TokenStore.open(info["train"]), TokenStore.open(info["val"])
    small = ModelShape.from_yaml(REPO / "configs" / "shapes" / "demo-small.yaml")
    large = ModelShape.from_yaml(REPO / "configs" / "shapes" / "demo-large.yaml")
    evals = list(eval_batches(val_tokens, 64, 16, 8))
    model = build_model(small, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    data = Batches(train_tokens, 64, 16, seed=args.seed)
    train(model, opt, data, args.small_steps, args.lr)
    print(f"small model {small.describe()}: val loss {val_loss(model, evals):.4f} after {args.small_steps} steps")
    state = TrainingState.from_module(model, opt)
    rows = []
    for width in ("ligo", "duplicate", "lemon", "zero", "hypercloning", "staged"):
        t0 = time.time()
        grown_data = Batches(train_tokens, 64, 16, seed=args.seed)  # continues where the small run stopped
        grown_data.load_state_dict({**data.state_dict()})
        extra = ""
        if width == "ligo":
            plan = make_plan(small, large, width="lemon", depth="identity", seed=args.seed, lr="restart")
            op = LigoOperator(plan, state.params)
            losses = train_ligo(op, grown_data, steps=args.ligo_steps, lr=1e-3)
            gstate = materialise_state(op, state, "fresh")
            big = build_model(gstate.shape)
            load_into(big, gstate)
            big_opt = make_adamw(big, gstate, like=opt)
            extra = f"operator loss {losses[0]:.3f}->{losses[-1]:.3f}, {op.step_flops(64 * 16, 64) * args.ligo_steps:.2e} FLOPs"
        else:
            plan = make_plan(small, large, width=width, depth="identity", seed=args.seed)
            big, big_opt = grow_module(model, opt, plan)
        after_growth = val_loss(big, evals)
        train(big, big_opt, grown_data, args.k, args.lr)
        rows.append((width, after_growth, val_loss(big, evals), time.time() - t0, extra))
        print(f"{width:>13}: val loss after growth {after_growth:.4f}, after {args.k} steps {rows[-1][2]:.4f} {extra}",
              flush=True)
    print(f"\n{'method':>13} {'after growth':>12} {f'after {args.k} steps':>16} {'seconds':>8}")
    for w, a, b, s, _ in sorted(rows, key=lambda r: r[2]):
        print(f"{w:>13} {a:>12.4f} {b:>16.4f} {s:>8.1f}")


if __name__ == "__main__":
    main()

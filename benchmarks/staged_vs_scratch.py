"""Staged vs from-scratch over several seeds: the report's numbers (FLOPs each run needs to reach the
scratch run's final validation loss, and the saving), with mean and spread across seeds.

    python benchmarks/staged_vs_scratch.py [--config configs/demo.yaml] [--seeds 0 1 2] [--total-steps N]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _runs import REPO, derive, run

from growth_ds.train.report import compare


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--total-steps", type=int, default=None, help="shorten the runs (grow at 1/3)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_staged"))
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        over = {"run__seed": seed, "data__out_dir": str(Path(args.out) / "data")}
        if args.total_steps:
            over.update(train__total_steps=args.total_steps, stages__0__until={"steps": args.total_steps // 3})
        cfg = derive(args.config, Path(args.out) / f"seed{seed}", **over)
        run(cfg, "--scratch", nproc=args.nproc)
        run(cfg, nproc=args.nproc)
        r = compare(Path(args.out) / f"seed{seed}" / "staged", Path(args.out) / f"seed{seed}" / "scratch")
        rows.append((seed, r))
        print(f"seed {seed}: target {r['target_val_loss']:.4f}  scratch {r['flops_scratch']:.3e}  staged "
              f"{r['flops_staged'] if r['flops_staged'] is None else format(r['flops_staged'], '.3e')}  saving "
              f"{'n/a' if r['saving_percent'] is None else format(r['saving_percent'], '.1f') + '%'}", flush=True)
    gaps = [r["final_val_loss"]["staged"] - r["target_val_loss"] for _, r in rows]
    print(f"val loss gap at equal FLOPs (staged - scratch): mean {statistics.mean(gaps):+.4f}"
          + (f", std {statistics.stdev(gaps):.4f}" if len(gaps) > 1 else ""))
    savings = [r["saving_percent"] for _, r in rows if r["saving_percent"] is not None]
    print(f"\n{'seed':>4} {'scratch final':>13} {'staged final':>12} {'FLOPs scratch':>13} {'FLOPs staged':>12} "
          f"{'saving':>7}")
    for seed, r in rows:
        fs = "not reached" if r["flops_staged"] is None else f"{r['flops_staged']:.3e}"
        sv = "n/a" if r["saving_percent"] is None else f"{r['saving_percent']:.1f}%"
        print(f"{seed:>4} {r['target_val_loss']:>13.4f} {r['final_val_loss']['staged']:>12.4f} "
              f"{r['flops_scratch']:>13.3e} {fs:>12} {sv:>7}")
    if savings:
        spread = statistics.stdev(savings) if len(savings) > 1 else 0.0
        print(f"saving: mean {statistics.mean(savings):.1f}%, std {spread:.1f}%, min {min(savings):.1f}%, "
              f"max {max(savings):.1f}% over {len(savings)}/{len(rows)} seeds that reached the target")
    else:
        print("saving: no staged run reached the scratch run's final loss")


if __name__ == "__main__":
    main()

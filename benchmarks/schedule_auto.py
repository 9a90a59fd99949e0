"""`when: auto` versus hand-picked growth versus from scratch, on the embedded corpus.

1. Probe: train the small and the large shape from scratch (the large one is also the baseline).
2. Fit L(N, D) (Chinchilla form, Huber on log loss, L-BFGS from a grid) on both curves.
3. Staged run whose boundary is `until: {auto: {law: ..., max_tokens: ...}}`; staged run at the
   config's hand-picked boundary. Print each one's FLOPs to the scratch run's final loss.

    python benchmarks/schedule_auto.py [--config configs/demo.yaml] [--total-steps 600]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from _runs import REPO, derive, run

from growth_ds.schedule import fit_from_logs, growth_threshold
from growth_ds.train.metrics import read_metrics, val_curve
from growth_ds.train.report import flops_to_reach


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--total-steps", type=int, default=600)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_schedule"))
    args = ap.parse_args()
    out = Path(args.out)
    T = args.total_steps
    common = {"data__out_dir": str(out / "data"), "train__total_steps": T}
    small_only = derive(args.config, out / "probe_small", **common)
    raw = yaml.safe_load(small_only.read_text())
    raw["stages"] = [{"shape": raw["stages"][0]["shape"]}]
    small_only.write_text(yaml.safe_dump(raw))
    hand = derive(args.config, out / "hand", **common, stages__0__until={"steps": T // 3})
    run(small_only, "--scratch", nproc=args.nproc)   # small shape from scratch
    run(hand, "--scratch", nproc=args.nproc)         # large shape from scratch: probe and baseline
    run(hand, nproc=args.nproc)                      # hand-picked boundary
    law = fit_from_logs([out / "probe_small" / "scratch", out / "hand" / "scratch"], form="chinchilla")
    law_path = out / "law.json"
    law_path.write_text(law.to_json())
    from growth_ds.train.config import load_config

    cfg = load_config(hand)
    thr = growth_threshold(law, cfg.stages[0].shape.n_params, cfg.stages[1].shape.n_params)
    print(f"fitted law: {law.params()}  -> growth threshold d ln L / d ln C = {thr}")
    auto = derive(args.config, out / "auto", **common,
                  stages__0__until={"auto": {"law": str(law_path), "max_tokens": int(T * 2 * 8 * 64 * 0.8),
                                             "skip_points": 2}})
    run(auto, nproc=args.nproc)
    target_curve = val_curve(read_metrics(out / "hand" / "scratch" / "metrics.jsonl"))
    target = target_curve[-1][3]
    print(f"\nscratch final val loss {target:.4f}")
    print(f"{'run':>8} {'grew at step':>12} {'FLOPs to target':>16} {'saving':>8}")
    f_scratch = flops_to_reach(target_curve, target)
    for name, d in (("scratch", out / "hand" / "scratch"), ("hand", out / "hand" / "staged"),
                    ("auto", out / "auto" / "staged")):
        recs = read_metrics(d / "metrics.jsonl")
        grew = next((r["step"] for r in recs if r.get("event") == "growth"), "-")
        f = flops_to_reach(val_curve(recs), target)
        print(f"{name:>8} {grew!s:>12} {('not reached' if f is None else format(f, '.3e')):>16} "
              f"{('n/a' if f is None else format(100 * (1 - f / f_scratch), '.1f') + '%'):>8}")
    decisions = [r for r in read_metrics(out / "auto" / "staged" / "metrics.jsonl") if r.get("event") == "schedule"]
    if decisions:
        last = decisions[-1]
        print(f"auto: {len(decisions)} decisions logged; last: grow={last.get('grow')} reason={last.get('reason')} "
              f"slope={last.get('slope')} threshold={last.get('threshold')}")


if __name__ == "__main__":
    main()

"""Does growth save compute? The protocol, one command, resumable (results are cached per run).

    python benchmarks/saving.py tune    [--seeds 100 101]         # LR grids on screening seeds
    python benchmarks/saving.py screen  [--seeds 100 101]         # the recipe study on screening seeds
    python benchmarks/saving.py confirm --recipe NAME --seeds 0 1 2 3 4   # the headline on fresh seeds
    python benchmarks/saving.py oracle  --recipe NAME --seeds 0 1 2 3 4   # vs scratch's better LR per seed
    python benchmarks/saving.py auto    --recipe NAME --seeds 0 1 2       # until: auto vs the hand-picked boundary
    python benchmarks/saving.py table                             # every table from what has run

Protocol (each point is what a skeptical reviewer asks for):
- paired seeds: seed k's arms share the data split, the sample order and the init seed;
- every run ends with its schedule fully decayed (WSD: the final ``decay_fraction``; cosine to its floor)
  and is scored on the same fixed validation set (``--eval-tokens``, 64k by default);
- FLOPs: every matmul, the LM head included, every stage (``growth_ds.train.metrics.flops_per_token``);
- arms: scratch at its best peak LR from a grid of factor-2 steps; the staged recipe (its stages' LRs from
  the same grid); the small model trained for the whole budget (its own best LR); the grown shape
  re-initialised at random at the boundary (``grow.reinit``, what the transferred state is worth);
- budgets: 0.5x, 1x and 2x the demo's scratch FLOPs (the staged arm also at 0.25x), each a complete run;
  the saving at a budget is the FLOPs the staged arm needs to reach the scratch arm's end loss, the staged
  end losses interpolated in log FLOPs across its budgets (``stats.flops_to_match``); the single-curve
  crossing (``report.flops_to_reach`` on the 1x run) is printed beside it;
- statistics: every seed, mean, 90% CI, one-sided paired t-test of "staged end loss < scratch end loss at
  equal FLOPs"; choices are made on screening seeds (100, 101), the headline comes from seeds not used to
  choose.

Runs are single-process (``micro_batch_size`` 32: the demo's 2048 tokens per step, which the demo spreads over
2 processes) and ``--jobs`` run side by side; everything lands under ``--out`` (default ``runs/saving``), one
directory per run with ``result.json``. ``tune --staged-grid --recipe NAME`` searches the staged arm's per-stage
LRs on the grid (the first stage's, then the grown stage's at the first's best); ``confirm`` uses them.
Run it in the background (``nohup python benchmarks/saving.py screen > screen.log &``); rerunning skips what
is done and resumes what was cut off.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from growth_ds import atomic  # noqa: E402
from growth_ds.shapes import ModelShape  # noqa: E402
from growth_ds.train.metrics import flops_per_token, read_metrics, val_curve  # noqa: E402
from growth_ds.train.report import flops_to_reach  # noqa: E402
from growth_ds.train.stats import flops_to_match, paired_summary, saving_percent  # noqa: E402

SHAPES = REPO / "configs" / "shapes"
SMALL, LARGE = SHAPES / "demo-small.yaml", SHAPES / "demo-large.yaml"
MID = {"flavour": "llama", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
       "d_ffn": 172, "vocab_size": 2048, "max_seq_len": 64}  # demo-small at demo-large's width
TINY = {"flavour": "llama", "n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
        "d_ffn": 86, "vocab_size": 2048, "max_seq_len": 64}  # demo-small with one layer
NARROW = {"flavour": "llama", "n_layers": 2, "d_model": 16, "n_heads": 1, "n_kv_heads": 1, "head_dim": 16,
          "d_ffn": 43, "vocab_size": 2048, "max_seq_len": 64}  # demo-small at half its width (8x fewer FLOPs/token)
SHALLOW_WIDE = {"flavour": "llama", "n_layers": 4, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
                "d_ffn": 86, "vocab_size": 2048, "max_seq_len": 64}  # demo-large at half its width (width-only growth)
TOKENS_PER_STEP = 32 * 64
BASE_STEPS = 750                 # the demo's scratch run (budget 1x), 2048 tokens per step
LR_GRID = [2e-3, 4e-3, 8e-3, 1.6e-2]
SCREEN_SEEDS = [100, 101]
BUDGETS = [0.5, 1.0, 2.0]
STAGED_BUDGETS = [0.25, 0.5, 1.0, 2.0]


@dataclass(frozen=True)
class Recipe:
    """A staged arm as data: the stages after the first (shape, growth block, when: the fraction of the
    budget's FLOPs spent before that growth), per-stage peak LRs (None: the tuned LRs) and train overrides."""

    name: str
    grows: tuple                              # ((shape, grow dict, at: fraction of the budget's FLOPs), ...)
    lrs: tuple = (None, None)                 # peak LR per stage (first, then each grown stage)
    train: Dict = field(default_factory=dict)
    note: str = ""
    first: object = SMALL                     # the first stage's shape (a path or a shape dict)


def _r(name, width="zero", depth="identity", at=0.3, lrs=(None, None), note="", **grow):
    g = {"width": width, "depth": depth, **grow}
    return Recipe(name, ((LARGE, g, at),), lrs, {}, note)


# The screened recipes: one factor changed at a time from `zero-id` (WSD in every arm).
RECIPES: Dict[str, Recipe] = {r.name: r for r in [
    _r("zero-id", note="new units: random fan-in, zero fan-out; identity blocks; continue; grow at 30% of FLOPs"),
    _r("zero-id@15%", at=0.15), _r("zero-id@45%", at=0.45), _r("zero-id@60%", at=0.6),
    _r("zero-id@5%", at=0.05), _r("zero-id@10%", at=0.10), _r("zero-id@20%", at=0.20),
    _r("zero-stack@10%", depth="stack", at=0.10), _r("zero-stack@15%", depth="stack", at=0.15),
    _r("lemon-id", width="lemon"), _r("duplicate-id", width="duplicate"), _r("staged-id", width="staged", lr="continue"),
    _r("hypercloning-id", width="hypercloning"),
    _r("zero-stack", depth="stack"), _r("zero-interleave", depth="interleave"),
    _r("zero-id-reset", moments="reset"), _r("zero-id-restart", lr="restart", moments="reset"),
    _r("zero-id-rewarm", lr="rewarm", rho=1.5, rewarm_steps=30),
    _r("zero-id-mup", note="mup: hidden matrices' LR x d_small/d"),
    Recipe("zero-width-then-id", ((MID, {"width": "zero"}, 0.15), (LARGE, {"depth": "identity"}, 0.3)),
           (None, None, None), {}, "one axis at a time: width at 15% of FLOPs, depth at 30%"),
    _r("ligo", width=None, depth=None, method="ligo", steps=30),
]}
# Second screen, at the staged arm's own tuned LRs: growth time, moments, three stages, a smaller start.
for _at in (0.20, 0.25, 0.30):
    RECIPES[f"zero-stack@{_at:.0%}"] = _r(f"zero-stack@{_at:.0%}", depth="stack", at=_at)
RECIPES["zero-stack@15%-reset"] = _r("zero-stack@15%-reset", depth="stack", at=0.15, moments="reset")
RECIPES["zero-then-stack@10-25%"] = Recipe(
    "zero-then-stack@10-25%", ((MID, {"width": "zero"}, 0.10), (LARGE, {"depth": "stack"}, 0.25)),
    (None, None, None), {}, "width at 10% of FLOPs, then the stack doubled at 25%")
RECIPES["tiny-zero-stack@15%"] = Recipe(
    "tiny-zero-stack@15%", ((LARGE, {"width": "zero", "depth": "stack"}, 0.15),), (None, None), {},
    "a one-layer start: width x2 and the stack x4 at 15% of FLOPs", TINY)
for _w in (25, 50):  # the grown stage's LR ramped up again from 0 over _w steps (the spike after a stacked growth)
    RECIPES[f"zero-stack@15%-rw{_w}"] = _r(f"zero-stack@15%-rw{_w}", depth="stack", at=0.15, lr="rewarm", rho=1.0,
                                          rewarm_steps=_w)
RECIPES["zero-stack@15%-cosine"] = Recipe(
    "zero-stack@15%-cosine", RECIPES["zero-stack@15%"].grows, (None, None), {"schedule": "cosine", "min_lr_ratio": 0.1},
    "cosine (to 0.1 of the peak) instead of WSD, against scratch under the same cosine at its WSD-tuned LR")
RECIPES["zero-id-mup"] = Recipe("zero-id-mup", RECIPES["zero-id"].grows, (None, None), {"mup": True},
                                RECIPES["zero-id-mup"].note)
# Third screen: the first shape (the LM head dominates these models' FLOPs, so width buys more than depth).
for _at in (0.05, 0.10, 0.15):
    RECIPES[f"narrow-zero-stack@{_at:.0%}"] = Recipe(
        f"narrow-zero-stack@{_at:.0%}", ((LARGE, {"width": "zero", "depth": "stack"}, _at),), (None, None), {},
        "a d_model 16 start (one head): width x4 and the stack x2", NARROW)
RECIPES["zero-width@15%"] = Recipe("zero-width@15%", ((LARGE, {"width": "zero"}, 0.15),), (None, None), {},
                                   "a four-layer d_model 32 start: width only", SHALLOW_WIDE)
RECIPES["zero-interleave@15%"] = _r("zero-interleave@15%", depth="interleave", at=0.15)
# Fourth screen: the new units' random fan-in std (GrowthPlan.random_std, 0.02 by default)
for _s in (0.01, 0.05, 0.1, 0.2, 0.4):
    RECIPES[f"zero-stack@15%-fi{_s:g}"] = _r(f"zero-stack@15%-fi{_s:g}", depth="stack", at=0.15, fan_in_std=_s)
# Fifth screen: the fan-in relative to each old weight's std (GrowthPlan.random_relative): a rule that carries to
# other models, where an absolute std is tied to this one's weight scale (its trained matrices: std 0.03-0.12)
for _s in (0.5, 1.0, 1.5, 2.0):
    RECIPES[f"zero-stack@15%-fr{_s:g}"] = _r(f"zero-stack@15%-fr{_s:g}", depth="stack", at=0.15, fan_in_std=_s,
                                            fan_in_relative=True)
# LiGO names its initialising plan's width/depth; without them make_plan uses lemon + the default depth
RECIPES["ligo"] = Recipe("ligo", ((LARGE, {"method": "ligo", "width": "lemon", "depth": "identity",
                                           "steps": 30}, 0.3),), (None, None), {}, "LiGO operator, 30 steps")
SHIPPED_COSINE = Recipe("shipped-cosine", ((LARGE, {"width": "lemon", "depth": "identity", "moments": "adjoint",
                                                    "lr": "continue"}, 0.3),), (3e-3, 3e-3),
                        {"schedule": "cosine", "min_lr_ratio": 0.1}, "the demo as it shipped (cosine, lemon)")


#: what `screen` runs by default (the rest: `--recipe a,b`); the cosine demo as it shipped is `shipped-cosine`
SCREENED = ["zero-id@5%", "zero-id@10%", "zero-id@15%", "zero-id@20%", "zero-id", "zero-id@45%", "zero-id@60%",
            "lemon-id", "duplicate-id", "zero-stack", "zero-id-mup", "zero-width-then-id", "zero-id-restart",
            "zero-stack@10%", "zero-stack@15%", "hypercloning-id", "staged-id", "ligo", "zero-id-reset"]


def base_train(eval_tokens: int) -> dict:
    return dict(seq_len=64, micro_batch_size=32, warmup_steps=30, weight_decay=0.1, grad_clip=1.0,
                schedule="wsd", decay_fraction=0.2, decay_shape="linear", min_lr_ratio=0.0,
                eval_tokens=eval_tokens, save_every=400, keep_last=1, budget="flops")


class Study:
    def __init__(self, out: Path, jobs: int, eval_tokens: int, cached: bool = False):
        self.out, self.jobs, self.eval_tokens, self.cached = Path(out), jobs, eval_tokens, cached

    # ---- runs ------------------------------------------------------------------------------------
    def data_dir(self, seed: int) -> Path:
        return self.out / "data" / f"seed{seed}"

    def prepare(self, seeds) -> None:
        from growth_ds.train.data import prepare_data

        for s in seeds:
            prepare_data({"sources": "embedded", "vocab_size": 2048, "val_fraction": 0.02, "seed": s},
                         self.data_dir(s))

    def config(self, seed: int, stages: list, total_steps: int, train: dict) -> dict:
        t = {**base_train(self.eval_tokens), **train, "total_steps": int(total_steps)}
        t.setdefault("eval_every", max(25, int(total_steps) // 8))
        return {"run": {"name": "saving", "seed": seed}, "train": t,
                "data": {"sources": "embedded", "vocab_size": 2048, "val_fraction": 0.02,
                         "out_dir": str(self.data_dir(seed))},
                "deepspeed": {"zero_stage": 1, "precision": "fp32"}, "stages": stages}

    def scratch(self, seed, lr, budget, schedule="wsd", shape=LARGE, min_lr_ratio=None):
        steps = round(BASE_STEPS * budget)
        kind = "scratch" if shape == LARGE else "small"
        if shape != LARGE:  # the small model for the whole budget: the large scratch run's FLOPs
            steps = round(steps * _fpt(LARGE) / _fpt(shape))
        train = {"lr": lr, "schedule": schedule}
        if min_lr_ratio is not None:
            train["min_lr_ratio"] = min_lr_ratio
        name = f"{kind}/{schedule}-lr{lr:g}/b{budget:g}/seed{seed}"
        return name, self.config(seed, [{"shape": str(shape)}], steps, train)

    def staged(self, seed, recipe: Recipe, budget, scratch_lr, reinit=False, lrs=None):
        steps = round(BASE_STEPS * budget)
        lrs = lrs or recipe.lrs
        lr = [scratch_lr if x is None else x for x in lrs]
        first = recipe.first
        stages = [{"shape": first if isinstance(first, dict) else str(first), "lr": lr[0]}]
        budget_flops, step, spent, prev = steps * _fpt(LARGE), 0, 0.0, first
        for i, (shape, grow, at) in enumerate(recipe.grows):  # stage i ends once `at` of the FLOPs are spent
            if isinstance(at, dict):  # until: auto, its cap at `cap` of the FLOPs (first stage only)
                auto = {k: v for k, v in at.items() if k != "cap"}
                cap_steps = round(at["cap"] * budget_flops / _fpt(prev))
                stages[-1]["until"] = {"auto": {**auto, "max_tokens": cap_steps * TOKENS_PER_STEP}}
            else:
                step += max(1, round((at * budget_flops - spent) / _fpt(prev)))
                spent = at * budget_flops
                stages[-1]["until"] = {"steps": step}
            prev = shape
            g = dict(grow, reinit=True) if reinit else dict(grow)
            stages.append({"shape": shape if isinstance(shape, dict) else str(shape), "grow": g, "lr": lr[i + 1]})
        train = {"lr": lr[-1], **recipe.train}
        tag = "-".join(f"{x:g}" for x in lr)
        name = f"{'reinit' if reinit else 'staged'}/{recipe.name}-lr{tag}/b{budget:g}/seed{seed}"
        return name, self.config(seed, stages, steps, train)

    def run_all(self, runs) -> Dict[str, dict]:
        """Run every ``(name, config)`` not yet done, ``self.jobs`` at a time; ``{name: result}``."""
        todo = [(n, c) for n, c in dict(runs).items() if not (self.out / n / "result.json").exists()]
        if todo and self.cached:
            print(f"--cached: {len(todo)} run(s) not done are left out", flush=True)
        elif todo:
            print(f"{len(todo)} run(s) to do, {self.jobs} at a time", flush=True)
            with cf.ThreadPoolExecutor(self.jobs) as ex:
                for n, ok in zip([n for n, _ in todo], ex.map(lambda nc: self._run(*nc), todo)):
                    print(f"  {'done' if ok else 'FAILED'}: {n}", flush=True)
        return {n: self.result(n) for n, _ in dict(runs).items()}

    def _run(self, name: str, cfg: dict) -> bool:
        d = self.out / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(cfg)
        cfg["run"]["out_dir"] = str(d)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(d / "log.txt", "a") as log:
            rc = subprocess.call([sys.executable, "-m", "growth_ds.cli", "train", str(d / "config.yaml"),
                                  "--run-dir", str(d / "run"), "--no-progress"], env=env, stdout=log, stderr=log)
        if rc != 0:
            return False
        recs = read_metrics(d / "run" / "metrics.jsonl")
        curve = val_curve(recs)
        res = {"final_val_loss": curve[-1][3], "flops": curve[-1][0], "steps": curve[-1][2], "curve": curve,
               "growths": [{k: r.get(k) for k in ("step", "flops", "val_loss_before", "val_loss_after")}
                           for r in recs if r.get("event") == "growth"]}
        atomic.write_text(d / "result.json", json.dumps(res))
        return True

    def result(self, name: str) -> Optional[dict]:
        p = self.out / name / "result.json"
        return json.loads(p.read_text()) if p.exists() else None


def _fpt(shape) -> float:
    s = ModelShape.from_dict(shape) if isinstance(shape, dict) else ModelShape.from_yaml(shape)
    return flops_per_token(s, 64)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def best_lr(results: Dict[float, List[Optional[dict]]]) -> float:
    """The LR whose mean end loss over the screening seeds is lowest."""
    return min(results, key=lambda lr: _mean([r and r["final_val_loss"] for r in results[lr]]))


# ---- phases ----------------------------------------------------------------------------------------
def tune(st: Study, seeds, staged_grid: bool = False, recipe: str = "zero-id") -> dict:
    """Scratch's and the small model's peak LR over LR_GRID at budget 1x. The staged arm's stages take their
    shapes' tuned LRs (the small model's, then scratch's); with ``staged_grid``, the grid is searched on the
    staged arm of ``recipe`` itself, one stage's LR at a time (first stage, then the grown stage with the
    first stage's best), the other stage at its shape's tuned LR."""
    st.prepare(seeds)
    out = {}
    for kind, shape in (("scratch", LARGE), ("small", SMALL)):
        runs = {lr: [st.scratch(s, lr, 1.0, shape=shape) for s in seeds] for lr in LR_GRID}
        res = st.run_all([r for v in runs.values() for r in v])
        table = {lr: [res[n] for n, _ in v] for lr, v in runs.items()}
        out[kind] = {"best": best_lr(table), "grid": {lr: [r and r["final_val_loss"] for r in v]
                                                      for lr, v in table.items()}}
    lr0 = out["scratch"]["best"]
    out["staged_lrs"] = (out["small"]["best"], lr0)
    rec = RECIPES[recipe]
    if staged_grid:
        out["staged_grid_recipe"] = recipe
    for which in ((0, 1) if staged_grid else ()):  # one stage's LR at a time, the other at scratch's best
        runs = {}
        for lr in LR_GRID:
            lrs = (lr, out["staged_lrs"][1]) if which == 0 else (out["staged_lrs"][0], lr)
            runs[lr] = [st.staged(s, rec, 1.0, lr0, lrs=lrs) for s in seeds]
        res = st.run_all([r for v in runs.values() for r in v])
        table = {lr: [res[n] for n, _ in v] for lr, v in runs.items()}
        b = best_lr(table)
        prev = out["staged_lrs"]
        out["staged_lrs"] = (b, prev[1]) if which == 0 else (prev[0], b)
        out[f"staged_stage{which}"] = {lr: [r and r["final_val_loss"] for r in v] for lr, v in table.items()}
    (st.out / "tuned.json").write_text(json.dumps(out, indent=1))
    return out


def tuned(st: Study) -> dict:
    p = st.out / "tuned.json"
    if not p.exists():
        raise SystemExit(f"{p} missing: run `saving.py tune` first")
    return json.loads(p.read_text())


def _screen_baseline(st: Study, r: Recipe, seed: int, lr0: float):
    """The scratch run a screened recipe is compared with, under the recipe's own schedule: tuned WSD scratch;
    for a cosine recipe, scratch under the same cosine (the shipped demo's: at its 3e-3)."""
    if r is SHIPPED_COSINE:
        return st.scratch(seed, 3e-3, 1.0, schedule="cosine", min_lr_ratio=0.1)
    if r.train.get("schedule", "wsd") != "wsd":
        return st.scratch(seed, lr0, 1.0, schedule=r.train["schedule"], min_lr_ratio=r.train.get("min_lr_ratio"))
    return st.scratch(seed, lr0, 1.0)


def screen(st: Study, seeds, names=None, tag: str = "") -> List[dict]:
    """Every recipe at budget 1x on the screening seeds against tuned scratch under the same schedule (single
    budget: the single-curve crossing and the end-loss gap at equal FLOPs), written to ``screen{-tag}.json``
    so that a later screen keeps the earlier one's table."""
    st.prepare(seeds)
    t = tuned(st)
    lr0 = t["scratch"]["best"]
    recipes = [SHIPPED_COSINE if n == SHIPPED_COSINE.name else RECIPES[n] for n in (names or SCREENED)]

    def stage_lrs(r):
        return r.lrs if r is SHIPPED_COSINE else tuned_stage_lrs(t, r)

    entries = [(r, s, st.staged(s, r, 1.0, lr0, lrs=stage_lrs(r)), _screen_baseline(st, r, s, lr0))
               for r in recipes for s in seeds]
    runs = dict([e[2] for e in entries] + [e[3] for e in entries])
    res = st.run_all(runs)
    rows = []
    for r in recipes:
        per = []
        for rr, s, (n, _), (b, _) in entries:
            if rr.name != r.name or res.get(n) is None or res.get(b) is None:
                continue
            base = res[b]
            target = base["final_val_loss"]
            cross = flops_to_reach(res[n]["curve"], target)
            per.append({"seed": s, "gap": res[n]["final_val_loss"] - target,
                        "crossing_saving": saving_percent(flops_to_reach(base["curve"], target), cross)})
        rows.append({"recipe": r.name, "note": r.note, "lrs": list(stage_lrs(r)), "seeds": per})
    atomic.write_text(st.out / f"screen{'-' + tag if tag else ''}.json", json.dumps(rows, indent=1))
    return rows


def baselines(st: Study, seeds) -> None:
    """The arms of :func:`confirm` that do not depend on the recipe (scratch at every budget, the small model
    for the whole budget), to run while the screen is still choosing."""
    st.prepare(seeds)
    t = tuned(st)
    runs = [st.scratch(s, t["scratch"]["best"], b) for s in seeds for b in BUDGETS]
    runs += [st.scratch(s, t["small"]["best"], 1.0, shape=SMALL) for s in seeds]
    st.run_all(runs)


def tuned_stage_lrs(t: dict, rec: Recipe) -> tuple:
    """The staged arm's tuned peak LRs (``tuned(st)["staged_lrs"]``: the first stage's, the grown stage's) for
    every stage of ``rec``: later grown stages at the grown stage's."""
    lrs = tuple(t["staged_lrs"])
    return lrs + (lrs[-1],) * (len(rec.grows) - 1)


def confirm(st: Study, seeds, recipe: str, quick: bool = False) -> dict:
    """The headline: ``recipe`` and its controls at every budget on fresh seeds. ``quick``: the 1x budget only
    (scratch at 1x, the staged arm at 0.5x, 1x and 2x to interpolate; no controls), written to
    more fresh seeds at a third of the cost. Written to ``confirm-RECIPE-seedsA-B.json``."""
    st.prepare(seeds)
    t = tuned(st)
    lr0, lr_small, rec = t["scratch"]["best"], t["small"]["best"], RECIPES[recipe]
    lrs = tuned_stage_lrs(t, rec)
    plan = {}
    for s in seeds:
        for b in ([1.0] if quick else BUDGETS):
            plan[("scratch", s, b)] = st.scratch(s, lr0, b)
        for b in ([0.5, 1.0, 2.0] if quick else STAGED_BUDGETS):
            plan[("staged", s, b)] = st.staged(s, rec, b, lr0, lrs=lrs)
        if not quick:
            plan[("small", s, 1.0)] = st.scratch(s, lr_small, 1.0, shape=SMALL)
            plan[("reinit", s, 1.0)] = st.staged(s, rec, 1.0, lr0, reinit=True, lrs=lrs)
    res = st.run_all(list(plan.values()))
    R = {k: res[v[0]] for k, v in plan.items()}
    out = {"recipe": recipe, "seeds": seeds, "lrs": {"scratch": lr0, "staged": lrs, "small": lr_small},
           "budgets": {}}
    for b in ([1.0] if quick else BUDGETS):
        per = []
        for s in seeds:
            sc = R[("scratch", s, b)]
            stg = [(R[("staged", s, x)]["flops"], R[("staged", s, x)]["final_val_loss"]) for x in STAGED_BUDGETS
                   if R.get(("staged", s, x)) is not None]
            if sc is None or len(stg) < 2:
                continue
            target = sc["final_val_loss"]
            f, extra = flops_to_match([f for f, _ in stg], [l for _, l in stg], target)
            row = {"seed": s, "scratch_loss": target, "saving": saving_percent(sc["flops"], f),
                   "extrapolated": extra}
            eq = R[("staged", s, b)]
            if eq is not None:
                row["staged_loss"] = eq["final_val_loss"]
                row["gap"] = target - eq["final_val_loss"]  # > 0: staged lower at equal FLOPs
                row["crossing_saving"] = saving_percent(flops_to_reach(sc["curve"], target),
                                                        flops_to_reach(eq["curve"], target))
            if b == 1.0:
                for k in ("small", "reinit"):
                    if R.get((k, s, 1.0)) is not None:
                        row[f"{k}_loss"] = R[(k, s, 1.0)]["final_val_loss"]
            per.append(row)
        summ = {}
        if len(per) >= 2:
            summ["saving"] = paired_summary([r["saving"] if r["saving"] is not None else float("nan")
                                             for r in per]).to_dict()
            if all("gap" in r for r in per):
                summ["gap"] = paired_summary([r["gap"] for r in per]).to_dict()
            for k in ("small", "reinit"):
                if all(f"{k}_loss" in r and "staged_loss" in r for r in per):
                    summ[f"vs_{k}"] = paired_summary([r[f"{k}_loss"] - r["staged_loss"] for r in per]).to_dict()
        out["budgets"][str(b)] = {"per_seed": per, **summ}
    name = f"confirm-{recipe}-seeds{min(seeds)}-{max(seeds)}"
    out["quick"] = quick
    (st.out / f"{name}.json").write_text(json.dumps(out, indent=1))
    return out


AUTO_EVERY, AUTO_SKIP, AUTO_CAP = 25, 2, 0.6


def train_points(run_dir: Path, shape, every: int = AUTO_EVERY):
    """What ``until: {auto: {signal: train, every}}`` feeds its trigger, rebuilt from a run's log: for every
    ``every`` steps of the first stage, (FLOPs of ``shape`` over the tokens so far, mean train loss)."""
    recs = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("event") == "step" and r["stage"] == 0]
    pts = []
    for i in range(every, len(recs) + 1, every):
        chunk = recs[i - every:i]
        pts.append((_fpt(shape) * chunk[-1]["tokens"], sum(r["train_loss"] for r in chunk) / every))
    return pts


def calibrate(st: Study, best: str, long: str, seeds) -> dict:
    """The trigger's slope threshold, chosen on the screening seeds: the slope its own fit reports (from the
    first stage of the ``long`` recipe's runs, which train the small model past every boundary) at the
    boundary of the ``best`` hand-picked recipe."""
    from growth_ds.schedule.scaling_law import fit_curve

    t = tuned(st)
    lr0, lrs = t["scratch"]["best"], tuple(t["staged_lrs"])
    at = RECIPES[best].grows[0][2]
    slopes = []
    for s in seeds:
        name, cfg = st.staged(s, RECIPES[long], 1.0, lr0, lrs=lrs)
        pts = train_points(st.out / name / "run", SMALL)
        boundary = at * BASE_STEPS * _fpt(LARGE) * TOKENS_PER_STEP
        upto = [p for p in pts if p[0] <= boundary][AUTO_SKIP:]
        fit = fit_curve([p[0] for p in upto], [p[1] for p in upto])
        slopes.append(fit.slope)
    return {"best": best, "long": long, "seeds": list(seeds), "slopes": slopes, "threshold": sum(slopes) / len(slopes)}


def auto(st: Study, seeds, best: str, long: str = "zero-id@60%", tag: str = "") -> dict:
    """``until: auto`` on fresh seeds at budget 1x, its threshold from :func:`calibrate` on the screening
    seeds, against the hand-picked ``best`` recipe and tuned scratch on the same seeds."""
    t = tuned(st)
    lr0, lrs = t["scratch"]["best"], tuple(t["staged_lrs"])
    cal = calibrate(st, best, long, SCREEN_SEEDS)
    shape, grow, _ = RECIPES[best].grows[0]
    rec = Recipe(f"{best}-auto", ((shape, grow, {"threshold": cal["threshold"], "signal": "train",
                                                 "every": AUTO_EVERY, "skip_points": AUTO_SKIP, "cap": AUTO_CAP}),),
                 RECIPES[best].lrs, RECIPES[best].train, "until: auto (train-loss signal)")
    plan = {s: {"auto": st.staged(s, rec, 1.0, lr0, lrs=lrs), "hand": st.staged(s, RECIPES[best], 1.0, lr0, lrs=lrs),
                "scratch": st.scratch(s, lr0, 1.0)} for s in seeds}
    res = st.run_all([r for v in plan.values() for r in v.values()])
    rows = []
    for s, v in plan.items():
        R = {k: res[n] for k, (n, _) in v.items()}
        if any(x is None for x in R.values()):
            continue
        target = R["scratch"]["final_val_loss"]
        row = {"seed": s, "grew_at_flops_fraction": R["auto"]["growths"][0]["flops"] / R["auto"]["flops"]
               if R["auto"]["growths"] else None}
        for k in ("auto", "hand"):
            row[f"{k}_loss"] = R[k]["final_val_loss"]
            row[f"{k}_crossing"] = saving_percent(flops_to_reach(R["scratch"]["curve"], target),
                                                  flops_to_reach(R[k]["curve"], target))
        row["scratch_loss"] = target
        rows.append(row)
    out = {"calibration": cal, "rows": rows}
    (st.out / f"auto{'-' + tag if tag else ''}.json").write_text(json.dumps(out, indent=1))
    return out


def fmt_auto(a: dict) -> List[str]:
    c = a["calibration"]
    lines = [f"threshold {c['threshold']:.4f}: the fitted slope at `{c['best']}`'s boundary on screening seeds "
             f"{c['seeds']} ({', '.join(f'{x:.4f}' for x in c['slopes'])})", "",
             "| seed | auto grew at (share of FLOPs) | auto end loss | hand-picked end loss | scratch end loss | "
             "auto crossing | hand crossing |", "|---|---|---|---|---|---|---|"]
    for r in a["rows"]:
        g = r["grew_at_flops_fraction"]
        lines.append(f"| {r['seed']} | {'-' if g is None else f'{g:.2f}'} | {r['auto_loss']:.4f} | {r['hand_loss']:.4f} "
                     f"| {r['scratch_loss']:.4f} | " + " | ".join("-" if r[k] is None else f"{r[k]:.1f}%"
                                                                for k in ("auto_crossing", "hand_crossing")) + " |")
    return lines


# ---- tables ----------------------------------------------------------------------------------------
def fmt_tune(t: dict) -> List[str]:
    lines = ["| arm | " + " | ".join(f"lr {x:g}" for x in LR_GRID) + " | best |", "|---" * (len(LR_GRID) + 2) + "|"]
    for kind in ("scratch", "small"):
        g = t[kind]["grid"]
        lines.append(f"| {kind} | " + " | ".join(_cell(g.get(str(x), g.get(x))) for x in LR_GRID) +
                     f" | {t[kind]['best']:g} |")
    for which in (0, 1):
        g = t.get(f"staged_stage{which}")
        if g is None:
            continue
        lines.append(f"| staged {t.get('staged_grid_recipe', 'zero-id')}, stage {which} LR | " +
                     " | ".join(_cell(g.get(str(x), g.get(x))) for x in LR_GRID) + f" | {t['staged_lrs'][which]:g} |")
    return lines


def _cell(losses) -> str:
    if not losses:
        return "-"
    return "/".join("-" if x is None else f"{x:.4f}" for x in losses)


def fmt_screen(rows) -> List[str]:
    lines = ["| recipe | end-loss gap vs tuned scratch (per seed) | crossing saving (per seed) | mean crossing |",
             "|---|---|---|---|"]
    for r in rows:
        if not r["seeds"]:
            lines.append(f"| {r['recipe']} | not run | | |")
            continue
        gaps = " / ".join(f"{p['gap']:+.4f}" for p in r["seeds"])
        sv = [p["crossing_saving"] for p in r["seeds"]]
        svs = " / ".join("not reached" if x is None else f"{x:.1f}%" for x in sv)
        m = _mean(sv) if all(x is not None for x in sv) and sv else None
        lines.append(f"| {r['recipe']} | {gaps} | {svs} | {'-' if m is None else f'{m:.1f}%'} |")
    return lines


def oracle(st: Study, seeds, recipe: str, lrs=(4e-3, 8e-3)) -> dict:
    """A check that favours scratch: on each seed, scratch at 1x at every LR of ``lrs`` (the grid's best two on
    the screening seeds), the lowest end loss *chosen after the fact*, and the staged arm's saving against that
    (its 0.5x / 1x / 2x runs interpolated, as in :func:`confirm`). Written to ``oracle-RECIPE-seedsA-B.json``."""
    st.prepare(seeds)
    t = tuned(st)
    lr0, rec = t["scratch"]["best"], RECIPES[recipe]
    slrs = tuned_stage_lrs(t, rec)
    plan = {}
    for s in seeds:
        for lr in lrs:
            plan[("scratch", s, lr)] = st.scratch(s, lr, 1.0)
        for b in (0.5, 1.0, 2.0):
            plan[("staged", s, b)] = st.staged(s, rec, b, lr0, lrs=slrs)
    res = st.run_all(list(plan.values()))
    R = {k: res[v[0]] for k, v in plan.items()}
    rows = []
    for s in seeds:
        sc = {lr: R[("scratch", s, lr)] for lr in lrs if R[("scratch", s, lr)] is not None}
        stg = [R[("staged", s, b)] for b in (0.5, 1.0, 2.0) if R[("staged", s, b)] is not None]
        if len(sc) < len(lrs) or len(stg) < 2:
            continue
        best = min(sc, key=lambda lr: sc[lr]["final_val_loss"])
        target = sc[best]["final_val_loss"]
        f, extra = flops_to_match([r["flops"] for r in stg], [r["final_val_loss"] for r in stg], target)
        eq = R[("staged", s, 1.0)]
        rows.append({"seed": s, "scratch_losses": {f"{lr:g}": sc[lr]["final_val_loss"] for lr in lrs},
                     "best_lr": best, "scratch_loss": target, "staged_loss": eq["final_val_loss"],
                     "gap": target - eq["final_val_loss"], "saving": saving_percent(sc[best]["flops"], f),
                     "extrapolated": extra})
    out = {"recipe": recipe, "seeds": seeds, "lrs": list(lrs), "per_seed": rows}
    if len(rows) >= 2:
        out["saving"] = paired_summary([r["saving"] if r["saving"] is not None else float("nan")
                                        for r in rows]).to_dict()
        out["gap"] = paired_summary([r["gap"] for r in rows]).to_dict()
    (st.out / f"oracle-{recipe}-seeds{min(seeds)}-{max(seeds)}.json").write_text(json.dumps(out, indent=1))
    return out


def fmt_oracle(o: dict) -> List[str]:
    lines = [f"recipe `{o['recipe']}`, seeds {o['seeds']}; scratch at 1x at LRs {o['lrs']}, the lower end loss "
             f"per seed chosen after the fact (favours scratch)", "",
             "| seed | " + " | ".join(f"scratch lr {x:g}" for x in o["lrs"]) +
             " | staged end loss | saving vs the better scratch (interp.) |", "|---" * (len(o["lrs"]) + 3) + "|"]
    for r in o["per_seed"]:
        sv = "-" if r["saving"] is None else f"{r['saving']:.1f}%" + (" (extrap.)" if r["extrapolated"] else "")
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['scratch_losses'][f'{x:g}']:.4f}" for x in o["lrs"]) +
                     f" | {r['staged_loss']:.4f} | {sv} |")
    if "saving" in o:
        s, g = o["saving"], o["gap"]
        lines += ["", f"- saving mean {s['mean']:.1f}% (90% CI [{s['lo']:.1f}%, {s['hi']:.1f}%], n={s['n']}); end loss "
                      f"better scratch - staged {g['mean']:+.4f}, one-sided p={g['p']:.2g}"]
    return lines


def fmt_confirm(c: dict) -> List[str]:
    lines = [f"recipe `{c['recipe']}`, seeds {c['seeds']}, peak LRs {c['lrs']}", "",
             "| budget | seed | scratch end loss | staged end loss | saving (interp.) | crossing | small | reinit |",
             "|---|---|---|---|---|---|---|---|"]
    for b, blk in c["budgets"].items():
        for r in blk["per_seed"]:
            sv = "-" if r["saving"] is None else f"{r['saving']:.1f}%" + (" (extrap.)" if r["extrapolated"] else "")
            cr = r.get("crossing_saving")
            lines.append(f"| {b}x | {r['seed']} | {r['scratch_loss']:.4f} | {r.get('staged_loss', float('nan')):.4f} "
                         f"| {sv} | {'-' if cr is None else f'{cr:.1f}%'} | {r.get('small_loss', float('nan')):.4f} "
                         f"| {r.get('reinit_loss', float('nan')):.4f} |")
    lines.append("")
    for b, blk in c["budgets"].items():
        if "saving" in blk:
            s = blk["saving"]
            lines.append(f"- {b}x: saving mean {s['mean']:.1f}% (90% CI [{s['lo']:.1f}%, {s['hi']:.1f}%], n={s['n']}); "
                         + (f"end loss scratch - staged {blk['gap']['mean']:+.4f}, one-sided p={blk['gap']['p']:.2g}"
                            if "gap" in blk else ""))
        for k in ("small", "reinit"):
            if f"vs_{k}" in blk:
                v = blk[f"vs_{k}"]
                lines.append(f"  - {k} - staged end loss {v['mean']:+.4f} (90% CI [{v['lo']:+.4f}, {v['hi']:+.4f}]), "
                             f"p={v['p']:.2g}")
    return lines


def plot(out: Path, dest: Path) -> List[Path]:
    """PNGs of what has run: the screen (end-loss gap per recipe and seed) and each confirm (end loss against
    FLOPs at every budget, per seed, with the controls at 1x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for sp in sorted(out.glob("screen*.json")):
        rows = json.loads(sp.read_text())
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
        for i, r in enumerate(rows):
            g = [p["gap"] for p in r["seeds"]]
            ax.plot(g, [i] * len(g), "o", color="C0")
            if g:
                ax.plot([sum(g) / len(g)], [i], "|", color="k", ms=14)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(rows)), [r["recipe"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("end val loss, staged - tuned scratch, equal FLOPs (screening seeds; | = mean)")
        fig.tight_layout()
        fig.savefig(dest / f"{sp.stem}.png", dpi=110)
        plt.close(fig)
        written.append(dest / f"{sp.stem}.png")
    for p in sorted(out.glob("confirm-*.json")):
        c = json.loads(p.read_text())
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, seed in enumerate(c["seeds"]):
            for arm, ls, budgets in (("scratch", "--", BUDGETS), ("staged", "-", STAGED_BUDGETS)):
                pts = []
                for b in budgets:
                    rr = _confirm_run(out, c, arm, seed, b)
                    if rr is not None:
                        pts.append((rr["flops"], rr["final_val_loss"]))
                if pts:
                    ax.plot(*zip(*sorted(pts)), ls, marker="o", color=f"C{i}", ms=3, lw=1,
                            label=f"seed {seed}" if arm == "staged" else None)
            for arm, m in (("small", "s"), ("reinit", "x")):
                rr = _confirm_run(out, c, arm, seed, 1.0)
                if rr is not None:
                    ax.plot([rr["flops"]], [rr["final_val_loss"]], m, color=f"C{i}", mfc="none")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (each point: a complete run, schedule decayed)")
        ax.set_ylabel("end val loss (64k tokens)")
        ax.set_title(f"{c['recipe']} (solid) vs tuned scratch (dashed)\nat 1x: square = small model for the "
                     f"whole budget, x = grown shape re-initialised", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        f = dest / f"{p.stem}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        written.append(f)
    return written


def _confirm_run(out: Path, c: dict, arm: str, seed: int, budget: float) -> Optional[dict]:
    st = Study(out, 1, 0)
    lrs = c["lrs"]
    if arm == "scratch":
        name = st.scratch(seed, lrs["scratch"], budget)[0]
    elif arm == "small":
        name = st.scratch(seed, lrs["small"], budget, shape=SMALL)[0]
    else:
        name = st.staged(seed, RECIPES[c["recipe"]], budget, lrs["scratch"], reinit=arm == "reinit",
                         lrs=tuple(lrs["staged"]))[0]
    return st.result(name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=["tune", "screen", "baselines", "confirm", "oracle", "auto", "table"])
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--recipe", default=None, help="confirm / oracle / auto: the recipe; screen: only these "
                    "(comma-separated); tune --staged-grid: the staged arm")
    ap.add_argument("--out", default=str(REPO / "runs" / "saving"))
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (one process each)")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--staged-grid", action="store_true", help="tune: also search the staged arm's per-stage LRs")
    ap.add_argument("--write", default=None, help="table: also write DIR/saving.md and the PNGs")
    ap.add_argument("--cached", action="store_true", help="tabulate the runs that are done; start none")
    ap.add_argument("--long", default="zero-id@60%", help="auto: the recipe whose first stage (past the hand-picked "
                    "boundary) calibrates the trigger on the screening seeds")
    ap.add_argument("--tag", default="", help="screen / auto: write screen-TAG.json / auto-TAG.json (keeps "
                    "earlier ones)")
    ap.add_argument("--quick", action="store_true", help="confirm: the 1x budget only, no controls (more seeds)")
    a = ap.parse_args(argv)
    st = Study(Path(a.out), a.jobs, a.eval_tokens, a.cached)
    if a.phase == "tune":
        print("\n".join(fmt_tune(tune(st, a.seeds or SCREEN_SEEDS, a.staged_grid, a.recipe or "zero-id"))))
    elif a.phase == "screen":
        names = a.recipe.split(",") if a.recipe else None
        print("\n".join(fmt_screen(screen(st, a.seeds or SCREEN_SEEDS, names, a.tag))))
    elif a.phase == "baselines":
        if not a.seeds or set(a.seeds) & set(SCREEN_SEEDS):
            raise SystemExit("baselines needs fresh --seeds")
        baselines(st, a.seeds)
    elif a.phase == "confirm":
        if not a.recipe or not a.seeds:
            raise SystemExit("confirm needs --recipe and fresh --seeds")
        if set(a.seeds) & set(SCREEN_SEEDS):
            raise SystemExit(f"confirm: seeds {sorted(set(a.seeds) & set(SCREEN_SEEDS))} were used to choose")
        print("\n".join(fmt_confirm(confirm(st, a.seeds, a.recipe, a.quick))))
    elif a.phase == "oracle":
        if not a.recipe or not a.seeds:
            raise SystemExit("oracle needs --recipe and the confirmation's --seeds")
        print("\n".join(fmt_oracle(oracle(st, a.seeds, a.recipe))))
    elif a.phase == "auto":
        if not a.recipe or not a.seeds:
            raise SystemExit("auto needs --recipe (the hand-picked best) and fresh --seeds")
        print("\n".join(fmt_auto(auto(st, a.seeds, a.recipe, a.long, a.tag))))
    else:
        out, parts = Path(a.out), []
        if (out / "tuned.json").exists():
            parts.append("## Peak LR grids (end val loss, screening seeds)\n\n" +
                         "\n".join(fmt_tune(json.loads((out / "tuned.json").read_text()))))
        for p in sorted(out.glob("screen*.json")):
            rows = json.loads(p.read_text())
            lrs = sorted({tuple(r["lrs"][:2]) for r in rows if "lrs" in r})
            parts.append(f"## Screen `{p.stem}` (budget 1x, screening seeds"
                         + (f"; staged stage LRs {', '.join(map(str, lrs))}" if lrs else "") + ")\n\n"
                         + "\n".join(fmt_screen(rows)))
        for p in sorted(out.glob("confirm-*.json")):
            parts.append("## Confirmation on fresh seeds\n\n" + "\n".join(fmt_confirm(json.loads(p.read_text()))))
        for p in sorted(out.glob("oracle-*.json")):
            parts.append("## Against scratch's better LR per seed\n\n" + "\n".join(fmt_oracle(json.loads(p.read_text()))))
        for p in sorted(out.glob("auto*.json")):
            parts.append(f"## until: auto (`{p.stem}`)\n\n" + "\n".join(fmt_auto(json.loads(p.read_text()))))
        text = "\n\n".join(parts) + "\n"
        print(text)
        if a.write:
            dest = Path(a.write)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "saving.md").write_text("# The saving study (`python benchmarks/saving.py table --write "
                                            "benchmarks/results`)\n\n" + text)
            for f in plot(out, dest):
                print(f"plot: {f}")


if __name__ == "__main__":
    main()

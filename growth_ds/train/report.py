"""Staged vs from-scratch: FLOPs each needed to reach the scratch run's final validation loss; over several
paired seeds, every seed's figures with their mean, confidence interval and a one-sided paired test."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from growth_ds.train.metrics import read_metrics, val_curve
from growth_ds.train.stats import saving_percent


def flops_to_reach(curve: Sequence[Tuple[float, float, int, float]], target: float) -> Optional[float]:
    """First compute at which a validation curve reaches ``target`` (log-linear interpolation between
    evaluations); None if it never does."""
    prev = None
    for flops, _, _, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return flops
            f0, l0 = prev
            frac = (l0 - target) / (l0 - loss)
            return math.exp(math.log(f0) + frac * (math.log(flops) - math.log(f0)))
        prev = (flops, loss)
    return None


def compare(staged_dir: str | Path, scratch_dir: str | Path) -> dict:
    staged = read_metrics(Path(staged_dir) / "metrics.jsonl")
    scratch = read_metrics(Path(scratch_dir) / "metrics.jsonl")
    s_curve, b_curve = val_curve(staged), val_curve(scratch)
    if not s_curve or not b_curve:
        raise ValueError("report: both runs need validation losses in metrics.jsonl")
    target = b_curve[-1][3]
    f_scratch = flops_to_reach(b_curve, target)
    f_staged = flops_to_reach(s_curve, target)
    return {
        "target_val_loss": target, "flops_scratch": f_scratch, "flops_staged": f_staged,
        "saving_percent": saving_percent(f_scratch, f_staged),
        "final_val_loss": {"staged": s_curve[-1][3], "scratch": target},
        "total_flops": {"staged": s_curve[-1][0], "scratch": b_curve[-1][0]},
        "growths": [r for r in staged if r.get("event") == "growth"],
        "curves": {"staged": s_curve, "scratch": b_curve},
    }


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("scratch", "-"), ("staged", "-")):
        c = result["curves"][name]
        ax.plot([p[0] for p in c], [p[3] for p in c], style, marker=".", label=name)
    for g in result["growths"]:
        ax.axvline(g["flops"], color="grey", ls=":", lw=1)
        ax.annotate(f"grow ({g['width'] or ''}{'+' if g['width'] and g['depth'] else ''}{g['depth'] or ''})",
                    (g["flops"], ax.get_ylim()[1]), fontsize=8, rotation=90, va="top", ha="right")
    ax.axhline(result["target_val_loss"], color="k", lw=0.8, ls="--", label="scratch final loss")
    if result.get("staged_budgets"):
        ax.plot(*zip(*result["staged_budgets"]), "s", color="C1", mfc="none", label="staged end loss per budget")
        if result.get("flops_staged_end"):
            ax.axvline(result["flops_staged_end"], color="C1", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    s = result.get("saving_end_percent", result["saving_percent"])
    ax.set_title("staged vs from scratch" + (f": {s:.1f}% FLOPs saved" if s is not None else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_report(result: dict) -> str:
    lines = [f"target (scratch final val loss): {result['target_val_loss']:.4f}",
             f"FLOPs to target  scratch: {result['flops_scratch']:.3e}"]
    if result["flops_staged"] is None:
        lines.append(f"                 staged: not reached (final val loss {result['final_val_loss']['staged']:.4f})")
    else:
        lines.append(f"                 staged: {result['flops_staged']:.3e}  (small stages included)")
        lines.append(f"saving (single-curve crossing): {result['saving_percent']:.1f}% of the scratch run's FLOPs")
    for g in result["growths"]:
        lines.append(f"growth at step {g['step']}: {g['width']}/{g['depth']}, val loss {g['val_loss_before']:.4f} -> "
                     f"{g['val_loss_after']:.4f}")
    return "\n".join(lines)


def end_of_run_saving(result: dict, shorter: Sequence[str | Path]) -> dict:
    """The saving measured on complete runs: the staged arm also trained (schedule fully decayed) at
    smaller budgets (``shorter``: run directories), its end losses interpolated in log FLOPs across its
    budgets to the scratch run's end loss (``stats.flops_to_match``). Adds ``flops_staged_end``,
    ``saving_end_percent``, ``extrapolated`` and the budgets' ``(flops, end loss)`` to ``result``."""
    from growth_ds.train.stats import flops_to_match

    pts = []
    for d in shorter:
        c = val_curve(read_metrics(Path(d) / "metrics.jsonl"))
        if c:
            pts.append((c[-1][0], c[-1][3]))
    pts.append((result["total_flops"]["staged"], result["final_val_loss"]["staged"]))
    f, extra = flops_to_match([p[0] for p in pts], [p[1] for p in pts], result["target_val_loss"])
    total = result["total_flops"]["scratch"]
    return dict(result, staged_budgets=sorted(pts), flops_staged_end=f, extrapolated=extra,
                saving_end_percent=saving_percent(total, f))


def report(run_root: str | Path, staged: Optional[str] = None, scratch: Optional[str] = None,
           png: Optional[str] = None) -> Tuple[dict, List[str]]:
    """One staged run against its scratch baseline; when ``RUN_ROOT/staged-short*/`` hold the staged arm
    at smaller budgets (the demo writes one), also the end-of-run saving (:func:`end_of_run_saving`)."""
    root = Path(run_root)
    result = compare(staged or root / "staged", scratch or root / "scratch")
    shorter = sorted(d for d in root.glob("staged-short*") if (d / "metrics.jsonl").exists()) if not staged else []
    lines = [format_report(result)]
    if shorter:
        result = end_of_run_saving(result, shorter)
        lines.append(format_end_of_run(result))
    out = Path(png) if png else root / "report.png"
    plot(result, out)
    return result, lines + [f"plot: {out}"]


def format_end_of_run(result: dict) -> str:
    budgets = ", ".join(f"{f:.3e} FLOPs -> {loss:.4f}" for f, loss in result["staged_budgets"])
    lines = [f"staged arm at {len(result['staged_budgets'])} budgets (each run fully decayed): {budgets}"]
    if result["saving_end_percent"] is None:
        lines.append("saving at the end of complete runs: the staged end losses do not fall with the budget")
    else:
        how = "extrapolated beyond" if result["extrapolated"] else "interpolated between"
        lines.append(f"saving: {result['saving_end_percent']:.1f}% of the scratch run's FLOPs: the staged arm reaches "
                     f"{result['target_val_loss']:.4f} at {result['flops_staged_end']:.3e} FLOPs ({how} its budgets, "
                     f"small stages included)")
    return "\n".join(lines)


def report_many(run_roots: Sequence[str | Path], png: Optional[str] = None, level: float = 0.90
                ) -> Tuple[dict, List[str]]:
    """Paired seeds: ``run_roots[k]`` holds seed k's ``staged/`` and ``scratch/`` (same data and sample order,
    equal FLOPs). Per seed: end losses, the gap (scratch - staged: positive when the staged run ends lower)
    and the single-curve crossing saving; then mean, ``level`` CI and the one-sided paired t-test of "staged
    end loss < scratch end loss" (``stats.paired_summary``), and the saving's mean and CI."""
    from growth_ds.train.stats import paired_summary

    if len(run_roots) < 2:
        raise ValueError("report: paired statistics need 2 or more run roots (one per seed)")
    rows = []
    for root in run_roots:
        r = compare(Path(root) / "staged", Path(root) / "scratch")
        rows.append({"root": str(root), "scratch": r["target_val_loss"], "staged": r["final_val_loss"]["staged"],
                     "gap": r["target_val_loss"] - r["final_val_loss"]["staged"], "saving": r["saving_percent"],
                     "result": r})
    gap = paired_summary([r["gap"] for r in rows], level)
    savings = [r["saving"] for r in rows]
    saving = paired_summary(savings, level) if all(s is not None for s in savings) else None
    lines = [f"{'run':<32} {'scratch end':>11} {'staged end':>10} {'gap':>8} {'saving':>8}"]
    for r in rows:
        sv = "n/r" if r["saving"] is None else f"{r['saving']:.1f}%"
        lines.append(f"{Path(r['root']).name:<32} {r['scratch']:>11.4f} {r['staged']:>10.4f} {r['gap']:>+8.4f} {sv:>8}")
    lines.append(f"end loss, scratch - staged at equal FLOPs: {gap.describe(fmt='+.4f')} (staged lower)")
    lines.append("saving (single-curve crossing): " + (saving.describe("%") if saving else
                                                        "not every seed reached scratch's final loss"))
    out = Path(png) if png else Path(run_roots[0]).parent / "report.png"
    _plot_many(rows, out)
    lines.append(f"plot: {out}")
    return {"per_seed": [{k: v for k, v in r.items() if k != "result"} for r in rows], "gap": gap.to_dict(),
            "saving": None if saving is None else saving.to_dict()}, lines


def _plot_many(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        for name, ls in (("scratch", "--"), ("staged", "-")):
            c = r["result"]["curves"][name]
            ax.plot([p[0] for p in c], [p[3] for p in c], ls, color=f"C{i}", lw=1,
                    label=f"{Path(r['root']).name} {name}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title(f"staged (solid) vs scratch (dashed), {len(rows)} paired seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

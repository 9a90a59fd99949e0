"""Plots and tables for scaling-law fits and stage plans (matplotlib, Agg backend, imported lazily)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from growth_ds.schedule.scaling_law import Observations


def _points(points) -> Dict[str, np.ndarray]:
    """Normalise points to arrays ``flops, loss`` and optional ``n_params``, ``tokens`` (all (P,))."""
    if points is None:
        return {}
    if isinstance(points, Observations):
        return dict(flops=points.flops, loss=points.loss, n_params=points.n_params, tokens=points.tokens)
    if isinstance(points, dict):
        out = {k: np.asarray(v, dtype=np.float64) for k, v in points.items()}
        if "val_loss" in out and "loss" not in out:
            out["loss"] = out.pop("val_loss")
        if "flops" not in out and {"n_params", "tokens"} <= set(out):
            out["flops"] = 6.0 * out["n_params"] * out["tokens"]
        if "flops" not in out or "loss" not in out:
            raise ValueError("points dict needs 'flops' (or 'n_params' and 'tokens') and 'loss'")
        return out
    if isinstance(points, (list, tuple)) and len(points) == 2:
        return dict(flops=np.asarray(points[0], dtype=np.float64), loss=np.asarray(points[1], dtype=np.float64))
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 2:
        return dict(flops=arr[:, 0], loss=arr[:, 1])
    raise ValueError("points: pass Observations, a dict of arrays, (flops, loss) or an (P, 2) array")


def plot_fit(points, law, boundaries=None, path: Union[str, Path] = "scaling_fit.png", *,
             title: Optional[str] = None) -> Path:
    """Write a PNG of loss vs compute (log-log).

    ``points``: :class:`Observations`, a dict of arrays (``flops``/``n_params``+``tokens``, ``loss``),
    ``(flops, loss)`` or a (P, 2) array; coloured by ``n_params`` when known.
    ``law``: a fit (``L(N, D)`` laws draw one curve per model size; ``L(C)`` forms one curve) or None.
    ``boundaries``: a :class:`StagePlan` (its path through the stages and growth points), or a list
    of FLOPs values drawn as vertical lines, or None. Returns the path.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg canvas; no global backend change
    from matplotlib.figure import Figure

    pts = _points(points)
    fig = Figure(figsize=(7.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    sizes: List[float] = []
    cmap = matplotlib.colormaps["viridis"]
    if pts:
        if "n_params" in pts:
            sizes = sorted(set(pts["n_params"].tolist()))
            for j, n in enumerate(sizes):
                m = pts["n_params"] == n
                ax.scatter(pts["flops"][m], pts["loss"][m], s=10, color=cmap(j / max(1, len(sizes) - 1)),
                           label=f"N={n:.3g}", zorder=3)
        else:
            ax.scatter(pts["flops"], pts["loss"], s=10, color="k", label="data", zorder=3)
    plan = boundaries if hasattr(boundaries, "stages") else None
    lo = hi = None
    if pts:
        lo, hi = float(np.min(pts["flops"])), float(np.max(pts["flops"]))
    if plan is not None:
        lo = min(lo or math.inf, plan.stages[0].cum_flops * 1e-2)
        hi = max(hi or 0.0, plan.budget_flops)
        sizes = sorted(set(sizes) | {float(s.n_params) for s in plan.stages})
    if law is not None and lo is not None:
        C = np.geomspace(lo / 2, hi * 2, 200)
        if hasattr(law, "tokens_for_loss"):  # L(N, D)
            for j, n in enumerate(sizes):
                ax.plot(C, law.loss(n, C / (6.0 * n)), "-", lw=1, color=cmap(j / max(1, len(sizes) - 1)))
        else:
            ax.plot(C, law.loss(C), "-", lw=1.2, color="tab:red", label=f"{getattr(law, 'kind', 'fit')} fit")
    if plan is not None:
        law_obj = law if hasattr(law, "tokens_for_loss") else plan.law_object()
        c0 = 0.0
        for s in plan.stages:
            t = np.linspace(0.0, s.tokens, 200)[1:] if s.tokens > 0 else np.array([0.0])
            pos = s.start_tokens + t
            ax.plot(c0 + 6.0 * s.n_params * t, law_obj.loss(s.n_params, pos), "-", lw=2.5, color="tab:red",
                    alpha=0.8, label="plan" if s.index == 0 else None)
            c0 += s.flops
            if s.index < len(plan.stages) - 1:
                ax.axvline(s.cum_flops, color="tab:red", ls="--", lw=1)
                ax.annotate(f"grow {s.n_params:.3g}\u2192{plan.stages[s.index + 1].n_params:.3g}",
                            (s.cum_flops, s.end_loss), fontsize=7, rotation=90, va="bottom")
        ax.axhline(plan.target_loss, color="gray", ls=":", lw=1, label=f"target {plan.target_loss:.3f}")
        ax.axvline(plan.scratch_flops, color="gray", ls="-.", lw=1, label="scratch to target")
    elif boundaries is not None:
        for b in boundaries:
            ax.axvline(float(b), color="tab:red", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C = 6 N D (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.2)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="upper right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    return path


def _fmt(x: Optional[float], spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def format_stage_table(plan) -> str:
    """Fixed-width text table of a :class:`StagePlan` (one row per stage plus a summary)."""
    head = ["stage", "n_params", "start tok", "tokens", "end tok", "cum tok", "cum FLOPs", "end loss",
            "end slope", "rho_op", "restart"]
    rows = []
    for s in plan.stages:
        rows.append([str(s.index), f"{s.n_params:.4g}", _fmt(s.start_tokens), _fmt(s.tokens), _fmt(s.end_tokens),
                     _fmt(s.cum_tokens), _fmt(s.cum_flops), _fmt(s.end_loss, ".4f"), _fmt(s.end_slope, ".4f"),
                     _fmt(s.rho_op, ".3f"), "-" if s.restart_step is None else str(s.restart_step)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = "  ".join(h.rjust(w) for h, w in zip(head, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    out.append(f"target loss {plan.target_loss:.4f} | plan {plan.total_flops:.4g} FLOPs vs scratch "
               f"{plan.scratch_flops:.4g} FLOPs | saving {100 * plan.saving:.2f}% (small-model compute counted)"
               + ("" if plan.loss_at_budget is None else f" | loss at budget {plan.loss_at_budget:.4f}"))
    return "\n".join(out)

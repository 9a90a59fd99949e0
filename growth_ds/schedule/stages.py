"""Stage plans from a fitted scaling law: which shapes, when to grow, where the grown model restarts.

Planning model (explicit; units: ``N`` parameters, ``D`` tokens, ``C = 6 N D`` FLOPs, loss in nats)
----------------------------------------------------------------------------------------------------
* Every shape ``N`` trained from scratch follows the law's curve ``L(N, D)`` (:class:`ChinchillaFit`
  or :class:`KaplanNSFit`).
* Growth is loss-preserving (staged training, Shen et al. 2022): when the small model ``N_s`` has
  trained ``D_s`` tokens (loss ``l = L(N_s, D_s)``), the grown model ``N_l`` continues on the large
  model's from-scratch curve from the *equivalent position*

      p = D_eq / rho,   D_eq = L^-1(N_l, l)   (tokens a scratch ``N_l`` needs to reach ``l``)

  and its LR schedule restarts there (``S_target = S_pre / rho_op``, ``rho_op = D_s / p``).
  ``rho`` here is the operator's *discount* relative to ideal growth (``rho = 1``: the grown model
  is exactly where a scratch large model with the same loss would be; ``rho > 1``: it lost some
  progress). Calibrate it from probe runs with :func:`calibrate_rho` (its ``discount``); Shen et al.'s
  constant ``rho_op`` is reported per stage and equals ``D_s / D_eq`` when ``rho = 1``.
* Target: the final shape (default: the candidate with the lowest from-scratch loss at
  ``budget_flops``) trained from scratch on the whole budget reaches ``L*``; that is the reference.
  A plan is a chain of candidates ending at the final shape; its cost is the sum of stage FLOPs
  (the small models' compute **is** counted) until the final shape reaches ``L*``.  Switch points
  minimise that total (grid dynamic programme over switch tokens, then Nelder-Mead polish); every
  subset of smaller candidates is tried as a chain (the empty one = training from scratch).
  ``saving = 1 - C_plan / C_scratch(L*)``, which for two stages and ``rho = 1`` is Shen et al.'s
  ``(C_large_scratch(L_grow) - C_small) / C_large_scratch(L*)``.
* Two-stage optimum (independent of the target): ``dC/dD_s = 6 N_s - 6 (N_l / rho) dD_eq/dD_s = 0``,
  i.e. grow when a FLOP on the small model buys less loss than ``rho`` FLOPs on the grown one;
  the slope ``d ln L / d ln C`` of the small model there is the ``when: auto`` threshold
  (:func:`growth_threshold`, used by :class:`GrowthTrigger`).
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from growth_ds.schedule.scaling_law import CurveFit, ScalingFitError, _load_json, fit_curve, law_from_json

# Staged training's values (remove_oracle.ipynb / cheatsheet.txt; Kaplan-regime GPT-2, slopes of
# log10 L vs log10 C). Use as priors only; calibrate per architecture family.
STAGED_THRESHOLDS = {"width": -0.0475, "depth": -0.0575, "depth_width": -0.03, "optimality": -0.052}
STAGED_RHO_OP = {"width": 1.776, "depth": 1.412, "depth_width": 2.455}


# ================================================================================================
# helpers
# ================================================================================================
def _n_params_of(shape: Any, attr: str = "n_params") -> int:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        n = int(shape)
    elif isinstance(shape, float) and shape.is_integer():
        n = int(shape)
    elif hasattr(shape, attr):
        n = int(getattr(shape, attr))
    else:
        raise TypeError(f"candidate shape {shape!r}: expected an int or an object with .{attr}")
    if n <= 0:
        raise ValueError(f"candidate shape {shape!r}: n_params must be positive, got {n}")
    return n


def _label_of(shape: Any, n: int) -> str:
    if hasattr(shape, "describe") and callable(shape.describe):
        try:
            return str(shape.describe())
        except Exception:  # noqa: BLE001
            pass
    if hasattr(shape, "name"):
        return str(shape.name)
    return f"{n / 1e6:.3g}M"


def _as_law(law: Any):
    if isinstance(law, (str, bytes, Mapping, os.PathLike)):
        law = law_from_json(law)
    for m in ("loss", "tokens_for_loss", "dloss_dtokens", "min_loss"):
        if not callable(getattr(law, m, None)):
            raise TypeError(f"law {type(law).__name__} has no {m}(); need a law L(N, D) "
                            f"(ChinchillaFit or KaplanNSFit)")
    return law


def _f(x) -> float:
    return float(np.asarray(x, dtype=np.float64))


def _log_slope(law, n: float, tokens: float) -> float:
    """``d ln L / d ln C`` along a scratch curve (``C = 6 N D``, so = ``D dL/dD / L``)."""
    return _f(tokens * law.dloss_dtokens(n, tokens) / law.loss(n, tokens))


# ================================================================================================
# two-stage optimum and the slope threshold
# ================================================================================================
@dataclass
class SwitchPoint:
    """Compute-optimal switch from ``n_small`` to ``n_large`` under a law (target not binding)."""

    n_small: int
    n_large: int
    rho: float                 # discount (1 = ideal loss-preserving growth)
    tokens: float              # small-model tokens at the switch
    flops: float               # 6 * n_small * tokens
    loss: float                # L(n_small, tokens)
    slope: float               # d ln L / d ln C of the small model there (the trigger threshold)
    restart_tokens: float      # grown model's position: D_eq / rho
    rho_op: float              # tokens / restart_tokens (Shen et al.'s S_pre / S_target)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def optimal_switch(law, n_small, n_large, rho: float = 1.0, *, d_min: float = 1.0, d_max: float = 1e18
                   ) -> Optional[SwitchPoint]:
    """Solve ``N_s = (N_l / rho) dD_eq/dD_s`` for the switch tokens (brentq on a log bracket).

    Returns ``None`` when growth never pays under the law (e.g. ``rho >= N_l / N_s``), or the
    switch lies outside ``[d_min, d_max]`` tokens.
    """
    law = _as_law(law)
    ns, nl = _n_params_of(n_small), _n_params_of(n_large)
    if not nl > ns:
        raise ValueError(f"n_large ({nl}) must exceed n_small ({ns})")
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a positive finite number, got {rho}")
    from scipy.optimize import brentq

    def g(u):
        d = np.exp(u)
        deq = law.tokens_for_loss(nl, law.loss(ns, d))
        ratio = law.dloss_dtokens(ns, d) / law.dloss_dtokens(nl, deq)
        return ns - (nl / rho) * ratio

    us = np.linspace(math.log(d_min), math.log(d_max), 721)
    with np.errstate(all="ignore"):
        gs = np.asarray(g(us), dtype=np.float64)
    ok = np.isfinite(gs)
    cross = np.flatnonzero(ok[:-1] & ok[1:] & (gs[:-1] < 0) & (gs[1:] >= 0))
    if not ok.any() or gs[ok][0] >= 0 or cross.size == 0:
        return None
    i = int(cross[0])
    with np.errstate(all="ignore"):
        u = brentq(lambda v: float(g(v)), us[i], us[i + 1], xtol=1e-12, rtol=1e-12)
    d = math.exp(u)
    loss = _f(law.loss(ns, d))
    restart = _f(law.tokens_for_loss(nl, loss)) / rho
    return SwitchPoint(ns, nl, float(rho), d, 6.0 * ns * d, loss, _log_slope(law, ns, d), restart, d / restart)


def growth_threshold(law, n_small, n_large, rho: float = 1.0) -> Optional[float]:
    """Slope ``d ln L / d ln C`` of the small model at the law's optimal switch (None: never grow)."""
    sp = optimal_switch(law, n_small, n_large, rho)
    return None if sp is None else sp.slope


# ================================================================================================
# plans
# ================================================================================================
@dataclass
class Stage:
    """One stage. Positions are tokens on this shape's from-scratch curve; ``tokens`` are trained.

    Grow at the end of the stage (after ``tokens`` in it; ``cum_tokens``/``cum_flops`` overall);
    the stage's LR schedule is this shape's from-scratch schedule with horizon ``end_tokens``,
    entered at ``start_tokens`` (``restart_step`` when ``tokens_per_step`` was given).
    """

    index: int
    shape_index: int           # index into candidate_shapes
    n_params: int
    label: str
    start_tokens: float        # restart position (0 for the first stage)
    end_tokens: float
    tokens: float              # end_tokens - start_tokens
    flops: float               # 6 * n_params * tokens
    cum_tokens: float          # tokens trained in all stages so far (incl. this one)
    cum_flops: float
    start_loss: Optional[float]   # None for the first stage (L(N, 0) is infinite)
    end_loss: float
    end_slope: float           # d ln L / d ln C at the end (threshold for GrowthTrigger)
    rho: Optional[float] = None       # discount applied when entering this stage
    rho_op: Optional[float] = None    # previous stage's end_tokens / start_tokens (S_pre / S_target)
    restart_step: Optional[int] = None


@dataclass
class StagePlan:
    """A stage plan; ``saving = 1 - total_flops / scratch_flops`` (all stages' compute counted)."""

    law_kind: str
    law: Dict[str, Any]
    budget_flops: float
    target_loss: float
    final_n_params: int
    scratch_flops: float       # final shape from scratch to target_loss
    scratch_tokens: float
    total_flops: float
    total_tokens: float
    saving: float
    stages: List[Stage]
    loss_at_budget: Optional[float] = None   # final shape continued on the leftover budget
    alternatives: List[Dict[str, Any]] = field(default_factory=list)
    model: str = ""

    @property
    def growth_points(self) -> List[Dict[str, float]]:
        """Per growth: cumulative tokens/FLOPs when to grow and the grown model's restart position."""
        out = []
        for a, b in zip(self.stages[:-1], self.stages[1:]):
            out.append(dict(n_from=a.n_params, n_to=b.n_params, cum_tokens=a.cum_tokens, cum_flops=a.cum_flops,
                            stage_tokens=a.tokens, loss=a.end_loss, slope=a.end_slope,
                            restart_tokens=b.start_tokens, restart_step=b.restart_step, rho_op=b.rho_op))
        return out

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["kind"] = "stage_plan"
        return d

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text) -> "StagePlan":
        data = _load_json(text)
        data.pop("kind", None)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown StagePlan field(s) {unknown}")
        data["stages"] = [Stage(**s) for s in data["stages"]]
        return cls(**data)

    def law_object(self):
        return law_from_json(self.law)


def _rho_lookup(rho, ns: Sequence[int]) -> Callable[[int, int], Optional[float]]:
    """Normalise ``rho`` to f(n_from, n_to) -> discount or None (transition not allowed)."""
    from_cal = getattr(rho, "discount", None)
    if rho is None:
        return lambda a, b: 1.0
    if from_cal is not None:
        r = float(from_cal)
        return lambda a, b: r
    if isinstance(rho, (int, float, np.floating)) and not isinstance(rho, bool):
        r = float(rho)
        return lambda a, b: r
    if callable(rho):
        return lambda a, b: float(rho(a, b))
    if isinstance(rho, Mapping):
        table = {(int(a), int(b)): float(v) for (a, b), v in rho.items()}
        return lambda a, b: table.get((a, b))
    seq = list(rho)
    if len(seq) != len(ns) - 1:
        raise ValueError(f"rho as a sequence needs one value per consecutive pair ({len(ns) - 1}), got {len(seq)}")
    table = {(ns[i], ns[i + 1]): float(getattr(v, "discount", v)) for i, v in enumerate(seq)}
    return lambda a, b: table.get((a, b))


def _chain_cost(law, ns, rs, d_star, l_star, d):
    """Total FLOPs for stage lengths ``d`` (m-1,) of the non-final stages; inf if infeasible."""
    p, total = 0.0, 0.0
    for k in range(len(ns) - 1):
        if not (d[k] >= 0 and math.isfinite(d[k])):
            return math.inf
        e = p + d[k]
        loss_e = _f(law.loss(ns[k], e))
        if not loss_e > l_star:
            return math.inf
        total += 6.0 * ns[k] * d[k]
        p = _f(law.tokens_for_loss(ns[k + 1], loss_e)) / rs[k]
        if not math.isfinite(p):
            return math.inf
    return total + 6.0 * ns[-1] * max(d_star - p, 0.0)


def _optimise_chain(law, ns, rs, d_star, l_star, grid_points):
    """DP over a log grid of stage-end positions, then Nelder-Mead on log stage lengths."""
    m = len(ns)
    if m == 1:
        return 6.0 * ns[0] * d_star, []
    with np.errstate(all="ignore"):
        grids = []
        for k in range(m - 1):
            hi = _f(law.tokens_for_loss(ns[k], l_star))
            hi = 1e4 * d_star if not math.isfinite(hi) else hi * (1.0 - 1e-9)
            grids.append(np.geomspace(hi * 1e-10, hi, grid_points))

        def v_final(p):
            return 6.0 * ns[-1] * np.maximum(d_star - p, 0.0)

        tables = [None] * (m - 1)
        v_next = v_final
        for k in range(m - 2, -1, -1):
            E = grids[k]
            nxt = np.asarray(law.tokens_for_loss(ns[k + 1], law.loss(ns[k], E)), dtype=np.float64) / rs[k]
            val = 6.0 * ns[k] * E + v_next(nxt)
            val[~np.isfinite(val)] = np.inf
            # suffix minimum (and its argmin) over e >= p
            rev = val[::-1]
            run = np.minimum.accumulate(rev)
            arg_rev = np.zeros(len(rev), dtype=np.int64)
            best = 0
            for i in range(1, len(rev)):  # G is small (<= ~10^4); clarity over speed
                if rev[i] < rev[best]:
                    best = i
                arg_rev[i] = best
            smin = run[::-1]
            sarg = (len(rev) - 1 - arg_rev)[::-1]
            tables[k] = (E, smin, sarg)

            def v_k(p, E=E, smin=smin, n=ns[k]):
                p = np.asarray(p, dtype=np.float64)
                idx = np.searchsorted(E, p, side="left")
                safe = np.minimum(idx, len(E) - 1)
                return np.where(idx < len(E), smin[safe] - 6.0 * n * p, np.inf)

            v_next = v_k
    # forward pass
    d0, p = [], 0.0
    for k in range(m - 1):
        E, smin, sarg = tables[k]
        idx = int(np.searchsorted(E, p, side="left"))
        if idx >= len(E) or not np.isfinite(smin[idx]):
            return math.inf, []
        e = float(E[sarg[idx]])
        d0.append(e - p)
        p = _f(law.tokens_for_loss(ns[k + 1], law.loss(ns[k], e))) / rs[k]
    best_c = _chain_cost(law, ns, rs, d_star, l_star, d0)
    best_d = d0
    if math.isfinite(best_c) and all(x > 0 for x in d0):
        from scipy.optimize import minimize

        h = math.log(grids[0][1] / grids[0][0])
        x0 = np.log(np.array(d0))
        simplex = np.vstack([x0] + [x0 + h * np.eye(len(x0))[i] for i in range(len(x0))])
        scale = best_c

        def obj(x):
            with np.errstate(all="ignore"):
                c = _chain_cost(law, ns, rs, d_star, l_star, np.exp(x))
            return c / scale if math.isfinite(c) else 1e300

        res = minimize(obj, x0, method="Nelder-Mead",
                       options=dict(initial_simplex=simplex, xatol=1e-10, fatol=1e-15, maxiter=4000))
        c = obj(res.x) * scale
        if c < best_c:
            best_c, best_d = c, list(np.exp(res.x))
    return best_c, best_d


def plan_stages(law, budget_flops: float, candidate_shapes: Sequence[Any], rho=None, *,
                final_index: Optional[int] = None, target_loss: Optional[float] = None,
                tokens_per_step: Optional[float] = None, max_stages: Optional[int] = None,
                grid_points: int = 2001, param_attr: str = "n_params") -> StagePlan:
    """Plan growth stages under a fitted law ``L(N, D)`` (see the module docstring for the model).

    Args:
      law: :class:`ChinchillaFit` / :class:`KaplanNSFit` (or their JSON).
      budget_flops: compute budget ``C`` (FLOPs, ``6 N D``); defines the target ``L*`` as the final
        shape's from-scratch loss at ``C`` (unless ``target_loss`` is given).
      candidate_shapes: ints or objects with ``.n_params`` (``param_attr``), ordered small -> large.
      rho: growth discount (1 = ideal; *not* Shen et al.'s rho_op, which the plan reports
        per stage): ``None`` (= 1), a float, a :class:`RhoCalibration` (its
        ``discount``), a sequence with one value per consecutive pair, a mapping
        ``{(n_from, n_to): rho}`` or a callable ``rho(n_from, n_to)``; transitions without a value
        are not considered.
      final_index: index of the final shape; default: lowest from-scratch loss at the budget.
      tokens_per_step: if given, restart positions are also reported as optimizer steps.
      max_stages: longest chain considered (default: all candidates up to the final).
    """
    law = _as_law(law)
    if not (isinstance(budget_flops, (int, float, np.integer, np.floating)) and not isinstance(budget_flops, bool)
            and math.isfinite(budget_flops) and budget_flops > 0):
        raise ValueError(f"budget_flops must be a positive finite number, got {budget_flops!r}")
    shapes = list(candidate_shapes)
    if not shapes:
        raise ValueError("candidate_shapes is empty")
    ns = [_n_params_of(s, param_attr) for s in shapes]
    if any(b <= a for a, b in zip(ns, ns[1:])):
        raise ValueError(f"candidate_shapes must be ordered small -> large with distinct sizes, got n_params {ns}")
    labels = [_label_of(s, n) for s, n in zip(shapes, ns)]
    scratch_loss = [_f(law.loss(n, budget_flops / (6.0 * n))) for n in ns]
    f = int(np.argmin(scratch_loss)) if final_index is None else int(final_index)
    if not 0 <= f < len(ns):
        raise ValueError(f"final_index {final_index} out of range for {len(ns)} candidates")
    n_f = ns[f]
    l_star = scratch_loss[f] if target_loss is None else float(target_loss)
    d_star = _f(law.tokens_for_loss(n_f, l_star))
    if not math.isfinite(d_star):
        raise ValueError(f"final shape ({n_f} params) cannot reach target loss {l_star:.4g} "
                         f"(its asymptote is {_f(law.min_loss(n_f)):.4g})")
    scratch_flops = 6.0 * n_f * d_star
    rho_of = _rho_lookup(rho, ns)
    max_len = len(ns) if max_stages is None else int(max_stages)

    results = []
    for r in range(0, f + 1):
        for sub in itertools.combinations(range(f), r):
            chain = list(sub) + [f]
            if len(chain) > max_len:
                continue
            cns = [ns[i] for i in chain]
            rs = [rho_of(a, b) for a, b in zip(cns, cns[1:])]
            if any(x is None for x in rs):
                continue
            for x in rs:
                if not (x > 0 and math.isfinite(x)):
                    raise ValueError(f"rho must be positive and finite, got {x}")
            cost, d = _optimise_chain(law, cns, rs, d_star, l_star, grid_points)
            if math.isfinite(cost):
                results.append((cost, chain, rs, d))
    results.sort(key=lambda t: t[0])
    cost, chain, rs, d = results[0]

    stages: List[Stage] = []
    p, cum_t, cum_c = 0.0, 0.0, 0.0
    for k, i in enumerate(chain):
        n = ns[i]
        last = k == len(chain) - 1
        end = float(max(d_star, p) if last else p + d[k])
        tok = end - p
        cum_t += tok
        cum_c += 6.0 * n * tok
        start_loss = None if p == 0 else _f(law.loss(n, p))
        prev_end = stages[-1].end_tokens if stages else None
        stages.append(Stage(
            index=k, shape_index=i, n_params=n, label=labels[i], start_tokens=p, end_tokens=end, tokens=tok,
            flops=6.0 * n * tok, cum_tokens=cum_t, cum_flops=cum_c, start_loss=start_loss,
            end_loss=_f(law.loss(n, end)), end_slope=_log_slope(law, n, end),
            rho=None if k == 0 else float(rs[k - 1]),
            rho_op=None if k == 0 or p <= 0 else float(prev_end / p),
            restart_step=None if tokens_per_step is None else int(round(p / tokens_per_step))))
        if not last:
            p = _f(law.tokens_for_loss(ns[chain[k + 1]], law.loss(n, end))) / rs[k]
    leftover = budget_flops - cum_c
    loss_at_budget = None
    if leftover >= 0:
        loss_at_budget = _f(law.loss(n_f, stages[-1].end_tokens + leftover / (6.0 * n_f)))
    alternatives = [dict(n_params=[ns[i] for i in ch], total_flops=float(c), saving=float(1.0 - c / scratch_flops))
                    for c, ch, _, _ in results]
    return StagePlan(
        law_kind=getattr(law, "kind", type(law).__name__), law=law.to_dict() if hasattr(law, "to_dict") else {},
        budget_flops=float(budget_flops), target_loss=l_star, final_n_params=n_f, scratch_flops=scratch_flops,
        scratch_tokens=d_star, total_flops=cum_c, total_tokens=cum_t, saving=1.0 - cum_c / scratch_flops,
        stages=stages, loss_at_budget=loss_at_budget, alternatives=alternatives,
        model=("loss-preserving growth: grown model continues on its scratch curve from "
               "L^-1(N_next, L(N, D_switch)) / rho; switch points minimise total FLOPs (6 N D, all "
               "stages counted) to reach the final shape's from-scratch loss at the budget"))


# ================================================================================================
# rho from probe runs
# ================================================================================================
@dataclass
class RhoCalibration:
    """Operator constants measured on probe runs (tokens; losses in nats).

    ``rho``: Shen et al.'s ``rho_op`` = ``grow_tokens / equal_loss_tokens`` -- tokens the small model
    trained before growth over tokens the scratch large model needs to reach the small model's loss
    at growth. ``rho_effective``: same with the position the grown model actually tracks on the
    scratch curve (from ``grown_curve``). ``discount = rho_effective / rho`` (1 without a grown
    curve) is what :func:`plan_stages` takes. Restart the LR schedule at ``restart_tokens``.
    """

    rho: float
    grow_tokens: float
    grow_loss: float
    equal_loss_tokens: float
    rho_effective: Optional[float] = None
    track_tokens: Optional[float] = None
    discount: float = 1.0
    restart_tokens: float = 0.0
    n_grown_points: int = 0

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(dict(asdict(self), kind="rho_calibration"), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text) -> "RhoCalibration":
        data = _load_json(text)
        data.pop("kind", None)
        return cls(**data)


def _curve(name: str, curve, min_points: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(curve, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ScalingFitError(f"{name}: expected an array of (tokens, loss) rows, got shape {arr.shape}")
    t, l = arr[:, 0], arr[:, 1]
    if not np.all(np.isfinite(arr)):
        raise ScalingFitError(f"{name}: non-finite (NaN/inf) values")
    if np.any(t <= 0) or np.any(l <= 0):
        raise ScalingFitError(f"{name}: tokens and loss must be positive")
    order = np.argsort(t, kind="stable")
    t, l = t[order], l[order]
    if len(t) < min_points:
        raise ScalingFitError(f"{name}: too few points ({len(t)}; need {min_points})")
    return t, l


def _smooth_log(l: np.ndarray, window: int) -> np.ndarray:
    """Centred running mean of log loss (window shrinks at the ends)."""
    y = np.log(l)
    h = max(0, int(window) // 2)
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.maximum(0, i - h), np.minimum(len(y), i + h + 1)
    return (c[hi] - c[lo]) / (hi - lo)


def _loss_at_end(t: np.ndarray, l: np.ndarray, window: int) -> float:
    """Loss at the last point from a log-log line through the last ``window`` points."""
    k = max(2, min(int(window), len(t)))
    x, y = np.log(t[-k:]), np.log(l[-k:])
    A = np.column_stack([np.ones(k), x - x[-1]])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(np.exp(coef[0]))


def _tokens_at_loss(t: np.ndarray, ys: np.ndarray, loss: float, name: str) -> float:
    """First crossing of the smoothed log-loss curve ``ys`` below ``log(loss)`` (log-log interp)."""
    target = math.log(loss)
    if ys[0] < target:
        raise ScalingFitError(f"{name}: already below loss {loss:.4g} at its first point; start it earlier")
    below = np.flatnonzero(ys <= target)
    if below.size == 0:
        raise ScalingFitError(f"{name}: never reaches loss {loss:.4g} (min {math.exp(ys.min()):.4g}); run it longer")
    j = int(below[0])
    if j == 0:
        return float(t[0])
    x0, x1 = math.log(t[j - 1]), math.log(t[j])
    y0, y1 = ys[j - 1], ys[j]
    w = 0.0 if y1 == y0 else (y0 - target) / (y0 - y1)
    return float(math.exp(x0 + w * (x1 - x0)))


def calibrate_rho(small_curve, large_scratch_curve, grown_curve=None, *, grown_tokens: str = "cumulative",
                  window: int = 5, skip_frac: float = 0.25) -> RhoCalibration:
    """Measure ``rho`` (and the planner's ``discount``) from short probe runs.

    Args:
      small_curve: (P, 2) rows ``(tokens, val_loss)`` of the small model from scratch up to growth;
        growth happens at its last point.
      large_scratch_curve: (Q, 2) the large model from scratch; must pass below the growth loss.
      grown_curve: optional (R, 2) the grown model after growth; ``grown_tokens='cumulative'``
        counts tokens from the start of the small run, ``'since_growth'`` from the growth.
      window: points for smoothing; skip_frac: leading fraction of the grown curve ignored as the
        post-growth transient when aligning it to the scratch curve.
    """
    ts, ls = _curve("small_curve", small_curve)
    tl, ll = _curve("large_scratch_curve", large_scratch_curve)
    d_pre = float(ts[-1])
    l_pre = _loss_at_end(ts, ls, window)
    yl = _smooth_log(ll, window)
    d_eq = _tokens_at_loss(tl, yl, l_pre, "large_scratch_curve")
    rho = d_pre / d_eq
    cal = RhoCalibration(rho=rho, grow_tokens=d_pre, grow_loss=l_pre, equal_loss_tokens=d_eq,
                         restart_tokens=d_eq)
    if grown_curve is None:
        return cal
    tg, lg = _curve("grown_curve", grown_curve)
    if grown_tokens == "cumulative":
        since = tg - d_pre
    elif grown_tokens == "since_growth":
        since = tg
    else:
        raise ValueError(f"grown_tokens must be 'cumulative' or 'since_growth', got {grown_tokens!r}")
    keep = since > 0
    since, lg = since[keep], lg[keep]
    start = int(math.floor(skip_frac * len(since)))
    since, lg = since[start:], lg[start:]
    if len(since) < 3:
        raise ScalingFitError(f"grown_curve: too few points after the transient ({len(since)}; need 3)")
    xl = np.log(tl)
    ylg = np.log(lg)

    def mismatch(u):
        pos = np.log(math.exp(u) + since)
        inside = (pos >= xl[0]) & (pos <= xl[-1])
        if inside.sum() < 3:
            return np.inf
        pred = np.interp(pos[inside], xl, yl)
        return float(np.mean((pred - ylg[inside]) ** 2))

    us = np.linspace(math.log(tl[0] * 1e-3 + 1e-300), xl[-1], 801)
    vals = np.array([mismatch(u) for u in us])
    if not np.isfinite(vals).any():
        raise ScalingFitError("grown_curve: no overlap with large_scratch_curve; run the scratch probe longer")
    i = int(np.argmin(vals))
    from scipy.optimize import minimize_scalar

    lo, hi = us[max(0, i - 1)], us[min(len(us) - 1, i + 1)]
    res = minimize_scalar(mismatch, bounds=(lo, hi), method="bounded", options=dict(xatol=1e-9))
    u = res.x if res.fun <= vals[i] else us[i]
    track = math.exp(u)
    cal.rho_effective = d_pre / track
    cal.track_tokens = track
    cal.discount = d_eq / track
    cal.restart_tokens = track
    cal.n_grown_points = int(len(since))
    return cal


# ================================================================================================
# online trigger (when: auto)
# ================================================================================================
@dataclass
class GrowthDecision:
    """Result of :meth:`GrowthTrigger.update`.

    ``reason``: ``'slope'`` (fitted slope crossed the threshold), ``'max_tokens'``/``'max_flops'``
    (hard cap), or for ``grow=False``: ``'too_few_points'``, ``'degenerate'``, ``'invalid_point'``,
    ``'below_threshold'``. ``detail`` is a sentence ("no growth yet: ..." when not growing).
    """

    grow: bool
    reason: str
    detail: str
    slope: Optional[float] = None
    slope_smoothed: Optional[float] = None
    threshold: Optional[float] = None
    fit: Optional[Dict[str, float]] = None
    n_points: int = 0
    flops: Optional[float] = None
    tokens: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class GrowthTrigger:
    """Online ``when: auto`` rule: fed ``(flops, val_loss)`` every K steps, refits ``L(C) = E +
    (C_c/C)**alpha`` (:func:`fit_curve`) and grows once ``d ln L / d ln C >= threshold`` for
    ``patience`` consecutive updates (slopes are negative; growing when the curve is flatter).

    ``threshold``: given (e.g. ``STAGED_THRESHOLDS['width']``), or derived from ``law`` for
    ``n_params -> next_n_params`` with discount ``rho`` (:func:`growth_threshold`).
    For a model that was itself grown, feed ``flops = 6 N (restart_tokens + tokens since growth)``,
    i.e. its position on its own scratch curve. ``max_tokens``/``max_flops`` force growth (tokens
    default to ``flops / (6 n_params)``). Points must have increasing flops; a smaller one (resume
    from an earlier checkpoint) drops the stored points at or beyond it. After firing, the decision
    is latched until :meth:`reset`.
    """

    def __init__(self, threshold: Optional[float] = None, *, law=None, n_params: Optional[int] = None,
                 next_n_params: Optional[int] = None, rho: float = 1.0, min_points: int = 8,
                 skip_points: int = 0, min_flops: float = 0.0, max_tokens: Optional[float] = None,
                 max_flops: Optional[float] = None, patience: int = 1, window: int = 5, use: str = "fit",
                 n_starts: int = 8, warm_n_starts: int = 2):
        if use not in ("fit", "smoothed"):
            raise ValueError(f"use must be 'fit' or 'smoothed', got {use!r}")
        if threshold is None and law is not None:
            if n_params is None or next_n_params is None:
                raise ValueError("deriving the threshold from a law needs n_params and next_n_params")
            threshold = growth_threshold(law, n_params, next_n_params, getattr(rho, "discount", rho))
            if threshold is None:
                raise ValueError(f"under this law growing {n_params} -> {next_n_params} never saves compute "
                                 f"(rho={rho}); give a threshold or max_tokens explicitly")
        if threshold is None and max_tokens is None and max_flops is None:
            raise ValueError("GrowthTrigger needs a threshold, a law to derive it from, or a max_tokens/max_flops cap")
        if threshold is not None and not (math.isfinite(threshold) and threshold < 0):
            raise ValueError(f"threshold is a slope d ln L / d ln C and must be negative, got {threshold}")
        self.threshold = None if threshold is None else float(threshold)
        self.n_params = n_params
        self.min_points = max(4, int(min_points))
        self.skip_points = int(skip_points)
        self.min_flops = float(min_flops)
        self.max_tokens = max_tokens
        self.max_flops = max_flops
        self.patience = max(1, int(patience))
        self.window = int(window)
        self.use = use
        self.n_starts, self.warm_n_starts = int(n_starts), int(warm_n_starts)
        self.reset()

    def reset(self) -> None:
        self.flops: List[float] = []
        self.losses: List[float] = []
        self._streak = 0
        self._last_fit: Optional[CurveFit] = None
        self.fired: Optional[GrowthDecision] = None

    def state_dict(self) -> Dict[str, Any]:
        return dict(flops=list(self.flops), losses=list(self.losses), streak=self._streak,
                    fired=None if self.fired is None else self.fired.to_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self.flops = [float(x) for x in state["flops"]]
        self.losses = [float(x) for x in state["losses"]]
        self._streak = int(state.get("streak", 0))
        self.fired = None if state.get("fired") is None else GrowthDecision(**state["fired"])

    def update(self, flops: float, val_loss: float, tokens: Optional[float] = None) -> GrowthDecision:
        if self.fired is not None:
            return self.fired
        flops, val_loss = float(flops), float(val_loss)
        if tokens is None and self.n_params:
            tokens = flops / (6.0 * self.n_params)
        base = dict(threshold=self.threshold, flops=flops, tokens=tokens)
        if self.max_tokens is not None and tokens is not None and tokens >= self.max_tokens:
            return self._fire(GrowthDecision(True, "max_tokens", f"grow: tokens {tokens:.4g} >= max_tokens "
                                             f"{self.max_tokens:.4g}", n_points=len(self.flops), **base))
        if self.max_flops is not None and flops >= self.max_flops:
            return self._fire(GrowthDecision(True, "max_flops", f"grow: flops {flops:.4g} >= max_flops "
                                             f"{self.max_flops:.4g}", n_points=len(self.flops), **base))
        if not (math.isfinite(flops) and math.isfinite(val_loss) and flops > 0 and val_loss > 0):
            return GrowthDecision(False, "invalid_point", f"no growth yet: ignored point flops={flops}, "
                                  f"val_loss={val_loss} (must be positive and finite)",
                                  n_points=len(self.flops), **base)
        while self.flops and self.flops[-1] >= flops:
            self.flops.pop()
            self.losses.pop()
        self.flops.append(flops)
        self.losses.append(val_loss)
        C = np.array(self.flops[self.skip_points:])
        L = np.array(self.losses[self.skip_points:])
        keep = C >= self.min_flops
        C, L = C[keep], L[keep]
        if self.threshold is None:
            return GrowthDecision(False, "below_threshold", "no growth yet: only the max_tokens/max_flops cap is set",
                                  n_points=len(C), **base)
        if len(C) < self.min_points:
            return GrowthDecision(False, "too_few_points", f"no growth yet: {len(C)} usable points, need "
                                  f"{self.min_points}", n_points=len(C), **base)
        try:
            fit = fit_curve(C, L, window=self.window, warm_start=self._last_fit,
                            n_starts=self.n_starts if self._last_fit is None else self.warm_n_starts)
        except ScalingFitError as exc:
            self._streak = 0
            return GrowthDecision(False, "degenerate", f"no growth yet: {exc}", n_points=len(C), **base)
        self._last_fit = fit
        slope = fit.slope if self.use == "fit" else fit.slope_smoothed
        info = dict(slope=slope, slope_smoothed=fit.slope_smoothed, fit=fit.params(), n_points=len(C), **base)
        if slope >= self.threshold:
            self._streak += 1
            if self._streak >= self.patience:
                return self._fire(GrowthDecision(True, "slope", f"grow: slope {slope:.4g} >= threshold "
                                                 f"{self.threshold:.4g}", **info))
            return GrowthDecision(False, "below_threshold", f"no growth yet: slope {slope:.4g} >= threshold "
                                  f"for {self._streak}/{self.patience} updates", **info)
        self._streak = 0
        return GrowthDecision(False, "below_threshold", f"no growth yet: slope {slope:.4g} < threshold "
                              f"{self.threshold:.4g}", **info)

    def _fire(self, decision: GrowthDecision) -> GrowthDecision:
        self.fired = decision
        return decision

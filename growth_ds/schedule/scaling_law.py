"""Scaling-law fits for the stage scheduler (JSON in, JSON out).

Forms (loss ``L`` in nats/token, ``N`` parameters, ``D`` tokens, ``S`` steps or tokens, ``C`` FLOPs):

* Chinchilla (Hoffmann et al. 2022)  ``L(N, D) = E + A / N**alpha + B / D**beta``     -> :class:`ChinchillaFit`
* Kaplan (Kaplan et al. 2020, eq 1.6) ``L(N, S) = (N_c / N)**alpha_N + (S_c / S)**alpha_S``
  (Kaplan's ``2 S_c`` is absorbed into ``S_c``)                                      -> :class:`KaplanNSFit`
* Kaplan compute law                  ``L(C) = (C_c / C)**alpha_C``                   -> :class:`KaplanCFit`
* single-run online curve            ``L(C) = E + (C_c / C)**alpha`` plus the local slope
  ``d ln L / d ln C`` (== ``d log10 L / d log10 C``) at the last point          -> :func:`fit_curve`

Every form is a log-sum-exp of power-law terms, so all fits share one estimator (Hoffmann et al.,
App. D.2): minimise ``sum_i Huber_delta(log Lhat_i - log L_i)`` (``delta = 1e-3``) with L-BFGS over
log-space parameters (``a = log A``, ``e = log E``, ...) from a grid of starting points, keeping the
best.  Bootstrap intervals resample points (or whole runs) with replacement, refit, and take
percentiles.  Bad input raises :class:`ScalingFitError` with the reason; nothing falls back to a default.

scipy is imported lazily (only fitting needs it).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import KW_ONLY, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

HUBER_DELTA = 1e-3
_EXP_BOUNDS = (0.0, 5.0)      # exponents (alpha, beta, ...) are kept in [0, 5] during L-BFGS
_MIN_EXPONENT = 1e-4          # a fitted exponent below this means "no power-law decrease"

PathLike = Union[str, os.PathLike]


class ScalingFitError(ValueError):
    """A scaling-law fit cannot be made from the given data; the message names the problem."""


# ================================================================================================
# input checks
# ================================================================================================
def _as_1d(name: str, x: Any) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ScalingFitError(f"{name}: not convertible to a float array ({exc})") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ScalingFitError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    return arr


def _check_points(covariates: Mapping[str, Any], loss: Any, n_free: int, what: str
                  ) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Validate positive finite covariates and losses; at least ``n_free + 1`` points."""
    cov = {k: _as_1d(k, v) for k, v in covariates.items()}
    y = _as_1d("loss", loss)
    for k, v in cov.items():
        if v.shape != y.shape:
            raise ScalingFitError(f"{what}: {k} has {v.size} values but loss has {y.size}")
    for k, v in list(cov.items()) + [("loss", y)]:
        bad = ~np.isfinite(v)
        if bad.any():
            idx = np.flatnonzero(bad)[:5].tolist()
            raise ScalingFitError(f"{what}: {int(bad.sum())} non-finite (NaN/inf) value(s) in {k} "
                                  f"at index {idx}")
        nonpos = v <= 0
        if nonpos.any():
            idx = np.flatnonzero(nonpos)[:5].tolist()
            label = "compute" if k == "flops" else k
            raise ScalingFitError(f"{what}: {int(nonpos.sum())} non-positive value(s) in {label} at "
                                  f"index {idx}; all must be > 0")
    if y.size < n_free + 1:
        raise ScalingFitError(f"{what}: too few points: {y.size} given, need at least {n_free + 1} "
                              f"({n_free} free parameters + 1)")
    for k, v in cov.items():
        if np.unique(v).size < 2:
            raise ScalingFitError(f"{what}: need at least 2 distinct {k} values, got {np.unique(v).size}")
    if np.ptp(y) <= 1e-12 * float(np.max(y)):
        raise ScalingFitError(f"{what}: loss is flat (all values = {y[0]:.6g}); no decrease to fit")
    return cov, y


def _check_decreasing(X: np.ndarray, y: np.ndarray, names: Sequence[str], what: str) -> None:
    """OLS of log-loss on log-covariates (with intercept); every slope must be negative."""
    design = np.column_stack([np.ones(len(y)), X])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    for name, c in zip(names, coef[1:]):
        if not c < 0:
            raise ScalingFitError(f"{what}: loss does not decrease with {name} (log-log regression slope "
                                  f"{c:+.4g}); flat or rising loss cannot be fitted by a decreasing law")


# ================================================================================================
# BLAS threads: scipy's L-BFGS-B makes many tiny BLAS calls; with OpenBLAS worker threads each call
# also pays a hand-off between threads, which dominates a fit when the cores are busy. Fits run with
# OpenBLAS limited to one thread, restored afterwards (best effort; a no-op where not found).
# ================================================================================================
_BLAS_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                 ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                 ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                 ("openblas_set_num_threads", "openblas_get_num_threads"))
_blas_handles: Optional[list] = None


def _openblas_handles() -> list:
    global _blas_handles
    if _blas_handles is not None:
        return _blas_handles
    handles = []
    try:
        import ctypes

        import scipy.optimize  # noqa: F401  (loads scipy's BLAS)

        seen = set()
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.split() else ""
                name = os.path.basename(path)
                if "openblas" not in name or ".so" not in name or path in seen:
                    continue
                seen.add(path)
                lib = ctypes.CDLL(path)
                for set_name, get_name in _BLAS_SYMBOLS:
                    if hasattr(lib, set_name) and hasattr(lib, get_name):
                        handles.append((getattr(lib, set_name), getattr(lib, get_name)))
                        break
    except Exception:  # noqa: BLE001 - purely a speed measure; never fail a fit over it
        handles = []
    _blas_handles = handles
    return handles


class _single_thread_blas:
    def __enter__(self):
        self._saved = []
        for set_fn, get_fn in _openblas_handles():
            try:
                self._saved.append((set_fn, int(get_fn())))
                set_fn(1)
            except Exception:  # noqa: BLE001
                pass
        return self

    def __exit__(self, *exc):
        for set_fn, n in self._saved:
            try:
                set_fn(n)
            except Exception:  # noqa: BLE001
                pass
        return False


# ================================================================================================
# the shared estimator: log L = logsumexp_k(a_k - alpha_k x_k [, e])
# theta = [a_1, alpha_1, ..., a_K, alpha_K, (e)]
# ================================================================================================
def _terms(theta: np.ndarray, X: np.ndarray, const: bool) -> np.ndarray:
    """theta (..., p), X (P, K) -> log-terms (..., P, K[+1])."""
    K = X.shape[1]
    a = theta[..., 0:2 * K:2]
    al = theta[..., 1:2 * K:2]
    T = a[..., None, :] - X * al[..., None, :]
    if const:
        e = np.broadcast_to(theta[..., 2 * K][..., None, None], T.shape[:-1] + (1,))
        T = np.concatenate([T, e], axis=-1)
    return T


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def _objective(theta: np.ndarray, X: np.ndarray, y: np.ndarray, const: bool, delta: float
               ) -> Tuple[float, np.ndarray]:
    """Mean Huber loss / delta and its gradient (analytic)."""
    K = X.shape[1]
    T = _terms(theta, X, const)                       # (P, K[+1])
    m = T.max(axis=1, keepdims=True)
    W = np.exp(T - m)
    s = W.sum(axis=1, keepdims=True)
    lse = (m + np.log(s))[:, 0]
    W /= s
    r = lse - y
    quad = np.abs(r) <= delta
    h = np.where(quad, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    psi = np.where(quad, r, delta * np.sign(r))
    scale = 1.0 / (delta * len(y))
    PW = psi[:, None] * W
    g = np.empty_like(theta)
    g[0:2 * K:2] = PW[:, :K].sum(axis=0)
    g[1:2 * K:2] = -(PW[:, :K] * X).sum(axis=0)
    if const:
        g[2 * K] = PW[:, K].sum()
    return float(h.sum() * scale), g * scale


def _grid_objective(thetas: np.ndarray, X: np.ndarray, y: np.ndarray, const: bool, delta: float,
                    chunk: int = 256) -> np.ndarray:
    """Objective for many starts at once: thetas (G, p) -> (G,)."""
    out = np.empty(len(thetas))
    with np.errstate(all="ignore"):
        for i in range(0, len(thetas), chunk):
            T = _terms(thetas[i:i + chunk], X, const)   # (g, P, K)
            m = T.max(axis=-1, keepdims=True)
            lse = (m + np.log(np.exp(T - m).sum(axis=-1, keepdims=True)))[..., 0]
            out[i:i + chunk] = _huber(lse - y, delta).sum(axis=-1) / (delta * len(y))
    out[~np.isfinite(out)] = np.inf
    return out


def _fit_lse(X: np.ndarray, y: np.ndarray, const: bool, grid: np.ndarray, *, n_starts: int,
             delta: float, extra_starts: Sequence[np.ndarray] = (), what: str = "fit"
             ) -> Tuple[np.ndarray, float]:
    """Best L-BFGS-B solution from ``extra_starts`` + the ``n_starts`` best grid points."""
    from scipy.optimize import minimize

    K = X.shape[1]
    bounds = []
    for _ in range(K):
        bounds += [(None, None), _EXP_BOUNDS]
    if const:
        bounds.append((-30.0, None))
    starts = [np.asarray(s, dtype=np.float64) for s in extra_starts]
    if n_starts > 0 and len(grid):
        f0 = _grid_objective(grid, X, y, const, delta)
        order = np.argsort(f0, kind="stable")
        starts += [grid[i] for i in order[:n_starts] if np.isfinite(f0[i])]
    best, best_f = None, np.inf
    with _single_thread_blas():
        best, best_f = _run_starts(starts, bounds, X, y, const, delta, minimize)
    if best is None:
        raise ScalingFitError(f"{what}: the optimizer found no finite solution from any of "
                              f"{len(starts)} starting points")
    return best, best_f


def _run_starts(starts, bounds, X, y, const, delta, minimize):
    best, best_f = None, np.inf
    for x0 in starts:
        x0 = np.array([min(max(v, lo if lo is not None else -np.inf), hi if hi is not None else np.inf)
                       for v, (lo, hi) in zip(x0, bounds)])
        try:
            with np.errstate(all="ignore"):
                res = minimize(_objective, x0, args=(X, y, const, delta), jac=True, method="L-BFGS-B",
                               bounds=bounds,
                               options=dict(maxiter=3000, maxfun=6000, ftol=1e-15, gtol=1e-11))
        except (ValueError, FloatingPointError, ArithmeticError, np.linalg.LinAlgError):
            continue
        if np.isfinite(res.fun) and np.all(np.isfinite(res.x)) and res.fun < best_f:
            best, best_f = res.x, float(res.fun)
    return best, best_f


def _check_exponents(theta: np.ndarray, names: Sequence[str], K: int, what: str) -> None:
    for k in range(K):
        if theta[2 * k + 1] < _MIN_EXPONENT:
            raise ScalingFitError(f"{what}: fitted exponent for {names[k]} is {theta[2 * k + 1]:.3g} "
                                  f"(~0): the loss shows no power-law decrease in {names[k]}")


def _power_grid(X: np.ndarray, y: np.ndarray, const: bool,
                alphas: Sequence[float] = (0.03, 0.08, 0.2, 0.4, 0.8, 1.6),
                fracs: Sequence[float] = (0.05, 0.2, 0.5, 0.85),
                e_fracs: Sequence[float] = (0.05, 0.4, 0.7, 0.9)) -> np.ndarray:
    """Data-adaptive grid: each term equals ``frac * median(L)`` at the median covariate."""
    K = X.shape[1]
    lmed = float(np.exp(np.median(y)))
    lmin = float(np.exp(np.min(y)))
    axes = []
    for k in range(K):
        xm = float(np.median(X[:, k]))
        pairs = [(al * xm + math.log(f * lmed), al) for al in alphas for f in fracs]
        axes.append(pairs)
    combos = [[]]
    for pairs in axes:
        combos = [c + list(p) for c in combos for p in pairs]
    if const:
        combos = [c + [math.log(ef * lmin)] for c in combos for ef in e_fracs]
    return np.array(combos, dtype=np.float64)


def _hoffmann_grid() -> np.ndarray:
    """Hoffmann et al.'s grid: alpha, beta in {0,.5,...,2}; e in {-1,-.5,...,1}; a, b in {0,5,...,25}."""
    ab = np.arange(0.0, 2.01, 0.5)
    e = np.arange(-1.0, 1.01, 0.5)
    aa = np.arange(0.0, 25.1, 5.0)
    g = np.stack(np.meshgrid(aa, ab, aa, ab, e, indexing="ij"), axis=-1).reshape(-1, 5)
    return g  # columns: a, alpha, b, beta, e


# ================================================================================================
# bootstrap
# ================================================================================================
def _bootstrap(refit: Callable[[np.ndarray], Dict[str, float]], n: int, n_boot: int, seed: int,
               level: float, groups: Optional[np.ndarray], what: str
               ) -> Tuple[Dict[str, List[float]], int]:
    """Percentile intervals of ``refit``'s parameters over ``n_boot`` resamples of ``n`` points.

    Each resample draws ``n`` point indices with replacement, or, with ``groups`` (one label per
    point, e.g. run ids), as many whole groups as there are, with replacement; ``refit(idx)`` returns
    ``{param: value}`` or raises :class:`ScalingFitError` (counted as failed). The draws depend only
    on ``seed``, so a seed gives the same intervals. Returns ``({param: [lo, hi]}, n_failed)`` at
    ``level``; raises ``ScalingFitError`` when fewer than ``max(2, n_boot // 2)`` resamples fit.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must have one label per point ({n}), got shape {groups.shape}")
        labels = np.unique(groups)
        members = [np.flatnonzero(groups == g) for g in labels]
    samples: List[Dict[str, float]] = []
    failed = 0
    for _ in range(n_boot):
        if groups is None:
            idx = rng.integers(0, n, size=n)
        else:
            pick = rng.integers(0, len(members), size=len(members))
            idx = np.concatenate([members[i] for i in pick])
        try:
            samples.append(refit(idx))
        except ScalingFitError:
            failed += 1
    if len(samples) < max(2, n_boot // 2):
        raise ScalingFitError(f"{what}: bootstrap failed: {failed} of {n_boot} resamples could not be fitted")
    q = (1.0 - level) / 2.0
    ci = {}
    for k in samples[0]:
        vals = np.array([s[k] for s in samples])
        ci[k] = [float(np.quantile(vals, q)), float(np.quantile(vals, 1.0 - q))]
    return ci, failed


def _attach_bootstrap(fit: "_Fit", X: np.ndarray, y: np.ndarray, const: bool, grid: np.ndarray,
                      theta: np.ndarray, names: Sequence[str], to_params: Callable[[np.ndarray], Dict[str, float]],
                      *, delta: float, n_boot: int, seed: int, level: float, groups, what: str) -> None:
    """The bootstrap every fit shares: with ``n_boot > 0``, set ``fit.ci`` (see :func:`_bootstrap`),
    ``ci_level``, ``n_boot`` and ``n_boot_failed``; ``n_boot <= 0`` leaves ``fit`` as it is.

    Each resample is refit by :func:`_fit_lse` started from the full-data estimate ``theta`` alone
    (no grid search over ``grid``) and must pass the same exponent checks over ``names`` as the fit.
    """
    if n_boot <= 0:
        return

    def refit(idx):
        t, _ = _fit_lse(X[idx], y[idx], const, grid, n_starts=0, delta=delta, extra_starts=[theta], what=what)
        _check_exponents(t, names, len(names), what)
        return to_params(t)
    fit.ci, fit.n_boot_failed = _bootstrap(refit, len(y), n_boot, seed, level, groups, what)
    fit.ci_level, fit.n_boot = level, n_boot


# ================================================================================================
# fit results
# ================================================================================================
@dataclass
class _Fit:
    """Common JSON plumbing and what every fit records of itself (keyword-only): the points it was fitted on,
    the objective at the optimum (Chinchilla: mean Huber(delta)/delta), ``ci`` (parameter name -> [lo, hi],
    percentile bootstrap at ``ci_level`` over ``n_boot`` resamples, ``n_boot_failed`` of which did not fit)."""

    _: KW_ONLY
    n_points: int = 0
    objective: Optional[float] = None
    ci: Optional[Dict[str, List[float]]] = None
    ci_level: Optional[float] = None
    n_boot: int = 0
    n_boot_failed: int = 0

    kind: ClassVar[str] = "fit"
    _params: ClassVar[Tuple[str, ...]] = ()

    def params(self) -> Dict[str, float]:
        return {k: float(getattr(self, k)) for k in self._params}

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind
        return d

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"expected a {cls.kind!r} fit, got kind {kind!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: Union[str, bytes, Mapping[str, Any]]):
        """From a JSON string, a dict, or the path of a ``.json`` file."""
        return cls.from_dict(_load_json(text))


def _load_json(text: Union[str, bytes, Mapping[str, Any], os.PathLike]) -> Dict[str, Any]:
    if isinstance(text, Mapping):
        return dict(text)
    if isinstance(text, os.PathLike) or (isinstance(text, str) and not text.lstrip().startswith("{")):
        with open(text) as f:
            return json.load(f)
    return json.loads(text)


def _ci_or_none(ci: Optional[Dict[str, List[float]]]) -> Optional[Dict[str, List[float]]]:
    return None if ci is None else {k: [float(a), float(b)] for k, (a, b) in ci.items()}


@dataclass
class ChinchillaFit(_Fit):
    """``L(N, D) = E + A / N**alpha + B / D**beta`` (N params, D tokens, L nats/token)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    kind: ClassVar[str] = "chinchilla"
    _params: ClassVar[Tuple[str, ...]] = ("E", "A", "alpha", "B", "beta")

    def loss(self, n_params, tokens):
        """Predicted loss; broadcasts over arrays."""
        N = np.asarray(n_params, dtype=np.float64)
        D = np.asarray(tokens, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def min_loss(self, n_params):
        """Loss at infinite data: ``E + A / N**alpha``."""
        return self.E + self.A / np.asarray(n_params, dtype=np.float64) ** self.alpha

    def tokens_for_loss(self, n_params, loss):
        """Tokens a from-scratch model of ``n_params`` needs to reach ``loss`` (inf if unreachable)."""
        gap = np.asarray(loss, dtype=np.float64) - self.min_loss(n_params)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(gap > 0, (self.B / np.where(gap > 0, gap, 1.0)) ** (1.0 / self.beta), np.inf)
        return out if out.ndim else float(out)

    def dloss_dtokens(self, n_params, tokens):
        """``dL/dD`` (negative), per token."""
        D = np.asarray(tokens, dtype=np.float64)
        return -self.beta * self.B * D ** (-self.beta - 1.0)

    def compute_optimal(self, flops):
        """Chinchilla compute-optimal ``(N_opt, D_opt)`` for ``C = 6 N D`` FLOPs."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        c6 = np.asarray(flops, dtype=np.float64) / 6.0
        n = G * c6 ** (b / (a + b))
        return n, c6 / n


@dataclass
class KaplanNSFit(_Fit):
    """``L(N, S) = (N_c / N)**alpha_N + (S_c / S)**alpha_S``; ``S = tokens / tokens_per_step``.

    With ``tokens_per_step == 1`` the second variable is tokens (the default for fits from logs).
    """

    N_c: float
    alpha_N: float
    S_c: float
    alpha_S: float
    tokens_per_step: float = 1.0

    kind: ClassVar[str] = "kaplan_ns"
    _params: ClassVar[Tuple[str, ...]] = ("N_c", "alpha_N", "S_c", "alpha_S")

    def loss_at_steps(self, n_params, steps):
        N = np.asarray(n_params, dtype=np.float64)
        S = np.asarray(steps, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return (self.N_c / N) ** self.alpha_N + (self.S_c / S) ** self.alpha_S

    def loss(self, n_params, tokens):
        return self.loss_at_steps(n_params, np.asarray(tokens, dtype=np.float64) / self.tokens_per_step)

    def min_loss(self, n_params):
        return (self.N_c / np.asarray(n_params, dtype=np.float64)) ** self.alpha_N

    def tokens_for_loss(self, n_params, loss):
        gap = np.asarray(loss, dtype=np.float64) - self.min_loss(n_params)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(gap > 0, self.S_c * np.where(gap > 0, gap, 1.0) ** (-1.0 / self.alpha_S), np.inf)
        out = s * self.tokens_per_step
        return out if out.ndim else float(out)

    def dloss_dtokens(self, n_params, tokens):
        S = np.asarray(tokens, dtype=np.float64) / self.tokens_per_step
        return -self.alpha_S * (self.S_c / S) ** self.alpha_S / S / self.tokens_per_step


@dataclass
class KaplanCFit(_Fit):
    """``L(C) = (C_c / C)**alpha_C`` (C in FLOPs)."""

    C_c: float
    alpha_C: float

    kind: ClassVar[str] = "kaplan_c"
    _params: ClassVar[Tuple[str, ...]] = ("C_c", "alpha_C")

    def loss(self, flops):
        return (self.C_c / np.asarray(flops, dtype=np.float64)) ** self.alpha_C

    def slope_at(self, flops):
        return -self.alpha_C + 0.0 * np.asarray(flops, dtype=np.float64)


@dataclass
class CurveFit(_Fit):
    """Single-run ``L(C) = E + (C_c / C)**alpha`` plus slopes ``d ln L / d ln C`` at the last point.

    ``slope``: from the fitted curve; ``slope_smoothed``: staged training's estimate (trailing running
    mean over ``window`` points of log L and log C, first difference at the last point).
    """

    E: float
    C_c: float
    alpha: float
    slope: float
    slope_smoothed: float
    last_flops: float
    last_loss: float
    window: int = 5

    kind: ClassVar[str] = "curve"
    _params: ClassVar[Tuple[str, ...]] = ("E", "C_c", "alpha")

    def loss(self, flops):
        C = np.asarray(flops, dtype=np.float64)
        return self.E + (self.C_c / C) ** self.alpha

    def slope_at(self, flops):
        """``d ln L / d ln C`` of the fitted curve."""
        C = np.asarray(flops, dtype=np.float64)
        p = (self.C_c / C) ** self.alpha
        return -self.alpha * p / (self.E + p)


_KINDS = {c.kind: c for c in (ChinchillaFit, KaplanNSFit, KaplanCFit, CurveFit)}


def law_from_json(text: Union[str, bytes, Mapping[str, Any], os.PathLike]) -> _Fit:
    """Any fit result from JSON (string, dict or file path), dispatched on its ``kind``."""
    data = _load_json(text)
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown fit kind {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind].from_dict(data)


# ================================================================================================
# fits
# ================================================================================================
def fit_chinchilla(n_params, tokens, loss, *, n_starts: int = 32, grid: Optional[np.ndarray] = None,
                   delta: float = HUBER_DELTA, n_boot: int = 0, seed: int = 0, level: float = 0.95,
                   groups=None) -> ChinchillaFit:
    """Fit ``L(N, D) = E + A/N**alpha + B/D**beta`` as Hoffmann et al. (approach 3).

    Args: ``n_params`` (P,), ``tokens`` (P,), ``loss`` (P,) positive finite arrays.
    ``grid``: (G, 5) starts as columns ``[a=log A, alpha, b=log B, beta, e=log E]``; default
    Hoffmann's 4500-point grid, of which the ``n_starts`` with the lowest objective are refined.
    ``n_boot > 0``: percentile intervals at ``level`` from resampled points (or whole ``groups``,
    e.g. run ids), each refit warm-started from the full-data estimate.
    """
    what = "Chinchilla fit"
    cov, y_lin = _check_points({"n_params": n_params, "tokens": tokens}, loss, 5, what)
    X = np.column_stack([np.log(cov["n_params"]), np.log(cov["tokens"])])
    y = np.log(y_lin)
    _check_decreasing(X, y, ["n_params", "tokens"], what)
    g = _hoffmann_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    theta, f = _fit_lse(X, y, True, g, n_starts=n_starts, delta=delta, what=what)
    _check_exponents(theta, ["n_params", "tokens"], 2, what)

    def to_params(t):
        return dict(E=math.exp(t[4]), A=math.exp(t[0]), alpha=float(t[1]), B=math.exp(t[2]), beta=float(t[3]))

    fit = ChinchillaFit(**to_params(theta), n_points=int(len(y)), objective=f)
    _attach_bootstrap(fit, X, y, True, g, theta, ["n_params", "tokens"], to_params, delta=delta, n_boot=n_boot,
                      seed=seed, level=level, groups=groups, what=what)
    return fit


def fit_kaplan_ns(n_params, steps, loss, *, tokens_per_step: float = 1.0, n_starts: int = 16,
                  delta: float = HUBER_DELTA, n_boot: int = 0, seed: int = 0, level: float = 0.95,
                  groups=None) -> KaplanNSFit:
    """Fit ``L(N, S) = (N_c/N)**alpha_N + (S_c/S)**alpha_S``.

    ``steps`` (P,) are in the unit of S (steps, or tokens with ``tokens_per_step=1``); the result
    keeps ``tokens_per_step`` so that ``loss(N, tokens)`` works for the planner.
    """
    what = "Kaplan L(N, S) fit"
    cov, y_lin = _check_points({"n_params": n_params, "steps": steps}, loss, 4, what)
    X = np.column_stack([np.log(cov["n_params"]), np.log(cov["steps"])])
    y = np.log(y_lin)
    _check_decreasing(X, y, ["n_params", "steps"], what)
    g = _power_grid(X, y, const=False)
    theta, f = _fit_lse(X, y, False, g, n_starts=n_starts, delta=delta, what=what)
    _check_exponents(theta, ["n_params", "steps"], 2, what)

    def to_params(t):
        return dict(N_c=math.exp(t[0] / t[1]), alpha_N=float(t[1]), S_c=math.exp(t[2] / t[3]),
                    alpha_S=float(t[3]))

    fit = KaplanNSFit(**to_params(theta), tokens_per_step=float(tokens_per_step), n_points=int(len(y)),
                      objective=f)
    _attach_bootstrap(fit, X, y, False, g, theta, ["n_params", "steps"], to_params, delta=delta, n_boot=n_boot,
                      seed=seed, level=level, groups=groups, what=what)
    return fit


def fit_kaplan_c(flops, loss, *, frontier: bool = False, n_starts: int = 8, delta: float = HUBER_DELTA,
                 n_boot: int = 0, seed: int = 0, level: float = 0.95, groups=None) -> KaplanCFit:
    """Fit ``L(C) = (C_c/C)**alpha_C`` to ``flops`` (P,), ``loss`` (P,).

    ``frontier=True`` first keeps only the compute-efficient frontier (:func:`pareto_frontier`) of
    points pooled from many runs, as Kaplan's ``L(C_min)``.
    """
    what = "Kaplan L(C) fit"
    cov, y_lin = _check_points({"flops": flops}, loss, 2, what)
    C = cov["flops"]
    if frontier:
        keep = pareto_frontier(C, y_lin)
        C, y_lin = C[keep], y_lin[keep]
        groups = None if groups is None else np.asarray(groups)[keep]
        cov, y_lin = _check_points({"flops": C}, y_lin, 2, what + " (frontier)")
        C = cov["flops"]
    X = np.log(C)[:, None]
    y = np.log(y_lin)
    _check_decreasing(X, y, ["compute"], what)
    g = _power_grid(X, y, const=False)
    theta, f = _fit_lse(X, y, False, g, n_starts=n_starts, delta=delta, what=what)
    _check_exponents(theta, ["compute"], 1, what)

    def to_params(t):
        return dict(C_c=math.exp(t[0] / t[1]), alpha_C=float(t[1]))

    fit = KaplanCFit(**to_params(theta), n_points=int(len(y)), objective=f)
    _attach_bootstrap(fit, X, y, False, g, theta, ["compute"], to_params, delta=delta, n_boot=n_boot, seed=seed,
                      level=level, groups=groups, what=what)
    return fit


def smoothed_slope(flops, loss, window: int = 5) -> float:
    """Staged training's slope ``d log10 L / d log10 C`` at the last point.

    Trailing running means (``window`` points) of log L and log C, first difference (stride 1) at
    the end; with fewer than ``window + 1`` points the window shrinks. Needs >= 2 points.
    """
    lc = np.log(_as_1d("flops", flops))
    ll = np.log(_as_1d("loss", loss))
    n = len(lc)
    if n < 2:
        raise ScalingFitError(f"smoothed slope: need at least 2 points, got {n}")
    w = max(1, min(int(window), n - 1))
    # first difference of trailing means == secant between points w apart
    dc = (lc[-1] - lc[-1 - w]) / w
    if not dc > 0:
        raise ScalingFitError("smoothed slope: compute does not increase over the last points")
    return float(((ll[-1] - ll[-1 - w]) / w) / dc)


def fit_curve(flops, loss, *, window: int = 5, n_starts: int = 8, delta: float = HUBER_DELTA,
              warm_start: Optional[CurveFit] = None) -> CurveFit:
    """Online single-run fit of ``L(C) = E + (C_c/C)**alpha`` and the slope at the last point.

    Args: ``flops`` (P,) cumulative training FLOPs (``6 N tokens``, increasing), ``loss`` (P,)
    validation loss. ``warm_start``: a previous :class:`CurveFit` of the same run, added as a start.
    Raises :class:`ScalingFitError` for < 4 points, NaN/inf, non-positive or non-increasing
    compute, or flat/rising loss.
    """
    what = "curve fit"
    cov, y_lin = _check_points({"flops": flops}, loss, 3, what)
    C = cov["flops"]
    if np.any(np.diff(C) <= 0):
        i = int(np.flatnonzero(np.diff(C) <= 0)[0])
        raise ScalingFitError(f"{what}: compute must be strictly increasing (flops[{i + 1}] <= flops[{i}])")
    X = np.log(C)[:, None]
    y = np.log(y_lin)
    _check_decreasing(X, y, ["compute"], what)
    g = _power_grid(X, y, const=True, alphas=(0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6))
    extra = []
    if warm_start is not None:
        extra.append(np.array([warm_start.alpha * math.log(warm_start.C_c), warm_start.alpha,
                               math.log(max(warm_start.E, 1e-12))]))
    theta, f = _fit_lse(X, y, True, g, n_starts=n_starts, delta=delta, extra_starts=extra, what=what)
    _check_exponents(theta, ["compute"], 1, what)
    E, alpha = math.exp(theta[2]), float(theta[1])
    C_c = math.exp(theta[0] / alpha)
    fit = CurveFit(E=E, C_c=C_c, alpha=alpha, slope=0.0, slope_smoothed=smoothed_slope(C, y_lin, window),
                   last_flops=float(C[-1]), last_loss=float(y_lin[-1]), n_points=int(len(y)),
                   window=int(window), objective=f)
    fit.slope = float(fit.slope_at(C[-1]))
    return fit


def pareto_frontier(flops, loss) -> np.ndarray:
    """Indices (sorted by compute) of points with lower loss than every point using less compute."""
    C = _as_1d("flops", flops)
    L = _as_1d("loss", loss)
    order = np.argsort(C, kind="stable")
    keep, best = [], np.inf
    for i in order:
        if L[i] < best:
            keep.append(i)
            best = L[i]
    return np.array(keep, dtype=np.int64)


# ================================================================================================
# metrics logs
# ================================================================================================
REQUIRED_KEYS = ("step", "tokens", "flops", "n_params", "val_loss")


@dataclass
class Observations:
    """Validation points pooled from runs; all arrays have shape (P,).

    ``run`` holds a label per point: the log file's stem (plus ``@n_params`` when a file changes
    model size, i.e. a grown run).
    """

    step: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    n_params: np.ndarray
    loss: np.ndarray
    run: np.ndarray

    def __len__(self) -> int:
        return int(self.loss.size)

    def subset(self, mask) -> "Observations":
        return Observations(*(getattr(self, f.name)[mask] for f in fields(self)))

    def runs(self) -> List[str]:
        return list(dict.fromkeys(self.run.tolist()))

    def last_per_run(self) -> "Observations":
        """The last (largest-token) point of every run: Chinchilla's 'final loss' points."""
        idx = [int(np.flatnonzero(self.run == r)[np.argmax(self.tokens[self.run == r])]) for r in self.runs()]
        return self.subset(np.array(idx, dtype=np.int64))

    def fit(self, form: str = "chinchilla", **kw) -> _Fit:
        """Fit ``form`` in {'chinchilla', 'kaplan_ns', 'kaplan_c'}; bootstrap groups default to runs."""
        if form == "chinchilla":
            return fit_chinchilla(self.n_params, self.tokens, self.loss, **kw)
        if form == "kaplan_ns":
            return fit_kaplan_ns(self.n_params, self.tokens, self.loss, **kw)
        if form == "kaplan_c":
            return fit_kaplan_c(self.flops, self.loss, **kw)
        raise ValueError(f"unknown form {form!r}; use 'chinchilla', 'kaplan_ns' or 'kaplan_c'")


def _expand_paths(paths: Union[PathLike, Iterable[PathLike]]) -> List[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise ScalingFitError(f"{p}: directory holds no *.jsonl metrics logs")
            out += found
        else:
            out.append(p)
    return out


def load_metrics(paths: Union[PathLike, Iterable[PathLike]], *, include_grown: bool = False,
                 last_only: bool = False, min_tokens: float = 0.0) -> Observations:
    """Read validation points from JSON-lines metrics logs (one run per file; directories -> *.jsonl).

    Each line is a JSON object; lines without ``val_loss`` (e.g. train-only steps) are skipped, the
    rest must carry ``step, tokens, flops, n_params, val_loss``. A truncated last line (a log being
    written) is skipped; any other malformed line raises :class:`ScalingFitError` naming file:line.
    ``include_grown=False`` drops points after a file's ``n_params`` first changes (they lie on a
    grown model's curve, not a from-scratch one). ``last_only`` keeps each run's final point;
    ``min_tokens`` drops earlier points (e.g. warmup).
    """
    cols: Dict[str, list] = {k: [] for k in ("step", "tokens", "flops", "n_params", "loss", "run")}
    for path in _expand_paths(paths):
        if not path.exists():
            raise ScalingFitError(f"{path}: no such metrics log")
        lines = path.read_text().splitlines()
        sizes: List[float] = []
        for ln, line in enumerate(lines, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as exc:
                if ln == len(lines):
                    continue  # truncated last line of a live log
                raise ScalingFitError(f"{path}:{ln}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or rec.get("val_loss") is None:
                continue
            missing = [k for k in REQUIRED_KEYS if rec.get(k) is None]
            if missing:
                raise ScalingFitError(f"{path}:{ln}: record with val_loss lacks {missing}")
            n = float(rec["n_params"])
            if sizes and n != sizes[-1]:
                if not include_grown:
                    break
            if not sizes or n != sizes[-1]:
                sizes.append(n)
            if float(rec["tokens"]) < min_tokens:
                continue
            for k in ("step", "tokens", "flops", "n_params"):
                cols[k].append(float(rec[k]))
            cols["loss"].append(float(rec["val_loss"]))
            label = str(rec.get("run", path.stem))
            cols["run"].append(label if len(sizes) == 1 else f"{label}@{int(n)}")
    if not cols["loss"]:
        raise ScalingFitError(f"no records with val_loss in {[str(p) for p in _expand_paths(paths)]}")
    obs = Observations(*(np.asarray(cols[k], dtype=np.float64) for k in ("step", "tokens", "flops",
                                                                          "n_params", "loss")),
                       run=np.asarray(cols["run"], dtype=object))
    return obs.last_per_run() if last_only else obs


def fit_from_logs(paths: Union[PathLike, Iterable[PathLike]], form: str = "chinchilla", *,
                  last_only: bool = False, min_tokens: float = 0.0, by_run_bootstrap: bool = True,
                  **fit_kw) -> _Fit:
    """Load logs (:func:`load_metrics`) and fit ``form``; bootstrap resamples whole runs by default."""
    obs = load_metrics(paths, last_only=last_only, min_tokens=min_tokens)
    if fit_kw.get("n_boot", 0) and by_run_bootstrap and "groups" not in fit_kw and len(obs.runs()) > 1:
        fit_kw["groups"] = obs.run
    return obs.fit(form, **fit_kw)

"""Scaling-law fits: recovery of known laws, bootstrap coverage, degenerate input, JSON, log loading."""
import json
import math

import numpy as np
import pytest

pytest.importorskip("scipy")

from growth_ds.schedule.scaling_law import (ChinchillaFit, CurveFit, KaplanCFit, KaplanNSFit, ScalingFitError,
                                            fit_chinchilla, fit_curve, fit_from_logs, fit_kaplan_c, fit_kaplan_ns,
                                            law_from_json, load_metrics, pareto_frontier, smoothed_slope)

# Hoffmann et al. (2022) approach-3 constants
CHIN = dict(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)
# Kaplan et al. (2020): N_c, alpha_N; S_c = 2 * 2.1e3 (eq 1.6's 2 S_c absorbed), alpha_S
KAP_NS = dict(N_c=8.8e13, alpha_N=0.076, S_c=4.2e3, alpha_S=0.76)
KAP_C = dict(C_c=2.3e8 * 8.64e19, alpha_C=0.05)  # 2.3e8 PF-days in FLOPs


def chin_loss(N, D):
    return CHIN["E"] + CHIN["A"] / N ** CHIN["alpha"] + CHIN["B"] / D ** CHIN["beta"]


def covers(fit, truth):
    return {k: fit.ci[k][0] <= v <= fit.ci[k][1] for k, v in truth.items()}


# ---- recovery + bootstrap coverage ---------------------------------------------------------------
def test_chinchilla_recovers_known_law_and_ci_covers_truth():
    # 6 sizes x 8 token counts, 0.3% multiplicative noise. Over seeds 0..15, 14/16 runs had all five
    # 95% intervals covering the truth (per-parameter ~96%); seed 1 is one of them.
    rng = np.random.default_rng(1)
    N = np.repeat(np.geomspace(1e7, 3e9, 6), 8)
    D = np.tile(np.geomspace(1e8, 1e11, 8), 6)
    L = chin_loss(N, D) * np.exp(rng.normal(0.0, 0.003, N.size))
    fit = fit_chinchilla(N, D, L, n_starts=16, n_boot=100, seed=1)
    assert fit.n_points == 48 and fit.n_boot == 100 and fit.ci_level == 0.95
    assert abs(fit.alpha - CHIN["alpha"]) < 0.015
    assert abs(fit.beta - CHIN["beta"]) < 0.006
    assert abs(fit.E / CHIN["E"] - 1) < 0.02
    assert abs(math.log(fit.A / CHIN["A"])) < 0.15
    assert abs(math.log(fit.B / CHIN["B"])) < 0.15
    assert all(covers(fit, CHIN).values()), (fit.ci, CHIN)
    for k, (lo, hi) in fit.ci.items():
        assert lo <= fit.params()[k] <= hi
    # predictions on a held-out point are accurate
    assert abs(fit.loss(5e8, 3e10) / chin_loss(5e8, 3e10) - 1) < 0.005


def test_kaplan_ns_recovers_known_law_and_ci_covers_truth():
    rng = np.random.default_rng(3)
    N = np.repeat(np.geomspace(1e6, 1e9, 6), 10)
    S = np.tile(np.geomspace(2e3, 1e5, 10), 6)
    L = ((KAP_NS["N_c"] / N) ** KAP_NS["alpha_N"] + (KAP_NS["S_c"] / S) ** KAP_NS["alpha_S"]) \
        * np.exp(rng.normal(0.0, 0.003, N.size))
    fit = fit_kaplan_ns(N, S, L, tokens_per_step=2 ** 19, n_boot=60, seed=0)
    assert abs(fit.alpha_N - KAP_NS["alpha_N"]) < 0.002
    assert abs(fit.alpha_S - KAP_NS["alpha_S"]) < 0.02
    assert abs(math.log(fit.N_c / KAP_NS["N_c"])) < 0.2
    assert abs(math.log(fit.S_c / KAP_NS["S_c"])) < 0.05
    assert all(covers(fit, KAP_NS).values()), (fit.ci, KAP_NS)
    # the planner-facing interface works in tokens
    assert fit.loss(1e8, 1e4 * 2 ** 19) == pytest.approx(fit.loss_at_steps(1e8, 1e4))
    l = float(fit.loss(1e8, 3e9))
    assert fit.tokens_for_loss(1e8, l) == pytest.approx(3e9, rel=1e-9)


def test_kaplan_c_recovers_known_law_and_ci_covers_truth():
    rng = np.random.default_rng(4)
    C = np.geomspace(1e17, 1e21, 40)
    L = (KAP_C["C_c"] / C) ** KAP_C["alpha_C"] * np.exp(rng.normal(0.0, 0.003, C.size))
    fit = fit_kaplan_c(C, L, n_boot=100, seed=0)
    assert abs(fit.alpha_C - KAP_C["alpha_C"]) < 0.002
    assert abs(math.log(fit.C_c / KAP_C["C_c"])) < 0.5
    assert all(covers(fit, KAP_C).values()), (fit.ci, KAP_C)


def test_kaplan_c_frontier_from_pooled_runs():
    # three runs' curves; the pareto frontier is the lower envelope
    C = np.geomspace(1e15, 1e19, 30)
    curves = [(C, 2.0 + (1e17 * k / C) ** 0.3) for k in (1, 3, 9)]
    allC = np.concatenate([c for c, _ in curves])
    allL = np.concatenate([l for _, l in curves])
    keep = pareto_frontier(allC, allL)
    assert np.all(np.diff(allC[keep]) >= 0) and np.all(np.diff(allL[keep]) < 0)
    fit = fit_kaplan_c(allC, allL, frontier=True)
    assert fit.n_points == len(keep) and fit.alpha_C > 0


def test_fit_curve_single_run_recovers_curve_and_slope():
    law = ChinchillaFit(**CHIN)
    n = 1e8
    rng = np.random.default_rng(0)
    D = np.geomspace(1e8, 4e9, 60)
    C = 6 * n * D
    L = law.loss(n, D) * np.exp(rng.normal(0.0, 0.002, D.size))
    fit = fit_curve(C, L)
    # under Chinchilla a fixed-N curve is E' + (C_c/C)^beta with E' = E + A/N^alpha, C_c = 6 N B^(1/beta)
    assert fit.E == pytest.approx(float(law.min_loss(n)), rel=0.02)
    assert fit.alpha == pytest.approx(CHIN["beta"], abs=0.02)
    true_slope = D[-1] * law.dloss_dtokens(n, D[-1]) / law.loss(n, D[-1])
    assert fit.slope == pytest.approx(true_slope, abs=0.003)
    assert fit.last_flops == C[-1] and fit.n_points == 60
    # warm start reproduces the fit
    again = fit_curve(C, L, warm_start=fit, n_starts=0)
    assert again.slope == pytest.approx(fit.slope, abs=1e-6)


def test_smoothed_slope_is_exact_on_a_power_law():
    C = np.geomspace(1e15, 1e18, 20)
    assert smoothed_slope(C, (1e20 / C) ** 0.05) == pytest.approx(-0.05, rel=1e-10)
    fit = fit_curve(C, (1e20 / C) ** 0.05)  # E -> 0 is allowed
    assert fit.slope_smoothed == pytest.approx(-0.05, rel=1e-10)
    assert fit.slope == pytest.approx(-0.05, abs=1e-4)


# ---- degenerate input ------------------------------------------------------------------------------
C10 = np.geomspace(1e15, 1e18, 10)


@pytest.mark.parametrize("flops, loss, match", [
    (C10[:3], [3.0, 2.9, 2.8], "too few points"),
    (C10, np.full(10, 2.5), "flat"),
    (C10, np.linspace(2.0, 3.0, 10), "does not decrease"),
    (C10, np.r_[np.nan, np.linspace(3.0, 2.0, 9)], "non-finite"),
    (C10, np.r_[np.inf, np.linspace(3.0, 2.0, 9)], "non-finite"),
    (np.r_[0.0, C10[1:]], np.linspace(3.0, 2.0, 10), "non-positive value.*compute"),
    (np.r_[C10[:5], C10[3:8]], np.linspace(3.0, 2.0, 10), "strictly increasing"),
    (C10, np.r_[np.linspace(3.0, 2.0, 9), -1.0], "non-positive value.*loss"),
])
def test_fit_curve_degenerate_raises(flops, loss, match):
    with pytest.raises(ScalingFitError, match=match):
        fit_curve(flops, loss)


def test_other_fits_degenerate_raise():
    N = np.repeat([1e7, 1e8, 1e9], 3)
    D = np.tile([1e9, 1e10, 1e11], 3)
    with pytest.raises(ScalingFitError, match="too few points"):
        fit_chinchilla(N[:5], D[:5], chin_loss(N[:5], D[:5]))
    with pytest.raises(ScalingFitError, match="distinct n_params"):
        fit_chinchilla(np.full(9, 1e8), D, chin_loss(1e8, D))
    with pytest.raises(ScalingFitError, match="does not decrease with tokens"):
        fit_chinchilla(N, D, 1.0 + 0.1 * np.log(D) - 0.01 * np.log(N))
    with pytest.raises(ScalingFitError, match="non-finite"):
        fit_kaplan_ns(N, D, np.r_[chin_loss(N, D)[:-1], np.nan])
    with pytest.raises(ScalingFitError, match="flat"):
        fit_kaplan_c(C10, np.full(10, 3.0))
    with pytest.raises(ScalingFitError, match="loss has"):
        fit_kaplan_c(C10, np.ones(9))


# ---- JSON ----------------------------------------------------------------------------------------------
def test_json_round_trip_all_kinds(tmp_path):
    fits = [
        ChinchillaFit(**CHIN, n_points=10, objective=1e-3, ci={"E": [1.6, 1.8]}, ci_level=0.95, n_boot=5),
        KaplanNSFit(**KAP_NS, tokens_per_step=1024.0),
        KaplanCFit(**KAP_C),
        CurveFit(E=2.0, C_c=1e18, alpha=0.3, slope=-0.05, slope_smoothed=-0.051, last_flops=1e18, last_loss=3.0),
    ]
    for f in fits:
        text = f.to_json()
        json.loads(text)  # strict JSON
        assert type(f).from_json(text) == f
        assert law_from_json(text) == f
        assert law_from_json(json.loads(text)) == f
        p = tmp_path / f"{f.kind}.json"
        p.write_text(f.to_json(indent=2))
        assert law_from_json(str(p)) == f
    with pytest.raises(ValueError, match="expected a 'chinchilla'"):
        ChinchillaFit.from_json(fits[2].to_json())


# ---- metrics logs -------------------------------------------------------------------------------------
def _write_run(path, n, tokens, every=3, tokens_per_step=1e6, extra=()):
    lines = []
    for i, t in enumerate(tokens):
        rec = dict(step=int(t / tokens_per_step), tokens=float(t), flops=6.0 * n * t, n_params=n,
                   train_loss=float(chin_loss(n, t)) + 0.05)
        if i % every == every - 1:
            rec["val_loss"] = float(chin_loss(n, t))
        lines.append(json.dumps(rec))
    lines += list(extra)
    path.write_text("\n".join(lines) + "\n")


def test_load_metrics_and_fit_from_logs(tmp_path):
    sizes = [2e7, 6e7, 2e8, 6e8, 2e9]
    for k, n in enumerate(sizes):
        _write_run(tmp_path / f"run{k}.jsonl", int(n), np.geomspace(1e8, 1e11, 24))
    obs = load_metrics(tmp_path)
    assert len(obs) == 5 * 8 and set(obs.runs()) == {f"run{k}" for k in range(5)}
    assert np.allclose(obs.flops, 6 * obs.n_params * obs.tokens)
    assert np.allclose(obs.loss, chin_loss(obs.n_params, obs.tokens))
    last = load_metrics(sorted(tmp_path.glob("*.jsonl")), last_only=True)
    assert len(last) == 5 and np.all(last.tokens == last.tokens.max())
    fit = fit_from_logs(tmp_path, "chinchilla", n_starts=8)
    assert fit.alpha == pytest.approx(CHIN["alpha"], abs=1e-3)
    assert fit.beta == pytest.approx(CHIN["beta"], abs=1e-3)
    assert fit.E == pytest.approx(CHIN["E"], rel=1e-3)
    assert isinstance(fit_from_logs(tmp_path, "kaplan_c"), KaplanCFit)


def test_load_metrics_grown_runs_truncation_and_errors(tmp_path):
    p = tmp_path / "grown.jsonl"
    _write_run(p, 1000, np.geomspace(1e6, 1e8, 9), every=1)
    with open(p, "a") as f:
        f.write(json.dumps(dict(step=200, tokens=2e8, flops=1.0, n_params=4000, val_loss=2.5)) + "\n")
        f.write('{"step": 201, "tokens": 2.1e8, "val_lo')  # truncated last line of a live log
    assert len(load_metrics(p)) == 9                        # grown segment dropped by default
    both = load_metrics(p, include_grown=True)
    assert len(both) == 10 and both.run[-1] == "grown@4000"
    assert len(load_metrics(p, min_tokens=1e7)) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "tokens": 1, "flops": 6, "val_loss": 3.0}\n{"step": 2}\n')
    with pytest.raises(ScalingFitError, match=r"bad.jsonl:1: .*lacks \['n_params'\]"):
        load_metrics(bad)
    bad.write_text('not json\n{"step": 2}\n')
    with pytest.raises(ScalingFitError, match="bad.jsonl:1: not valid JSON"):
        load_metrics(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 1, "tokens": 1, "flops": 6, "n_params": 1, "train_loss": 3.0}\n')
    with pytest.raises(ScalingFitError, match="no records with val_loss"):
        load_metrics(empty)

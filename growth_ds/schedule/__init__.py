"""Staged scheduler: scaling-law fits choose when to grow and to what.

* :mod:`~growth_ds.schedule.scaling_law` -- Chinchilla / Kaplan fits (Huber + L-BFGS, bootstrap CIs),
  metrics-log loaders, the online single-run :func:`fit_curve`.
* :mod:`~growth_ds.schedule.stages` -- :func:`plan_stages`, :func:`calibrate_rho`, :class:`GrowthTrigger`.
* :mod:`~growth_ds.schedule.plot` -- :func:`plot_fit`, :func:`format_stage_table` (matplotlib lazily).

scipy is needed for fitting and planning and is imported lazily.
"""
from growth_ds.schedule.plot import format_stage_table, plot_fit
from growth_ds.schedule.scaling_law import (HUBER_DELTA, ChinchillaFit, CurveFit, KaplanCFit, KaplanNSFit,
                                            Observations, ScalingFitError, fit_chinchilla, fit_curve,
                                            fit_from_logs, fit_kaplan_c, fit_kaplan_ns, law_from_json,
                                            load_metrics, pareto_frontier, smoothed_slope)
from growth_ds.schedule.stages import (STAGED_RHO_OP, STAGED_THRESHOLDS, GrowthDecision, GrowthTrigger,
                                       RhoCalibration, Stage, StagePlan, SwitchPoint, calibrate_rho,
                                       growth_threshold, optimal_switch, plan_stages)

__all__ = [
    "HUBER_DELTA", "ChinchillaFit", "CurveFit", "KaplanCFit", "KaplanNSFit", "Observations", "ScalingFitError",
    "fit_chinchilla", "fit_curve", "fit_from_logs", "fit_kaplan_c", "fit_kaplan_ns", "law_from_json",
    "load_metrics", "pareto_frontier", "smoothed_slope",
    "STAGED_RHO_OP", "STAGED_THRESHOLDS", "GrowthDecision", "GrowthTrigger", "RhoCalibration", "Stage",
    "StagePlan", "SwitchPoint", "calibrate_rho", "growth_threshold", "optimal_switch", "plan_stages",
    "format_stage_table", "plot_fit",
]

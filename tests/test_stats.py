"""The saving study's statistics on synthetic inputs with known answers."""
import math

import pytest

from growth_ds.train.stats import flops_to_match, paired_summary, saving_percent


def test_paired_summary_known_values():
    # mean 2, sample std 1 (values 1, 2, 3), se = 1/sqrt(3); t_{0.95, 2} = 2.919986
    s = paired_summary([1.0, 2.0, 3.0])
    assert s.n == 3 and s.mean == pytest.approx(2.0) and s.std == pytest.approx(1.0)
    half = 2.919986 / math.sqrt(3)
    assert s.lo == pytest.approx(2 - half, rel=1e-5) and s.hi == pytest.approx(2 + half, rel=1e-5)
    # one-sided p of t = 2 / (1/sqrt 3) = 3.4641 with 2 dof: 0.037037
    assert s.p == pytest.approx(0.0370, abs=2e-4)


def test_paired_summary_direction_and_level():
    assert paired_summary([-1.0, -2.0, -3.0]).p > 0.95          # evidence against "mean > 0"
    wide, narrow = paired_summary([1, 2, 3, 4], level=0.99), paired_summary([1, 2, 3, 4], level=0.5)
    assert wide.lo < narrow.lo < 2.5 < narrow.hi < wide.hi
    assert paired_summary([5.0, 5.0]).p == 0.0                  # no spread: certain
    assert paired_summary([3.0, 4.0], null=10.0).p > 0.9        # the null is shifted
    with pytest.raises(ValueError, match="at least 2"):
        paired_summary([1.0])


def test_flops_to_match_interpolates_in_log_flops():
    budgets, losses = [1e12, 2e12, 4e12], [4.0, 3.8, 3.6]
    f, extra = flops_to_match(budgets, losses, 3.9)
    assert not extra and f == pytest.approx(math.sqrt(2) * 1e12)  # half-way in log between 1 and 2
    f, extra = flops_to_match(budgets, losses, 3.8)
    assert f == pytest.approx(2e12)
    f, extra = flops_to_match(budgets, losses, 4.1)                # below the smallest budget
    assert extra and f == pytest.approx(1e12 / math.sqrt(2))
    f, extra = flops_to_match(budgets, losses, 3.5)                # beyond the largest
    assert extra and f == pytest.approx(4e12 * math.sqrt(2))
    assert flops_to_match([1e12, 2e12], [3.0, 3.1], 2.5) == (None, False)  # losses rise: no answer
    assert saving_percent(1e12, 0.7e12) == pytest.approx(30.0) and saving_percent(1e12, None) is None


def test_report_over_paired_seeds(tmp_path, capsys):
    """`growth-ds report R1 R2 R3`: per-seed gaps and crossings from the runs' logs, then their statistics."""
    import json

    from growth_ds.cli import main

    def write(d, curve):
        d.mkdir(parents=True)
        with open(d / "metrics.jsonl", "w") as f:
            for i, (flops, loss) in enumerate(curve):
                f.write(json.dumps({"event": "step", "step": i + 1, "flops": flops, "tokens": i, "val_loss": loss}) + "\n")

    roots = []
    for k, end in enumerate([3.9, 3.8, 3.85]):  # staged ends 0.1, 0.2, 0.15 below scratch's 4.0
        root = tmp_path / f"seed{k}"
        write(root / "scratch", [(1e12, 5.0), (2e12, 4.0)])
        write(root / "staged", [(1e12, 4.5), (2e12, end)])
        roots.append(str(root))
    assert main(["report", *roots, "--png", str(tmp_path / "all.png")]) == 0
    out = capsys.readouterr().out
    assert "+0.1500" in out and "n=3" in out and (tmp_path / "all.png").stat().st_size > 1000
    from growth_ds.train.report import report_many

    res, _ = report_many(roots, str(tmp_path / "b.png"))
    assert res["gap"]["mean"] == pytest.approx(0.15) and res["gap"]["p"] < 0.05
    # crossing: 4.0 is reached between 1e12 (4.5) and 2e12 (end) in log FLOPs
    for row, end in zip(res["per_seed"], [3.9, 3.8, 3.85]):
        frac = (4.5 - 4.0) / (4.5 - end)
        assert row["saving"] == pytest.approx(100 * (1 - 2 ** frac / 2))
    with pytest.raises(ValueError, match="2 or more"):
        report_many(roots[:1])


def test_report_end_of_run_saving_from_shorter_staged_runs(tmp_path, capsys):
    """RUN_ROOT/staged-short*/ are the staged arm at smaller budgets: the report interpolates their end
    losses (and the full run's) in log FLOPs to the scratch run's end loss."""
    import json

    from growth_ds.train.report import report

    def write(d, curve):
        d.mkdir(parents=True)
        d.joinpath("metrics.jsonl").write_text("".join(json.dumps({"event": "step", "step": i + 1, "flops": f,
                                                                   "tokens": i, "val_loss": v}) + "\n"
                                                       for i, (f, v) in enumerate(curve)))

    write(tmp_path / "scratch", [(1e12, 5.0), (4e12, 4.0)])
    write(tmp_path / "staged", [(1e12, 4.6), (4e12, 3.8)])
    write(tmp_path / "staged-short", [(1e12, 4.7), (2e12, 4.1)])
    res, lines = report(tmp_path)
    # 4.0 lies between 4.1 at 2e12 and 3.8 at 4e12: a third of the way in log FLOPs -> 2e12 * 2**(1/3)
    assert res["flops_staged_end"] == pytest.approx(2e12 * 2 ** (1 / 3)) and not res["extrapolated"]
    assert res["saving_end_percent"] == pytest.approx(100 * (1 - 2 ** (1 / 3) / 2))
    assert any("interpolated between" in line for line in lines)

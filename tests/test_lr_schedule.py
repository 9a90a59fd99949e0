"""LR schedules: WSD's phases, and the growth policies' re-planning to the run's last step."""
import pytest

from growth_ds.ops import LRPolicy, LRSchedule


def wsd(**kw):
    return LRSchedule(**{**dict(peak_lr=1e-3, warmup_steps=10, total_steps=100, min_lr_ratio=0.0, kind="wsd",
                                decay_steps=20), **kw})


def test_wsd_phase_boundaries():
    s = wsd()
    assert s.lr(0) == pytest.approx(1e-4)            # warmup: (t + 1) / warmup
    assert s.lr(9) == pytest.approx(1e-3)            # last warmup step reaches the peak
    assert s.lr(10) == s.lr(50) == s.lr(79) == 1e-3  # stable phase: [warmup, total - decay)
    assert s.decay_start == 80
    assert s.lr(80) == pytest.approx(1e-3)           # decay starts at the peak
    assert s.lr(90) == pytest.approx(0.5e-3)         # linear: half-way
    assert s.lr(99) == pytest.approx(1e-3 * 1 / 20)  # last step: one step before the floor
    assert s.lr(100) == pytest.approx(0.0)           # the floor
    f = wsd(min_lr_ratio=0.1)
    assert f.lr(100) == pytest.approx(1e-4) and f.lr(90) == pytest.approx(1e-4 + 0.5 * 9e-4)
    q = wsd(decay_shape="1-sqrt")
    assert q.lr(85) == pytest.approx(1e-3 * (1 - 0.5))  # sqrt(5/20) = 0.5
    with pytest.raises(ValueError, match="schedule"):
        wsd(kind="linear")


def test_cosine_unchanged():
    s = LRSchedule(1e-3, 10, 110, 0.1)
    assert s.lr(10) == pytest.approx(1e-3) and s.lr(60) == pytest.approx(0.55e-3) and s.lr(110) == pytest.approx(1e-4)


@pytest.mark.parametrize("kind", ["continue", "rewarm", "lemon", "restart"])
@pytest.mark.parametrize("sched", ["cosine", "wsd"])
def test_policies_end_at_the_runs_last_step(kind, sched):
    """Whatever the policy, after a growth at step 300 of a run whose last step is 1000 (the run was
    lengthened: equal FLOPs), the schedule is at its end exactly at the run's last step, with the new peak."""
    s = LRSchedule(1e-3, 20, 900, 0.0, kind=sched, decay_steps=180 if sched == "wsd" else 0)
    new, t = LRPolicy(kind, rho=1.5, rewarm_steps=30).apply(s, 300, steps_left=700, peak_lr=5e-4)
    assert new.total_steps - t == 700
    assert new.lr(t + 700) == pytest.approx(0.0, abs=1e-12)
    assert new.lr(t + 699) > 0
    top = max(new.lr(u) for u in range(t, t + 700))
    if sched == "wsd" or kind in ("lemon", "restart"):
        assert top == pytest.approx(5e-4)
    else:  # a cosine continued (or rewound) part-way down stays below its new peak
        assert top < 5e-4
    if sched == "wsd":
        assert new.decay_start == t + 700 - 180  # the decay is the run's final 180 steps
        if kind == "continue":
            assert new.lr(t) == pytest.approx(5e-4)  # growth in the stable phase meets the new peak


def test_rewarm_ramp():
    s = LRSchedule(1e-3, 10, 1000, 0.1)
    new, t = LRPolicy("rewarm", rho=2.0, rewarm_steps=50).apply(s, 400)
    assert t == 200 and new.total_steps == 800  # 600 steps left, as before the growth
    assert new.lr(200) == pytest.approx(new.base(250) / 50) and new.lr(249) == pytest.approx(new.base(250))


def test_config_schedule_keys_and_flops_budget(tmp_path):
    """Config: schedule keys are validated; under ``budget: flops`` a growth may come after
    ``train.total_steps`` (the small stage is cheaper per step) but not once the small stages have spent the
    whole budget."""
    import yaml

    from dist_utils import staged_config
    from growth_ds.train.config import parse_config

    raw = yaml.safe_load(staged_config(tmp_path, "c", total=20, grow_at=10).read_text())

    def cfg(**train):
        r = yaml.safe_load(yaml.safe_dump(raw))
        r["train"].update(train)
        return r

    for bad, match in ((dict(schedule="linear"), "train.schedule"), (dict(decay_fraction=0.0), "decay_fraction"),
                       (dict(eval_tokens=0), "eval_tokens"), (dict(mup="yes"), "train.mup")):
        with pytest.raises(ValueError, match=match):
            parse_config(cfg(**bad))
    r = cfg(budget="flops")
    r["stages"][0]["until"] = {"steps": 30}  # after total_steps, but the tiny stage costs < 1/3 of the large
    c = parse_config(r)
    assert c.total_steps(1) > 30 and c.stage_lr(0) == c.stage_lr(1) == 3e-3
    r["stages"][0]["until"] = {"steps": 500}
    with pytest.raises(ValueError, match="spend"):
        parse_config(r)
    r["stages"][0]["until"] = {"steps": 10}
    r["stages"][1]["lr"] = 1e-3
    assert parse_config(r).stage_lr(1) == 1e-3 and parse_config(r).scratch().stage_lr(0) == 1e-3
    r["stages"][1]["lr"] = -1
    with pytest.raises(ValueError, match=r"stages\[1\].lr"):
        parse_config(r)

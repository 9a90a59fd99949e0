"""What the saving study needs from the trainer, seen in the optimizer: WSD with growth in its stable phase,
per-stage peak LRs, μP's hidden-matrix groups, schedules re-planned to end at the run's last step, the
re-initialised control arm, and the size of the fixed validation set."""
import pytest

from dist_utils import launch, staged_config
from growth_ds.train.metrics import read_metrics

pytestmark = pytest.mark.slow
GROW_AT, TOTAL = 10, 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shared") / "data"


def run(tmp_path, data_dir, name, stage_lrs=(None, None), grow=None, nproc=1, **train):
    import yaml

    path = staged_config(tmp_path, name, total=TOTAL, grow_at=GROW_AT, data_dir=data_dir, zero=1, width="zero",
                         **train)
    cfg = yaml.safe_load(path.read_text())
    for st, lr in zip(cfg["stages"], stage_lrs):
        if lr is not None:
            st["lr"] = lr
    cfg["stages"][1]["grow"].update(grow or {})
    path.write_text(yaml.safe_dump(cfg))
    res = launch(["train", path, "--no-progress"], nproc=nproc)
    assert res.returncode == 0, res.stderr[-4000:]
    recs = read_metrics(tmp_path / name / "staged" / "metrics.jsonl")
    return {r["step"]: r for r in recs if r.get("event") == "step"}, [r for r in recs if r.get("event") == "growth"]


def test_wsd_per_stage_lr_and_mup_groups(tmp_path, data_dir):
    """Stage 0 at 4e-3, stage 1 at 2e-3; WSD decays the last 25% of the run whatever the stages; with mup
    the hidden matrices' group runs at d_small/d_large = 1/2 of the schedule after the x2 width growth."""
    steps, growth = run(tmp_path, data_dir, "wsd", stage_lrs=(4e-3, 2e-3), schedule="wsd", decay_fraction=0.25,
                        min_lr_ratio=0.0, warmup_steps=4, mup=True)
    assert len(growth) == 1 and abs(growth[0]["val_loss_after"] - growth[0]["val_loss_before"]) < 1e-4
    assert sorted(steps) == list(range(1, TOTAL + 1))
    for s in range(5, GROW_AT + 1):  # stable phase of stage 0: its peak, hidden group at scale 1
        assert steps[s]["lr"] == pytest.approx(4e-3)
        assert steps[s]["lr_groups"] == pytest.approx([4e-3, 4e-3, 4e-3])
    decay_start = TOTAL - round(0.25 * TOTAL)
    for s in range(GROW_AT + 1, decay_start + 1):  # stable phase of stage 1: its peak; hidden x 1/2
        assert steps[s]["lr"] == pytest.approx(2e-3), s
        assert steps[s]["lr_groups"] == pytest.approx([1e-3, 2e-3, 2e-3]), s
    lrs = [steps[s]["lr"] for s in range(decay_start + 1, TOTAL + 1)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(2e-3 / 6)  # last step before 0
    assert steps[TOTAL]["train_loss"] < steps[1]["train_loss"] - 0.1


@pytest.mark.parametrize("policy", ["rewarm", "restart", "lemon"])
def test_policies_end_at_the_last_step(tmp_path, data_dir, policy):
    """``budget: flops`` lengthens the run past train.total_steps; every policy's schedule reaches its floor
    at the run's (re-planned) last step, not at train.total_steps."""
    grow = {"lr": policy, **({"rho": 2.0, "rewarm_steps": 3} if policy == "rewarm" else {})}
    steps, _ = run(tmp_path, data_dir, policy, grow=grow, budget="flops", min_lr_ratio=0.0)
    last = max(steps)
    assert last > TOTAL  # equal FLOPs: the small stage was cheaper
    tail = [steps[s]["lr"] for s in range(last - 4, last + 1)]
    assert all(a > b for a, b in zip(tail, tail[1:]))
    assert tail[-1] < 0.02 * max(r["lr"] for r in steps.values())  # one step before the floor (0)


def test_reinit_control_and_eval_tokens(tmp_path, data_dir):
    """``grow.reinit``: the grown shape restarts from a random init (the loss jumps back up), same FLOPs; the
    validation set is ``eval_tokens`` rounded up to micro-batches, whatever the world size."""
    steps, growth = run(tmp_path, data_dir, "reinit", grow={"reinit": True}, eval_tokens=300, nproc=2)
    import math

    assert growth[0]["val_loss_after"] > growth[0]["val_loss_before"] + 0.3
    assert abs(growth[0]["val_loss_after"] - math.log(512)) < 0.2  # a random init's loss: ln(vocab)
    evals = [r for r in steps.values() if "val_loss" in r]
    assert evals and all(r["val_tokens"] == 3 * 4 * 32 for r in evals)  # ceil(300 / (4 x 32)) = 3 batches


def test_auto_trigger_on_the_train_loss_signal_resumes_exactly(tmp_path, data_dir):
    """``until: {auto: {signal: train, every: 3}}``: the trigger is fed the mean train loss of every 3 steps
    (points at steps 3, 6, 9, ...), fits from its 4th point and fires from its own fit (not the cap); a run
    killed between two points (a partly filled buffer) and resumed takes the same decisions and losses."""
    import json

    import yaml

    def cfg(name):
        path = staged_config(tmp_path, name, total=TOTAL, grow_at=GROW_AT, data_dir=data_dir, zero=1, width="zero",
                             save_every=4, schedule="wsd")
        raw = yaml.safe_load(path.read_text())
        raw["stages"][0]["until"] = {"auto": {"threshold": -10.0, "signal": "train", "every": 3, "min_points": 4,
                                              "max_tokens": 10 ** 9}}
        path.write_text(yaml.safe_dump(raw))
        return path

    def records(name):
        return read_metrics(tmp_path / name / "staged" / "metrics.jsonl")

    ref = cfg("auto_ref")
    assert launch(["train", ref, "--no-progress"], nproc=1).returncode == 0
    dec = [r for r in records("auto_ref") if r.get("event") == "schedule"]
    assert [d["step"] for d in dec] == [3, 6, 9, 12] and [d["grow"] for d in dec] == [False] * 3 + [True]
    assert dec[-1]["reason"] == "slope" and dec[-1]["n_points"] == 4
    steps = {r["step"]: r for r in records("auto_ref") if r.get("event") == "step"}
    assert dec[0]["tokens"] == steps[3]["tokens"]
    growth = [r for r in records("auto_ref") if r.get("event") == "growth"]
    assert len(growth) == 1 and growth[0]["step"] == 12
    killed = cfg("auto_killed")
    assert launch(["train", killed, "--no-progress"], nproc=1, env={"GROWTH_DS_KILL_AT_STEP": "10"}).returncode != 0
    assert json.loads((tmp_path / "auto_killed" / "staged" / "checkpoints" / "latest.json").read_text())["step"] == 8
    assert launch(["train", killed, "--no-progress"], nproc=1).returncode == 0
    got = [r for r in records("auto_killed") if r.get("event") == "schedule"]
    assert [(d["step"], d["grow"]) for d in got] == [(d["step"], d["grow"]) for d in dec]
    mine = {r["step"]: r["train_loss"] for r in records("auto_killed") if r.get("event") == "step"}
    assert all(abs(mine[s] - steps[s]["train_loss"]) < 1e-6 for s in steps)


def test_monitor_writes_tensorboard_and_csv(tmp_path, data_dir):
    """``monitor: {tensorboard: true, csv: true}``: TensorBoard's own reader finds the val loss at every eval
    point and the growth at its step; the CSV holds one row per step."""
    import csv

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = staged_config(tmp_path, "mon", total=TOTAL, grow_at=GROW_AT, data_dir=data_dir, zero=1, width="zero")
    raw = yaml.safe_load(path.read_text())
    raw["monitor"] = {"tensorboard": True, "csv": True}
    path.write_text(yaml.safe_dump(raw))
    assert launch(["train", path, "--no-progress"], nproc=2).returncode == 0
    run_dir = tmp_path / "mon" / "staged"
    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    steps = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "step"}
    val = {e.step: e.value for e in ea.Scalars("val/loss")}
    assert val and val == pytest.approx({s: r["val_loss"] for s, r in steps.items() if "val_loss" in r})
    assert [(e.step, e.value) for e in ea.Scalars("growth/stage")] == [(GROW_AT, 1.0)]
    assert len(ea.Scalars("train/loss")) == TOTAL
    with open(run_dir / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, TOTAL + 1))
    assert float(rows[-1]["train_loss"]) == pytest.approx(steps[TOTAL]["train_loss"])


def test_relative_fan_in_follows_the_old_weights_std_on_two_ranks(tmp_path, data_dir):
    """``grow.fan_in_relative``: on two ZeRO-1 ranks (each holding part of every weight: the std is reduced over
    both) the new units' fan-in has ``fan_in_std`` x the std of the old weight at the growth; still lossless. A
    non-boolean value is refused by name."""
    import yaml

    from growth_ds.interop.hf import load_run
    from growth_ds.train.config import fan_in, load_config

    steps, growth = run(tmp_path, data_dir, "rel", grow={"fan_in_std": 8.0, "fan_in_relative": True}, nproc=2,
                        keep_last=10)
    assert len(growth) == 1 and abs(growth[0]["val_loss_after"] - growth[0]["val_loss_before"]) < 1e-4
    before = load_run(tmp_path / "rel" / "staged", tag=f"step{GROW_AT:08d}")  # the pre-growth checkpoint
    old_std = float(before.params["layers.0.mlp.up.weight"].double().std())
    up = load_run(tmp_path / "rel" / "staged").params["layers.0.mlp.up.weight"]
    assert up.shape[0] == 2 * before.params["layers.0.mlp.up.weight"].shape[0] == 128
    assert float(up[64:].double().std()) == pytest.approx(8.0 * old_std, rel=0.12)
    assert fan_in({"fan_in_relative": True}) == {"random_relative": True}  # (make_plan: 1.0 x, or the recipe's)
    assert fan_in({"fan_in_std": 0.1}) == {"random_std": 0.1}
    bad = yaml.safe_load((tmp_path / "rel.yaml").read_text())
    bad["stages"][1]["grow"]["fan_in_relative"] = "yes"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"stages\[1\]\.grow\.fan_in_relative: must be true or false"):
        load_config(tmp_path / "bad.yaml")


def test_fan_in_std_reaches_the_new_units(tmp_path, data_dir):
    """``grow.fan_in_std``: the new units' random fan-in has that std (the growth stays lossless: their outputs
    are read with weight 0); a non-positive value is refused by name before anything runs."""
    import yaml

    from growth_ds.interop.hf import load_run
    from growth_ds.train.config import load_config

    steps, growth = run(tmp_path, data_dir, "fanin", grow={"fan_in_std": 0.5})
    assert len(growth) == 1 and abs(growth[0]["val_loss_after"] - growth[0]["val_loss_before"]) < 1e-4
    state = load_run(tmp_path / "fanin" / "staged")  # 14 steps after the growth: Adam moved each entry < 0.05
    up = state.params["layers.0.mlp.up.weight"]  # d_ffn 64 -> 128: rows 64.. are new units
    assert 0.45 < float(up[64:].std()) < 0.55 and float(up[:64, :32].std()) < 0.3
    bad = yaml.safe_load((tmp_path / "fanin.yaml").read_text())
    bad["stages"][1]["grow"]["fan_in_std"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"stages\[1\]\.grow\.fan_in_std: must be a positive number"):
        load_config(tmp_path / "bad.yaml")

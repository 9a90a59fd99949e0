"""Staged pretraining on DeepSpeed with 2 gloo processes: every ZeRO stage, lossless growth in the job,
exact resume after a kill, refusal of bad configs, the report."""
import json

import pytest
import yaml

from dist_utils import launch, staged_config
from growth_ds.train.config import parse_config
from growth_ds.train.metrics import read_metrics

pytestmark = pytest.mark.slow
GROW_AT, TOTAL = 10, 24


def write_config(tmp_path, name, **kw):
    return staged_config(tmp_path, name, total=TOTAL, grow_at=GROW_AT, **kw)


def run_ok(args, **kw):
    res = launch(args, **kw)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def losses(run_dir):
    return {r["step"]: r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "step"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shared") / "data"


@pytest.mark.parametrize("zero,precision,flavour", [(0, "fp32", "llama"), (1, "fp32", "gpt2"), (2, "fp32", "llama"),
                                                     (3, "fp32", "llama"), (2, "bf16", "gpt2")])
def test_staged_run_under_each_zero_stage(tmp_path, data_dir, zero, precision, flavour):
    cfg = write_config(tmp_path, f"z{zero}", zero=zero, precision=precision, data_dir=data_dir, flavour=flavour)
    run_ok(["train", cfg, "--no-progress"])
    recs = read_metrics(tmp_path / f"z{zero}" / "staged" / "metrics.jsonl")
    steps = [r for r in recs if r.get("event") == "step"]
    assert len(steps) == TOTAL and steps[-1]["stage"] == 1
    first = sum(r["train_loss"] for r in steps[:3]) / 3
    last = sum(r["train_loss"] for r in steps[-3:]) / 3
    assert last < first - 0.1, (first, last)
    growth = [r for r in recs if r.get("event") == "growth"]
    assert len(growth) == 1 and growth[0]["step"] == GROW_AT
    tol = 1e-4 if precision == "fp32" else 5e-2  # bf16 weights round the grown values
    assert abs(growth[0]["val_loss_after"] - growth[0]["val_loss_before"]) < tol, growth[0]
    executor = growth[0]["executor"]  # ZeRO 1-3 grow shard to shard; every rank wrote new elements
    assert executor["kind"] == ("gather" if zero == 0 else "zero-sharded"), executor
    if zero:
        assert executor["rounds"] > 0 and executor["new_elements"] > 0, executor
    assert steps[-1]["flops"] > steps[GROW_AT - 1]["flops"] > 0 and "val_loss" in steps[-1]


@pytest.mark.parametrize("zero", [2, 3])
def test_killed_run_resumes_exactly(tmp_path, data_dir, zero):
    """Rank 1 SIGKILLed in the middle of the sharded growth (the job resumes from the pre-growth checkpoint
    and grows again), then killed after growth (resumes into the grown shape): the losses equal the
    uninterrupted run's within 1e-6."""
    ref_cfg = write_config(tmp_path, "ref", zero=zero, data_dir=data_dir)
    run_ok(["train", ref_cfg, "--no-progress"])
    cfg = write_config(tmp_path, "killed", zero=zero, data_dir=data_dir)
    res = launch(["train", cfg, "--no-progress"], env={"GROWTH_DS_KILL_IN_GROWTH": "1:2"})
    assert res.returncode != 0
    run_dir = tmp_path / "killed" / "staged"
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == GROW_AT
    assert not [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "growth"]  # died in it
    res = launch(["train", cfg, "--no-progress", "--resume"], env={"GROWTH_DS_KILL_AT_STEP": "21"})
    assert res.returncode != 0
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 16
    run_ok(["train", cfg, "--no-progress"])  # resume is automatic when a checkpoint exists
    ref, got = losses(tmp_path / "ref" / "staged"), losses(run_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in ref:
        assert abs(ref[step] - got[step]) < 1e-6, (step, ref[step], got[step])
    growths = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "growth"]
    assert len(growths) == 1  # the log was truncated to the resumed step, so no duplicate records


def test_restart_over_an_earlier_runs_checkpoints_keeps_its_own(tmp_path, data_dir):
    """``--no-resume`` in a directory whose earlier run saved later steps (16, 24): the new run's checkpoints
    are neither pruned as "older" nor mixed with the earlier files; killed at step 13, it resumes from its own
    step 10 and ends with the losses of an uninterrupted run."""
    cfg = write_config(tmp_path, "again", zero=2, data_dir=data_dir)
    run_ok(["train", cfg, "--no-progress"])
    run_dir = tmp_path / "again" / "staged"
    ref = losses(run_dir)
    ckpts = run_dir / "checkpoints"
    assert {"step00000016", "step00000024"} <= {d.name for d in ckpts.iterdir()}
    res = launch(["train", cfg, "--no-progress", "--no-resume"], env={"GROWTH_DS_KILL_AT_STEP": "13"})
    assert res.returncode != 0
    assert json.loads((ckpts / "latest.json").read_text())["step"] == GROW_AT
    assert (ckpts / "step00000008" / "growth_meta.json").exists()  # kept: the newest before this run's latest
    run_ok(["train", cfg, "--no-progress", "--resume"])
    got = losses(run_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in ref:
        assert abs(ref[step] - got[step]) < 1e-6, (step, ref[step], got[step])
    assert json.loads((ckpts / "latest.json").read_text())["step"] == TOTAL


def test_a_failure_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 prepares the data alone; when that fails (here: a corpus file that is not there), the other
    ranks stop with it instead of waiting at a barrier for the collective timeout."""
    cfg = write_config(tmp_path, "nocorpus", zero=1)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["sources"] = [str(tmp_path / "missing.txt")]
    cfg.write_text(yaml.safe_dump(raw))
    res = launch(["train", cfg, "--no-progress"], timeout=240)
    assert res.returncode != 0
    assert "missing.txt" in res.stderr + res.stdout
    assert "failed on rank 0" in res.stderr + res.stdout  # what rank 1 says


def test_stage_shape_that_does_not_match_checkpoint_is_refused(tmp_path, data_dir):
    cfg = write_config(tmp_path, "mismatch", zero=1, data_dir=data_dir)
    run_ok(["train", cfg, "--no-progress"])
    raw = yaml.safe_load(cfg.read_text())
    raw["stages"][1]["shape"]["d_ffn"] = 96
    cfg.write_text(yaml.safe_dump(raw))
    res = launch(["train", cfg, "--no-progress", "--resume"])
    assert res.returncode != 0 and "stages[1].shape.d_ffn" in res.stderr, res.stderr[-2000:]


def test_bad_configs_are_refused_before_training(tmp_path):
    base = yaml.safe_load(write_config(tmp_path, "bad").read_text())

    def refused(mutate, match):
        raw = json.loads(json.dumps(base))
        mutate(raw)
        with pytest.raises(ValueError, match=match):
            parse_config(raw)

    refused(lambda r: r["stages"][1]["shape"].update(d_model=16), r"stages\[1\]\.shape: d_model")
    refused(lambda r: r["stages"][1]["grow"].update(width="lemonade"), r"stages\[1\]\.grow\.width")
    refused(lambda r: r["stages"][1]["grow"].update(depth=None), r"stages\[1\]\.grow\.depth")
    refused(lambda r: r["stages"][0].pop("until"), r"stages\[0\]\.until")
    refused(lambda r: r["stages"][1]["shape"].update(head_dim=16), r"head_dim")
    refused(lambda r: r["deepspeed"].update(zero_stage=4), r"deepspeed\.zero_stage")
    refused(lambda r: r["train"].update(total_stepz=3), r"train: unknown")
    refused(lambda r: r["stages"][0]["until"].update(steps=TOTAL), r"stages")


def test_report_compares_with_scratch(tmp_path, data_dir):
    cfg = write_config(tmp_path, "rep", zero=1, data_dir=data_dir, budget="flops")
    run_ok(["train", cfg, "--no-progress", "--scratch"])
    run_ok(["train", cfg, "--no-progress"])
    staged = [r for r in read_metrics(tmp_path / "rep" / "staged" / "metrics.jsonl") if r.get("event") == "step"]
    scratch = [r for r in read_metrics(tmp_path / "rep" / "scratch" / "metrics.jsonl") if r.get("event") == "step"]
    assert len(scratch) == TOTAL and len(staged) > TOTAL  # budget: flops lengthens the staged run
    assert abs(staged[-1]["flops"] - scratch[-1]["flops"]) <= staged[-1]["flops"] - staged[-2]["flops"]
    from growth_ds.cli import main

    assert main(["report", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000


@pytest.mark.parametrize("zero,steps,moments", [(1, 6, "fresh"), (3, 0, "plan")])
def test_ligo_stage_in_the_trainer(tmp_path, data_dir, zero, steps, moments):
    """LiGO in the job: operator steps count as compute; the grown model is built from the old ZeRO partitions
    by the dense executor. With 0 operator steps it is the initialising plan's model (lossless), under ZeRO-3."""
    cfg = write_config(tmp_path, "ligo", zero=zero, data_dir=data_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["stages"][1]["grow"] = {"method": "ligo", "width": "lemon", "depth": "identity", "steps": steps,
                                "ligo_lr": 3e-3, "moments": moments}
    cfg.write_text(yaml.safe_dump(raw))
    run_ok(["train", cfg, "--no-progress"])
    recs = read_metrics(tmp_path / "ligo" / "staged" / "metrics.jsonl")
    growth = [r for r in recs if r.get("event") == "growth"][0]
    assert growth["method"] == "ligo" and len(growth["ligo_losses"]) == steps
    steps_ = [r for r in recs if r.get("event") == "step"]
    # the operator's tokens and FLOPs are part of the run's compute
    assert growth["tokens"] == steps_[GROW_AT - 1]["tokens"] + steps * 4 * 2 * 32
    assert growth["flops"] > steps_[GROW_AT - 1]["flops"] or steps == 0
    if steps == 0:
        assert abs(growth["val_loss_after"] - growth["val_loss_before"]) < 1e-4, growth
    assert len(steps_) == TOTAL and steps_[-1]["train_loss"] < steps_[0]["train_loss"] - 0.1


@pytest.mark.parametrize("threshold,reason", [(-10.0, "slope"), (-1e-9, "max_tokens")])
def test_when_auto_grows_from_the_fitted_slope_or_the_cap(tmp_path, data_dir, threshold, reason):
    cfg = write_config(tmp_path, "auto", zero=2, data_dir=data_dir, eval_every=2)
    raw = yaml.safe_load(cfg.read_text())
    cap = 16 * 4 * 2 * 32  # tokens of 16 steps
    raw["stages"][0]["until"] = {"auto": {"threshold": threshold, "max_tokens": cap, "min_points": 4}}
    cfg.write_text(yaml.safe_dump(raw))
    run_ok(["train", cfg, "--no-progress"])
    recs = read_metrics(tmp_path / "auto" / "staged" / "metrics.jsonl")
    decisions = [r for r in recs if r.get("event") == "schedule"]
    growth = [r for r in recs if r.get("event") == "growth"]
    assert len(growth) == 1 and decisions and decisions[-1]["grow"] and decisions[-1]["reason"] == reason
    assert all(not d["grow"] for d in decisions[:-1])
    if reason == "slope":
        assert growth[0]["step"] < 16 and decisions[-1]["slope"] >= threshold
        assert not decisions[0]["grow"] and "no growth yet" in decisions[0]["detail"]  # too few points at first
    else:
        assert growth[0]["step"] == 16


def test_offline_growth_and_another_world_size_resume_through_universal_checkpoints(tmp_path, data_dir):
    """A job checkpointed before growth (2 ranks, ZeRO-2) is grown offline (`growth-ds grow --from CKPT_DIR`,
    one process) and continued with `train --init-from`: the steps after it equal the job that grew in place,
    within 1e-5. The same pre-growth checkpoint restarted at world size 1 (converted to DeepSpeed's universal
    format on the way) evaluates exactly as it was saved, grows, and trains on."""
    ref_cfg = write_config(tmp_path, "ref", zero=2, data_dir=data_dir)
    run_ok(["train", ref_cfg, "--no-progress"])
    ref = losses(tmp_path / "ref" / "staged")
    ref_growth = [r for r in read_metrics(tmp_path / "ref" / "staged" / "metrics.jsonl")
                  if r.get("event") == "growth"][0]
    cfg = write_config(tmp_path, "a", zero=2, data_dir=data_dir)
    assert launch(["train", cfg, "--no-progress"], env={"GROWTH_DS_KILL_AT_STEP": "12"}).returncode != 0
    ckpts = tmp_path / "a" / "staged" / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text())["step"] == GROW_AT

    raw = yaml.safe_load(cfg.read_text())
    (tmp_path / "large.yaml").write_text(yaml.safe_dump(raw["stages"][1]["shape"]))
    from growth_ds.cli import main

    assert main(["grow", "--from", str(ckpts), "--to", str(tmp_path / "large.yaml"), "--method", "lemon+identity",
                 "--moments", "adjoint", "--out", str(tmp_path / "grown")]) == 0
    # a config that lists only the grown shape does not say where the run is: refused, naming the stage
    one = write_config(tmp_path, "one", data_dir=data_dir)
    raw_one = yaml.safe_load(one.read_text())
    raw_one["stages"] = [{"shape": raw_one["stages"][1]["shape"]}]
    one.write_text(yaml.safe_dump(raw_one))
    res = launch(["train", one, "--no-progress", "--init-from", tmp_path / "grown"])
    assert res.returncode != 0 and "the checkpoint is in stages[1]" in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "one" / "staged" / "checkpoints").exists()
    b_cfg = write_config(tmp_path, "b", zero=2, data_dir=data_dir)
    run_ok(["train", b_cfg, "--no-progress", "--init-from", tmp_path / "grown"])
    recs = read_metrics(tmp_path / "b" / "staged" / "metrics.jsonl")
    resumed = [r for r in recs if r.get("event") == "resume"][0]
    assert resumed["step"] == GROW_AT and resumed["stage"] == 1
    assert abs(resumed["val_loss"] - ref_growth["val_loss_after"]) < 1e-5, (resumed, ref_growth)
    got = losses(tmp_path / "b" / "staged")
    assert sorted(got) == list(range(GROW_AT + 1, TOTAL + 1))
    for step in got:
        assert abs(ref[step] - got[step]) < 1e-5, (step, ref[step], got[step])

    c_cfg = write_config(tmp_path, "c", zero=3, data_dir=data_dir)  # 1 rank, ZeRO-3, from the 2-rank ZeRO-2 files
    res = launch(["train", c_cfg, "--no-progress", "--init-from", ckpts], nproc=1)
    assert res.returncode == 0, res.stderr[-4000:]
    recs = read_metrics(tmp_path / "c" / "staged" / "metrics.jsonl")
    resumed = [r for r in recs if r.get("event") == "resume"][0]
    assert (resumed["world_size"], resumed["from_world_size"], resumed["stage"]) == (1, 2, 0)
    assert abs(resumed["val_loss"] - ref_growth["val_loss_before"]) < 1e-5, (resumed, ref_growth)
    growth = [r for r in recs if r.get("event") == "growth"]
    assert len(growth) == 1 and abs(growth[0]["val_loss_after"] - growth[0]["val_loss_before"]) < 1e-4
    # the universal conversion of the source went into run c's own directory, not into run a's
    assert not any(d.name.endswith("_universal") for d in ckpts.iterdir())
    steps = [r for r in recs if r.get("event") == "step"]
    assert steps[-1]["step"] >= TOTAL and steps[-1]["train_loss"] < steps[0]["train_loss"]

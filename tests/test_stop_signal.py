"""SIGTERM / SIGUSR1: every rank finishes its step, one complete checkpoint is written, the job exits with
EXIT_STOPPED, and the same command resumes it exactly (torchrun, no Slurm; the Slurm path is in
test_slurm.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dist_utils import REPO, free_port, staged_config
from growth_ds.train.metrics import read_metrics
from growth_ds.train.stop import EXIT_STOPPED

pytestmark = pytest.mark.slow
GROW_AT, TOTAL = 10, 40


def popen(cfg, env=None):
    full = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GROWTH_DS_OFFLINE="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "growth_ds.cli", "train", str(cfg), "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(run_dir):
    return {r["step"]: r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "step"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = staged_config(tmp, "ref", total=TOTAL, grow_at=GROW_AT, zero=2, save_every=100)
    p = popen(cfg)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return tmp, losses(tmp / "ref" / "staged")


def test_sigterm_mid_stage_checkpoints_and_resumes_exactly(tmp_path, reference):
    ref_tmp, ref = reference
    cfg = staged_config(tmp_path, "run", total=TOTAL, grow_at=GROW_AT, zero=2, save_every=100,
                        data_dir=ref_tmp / "data")
    run_dir = tmp_path / "run" / "staged"
    p = popen(cfg)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or max(losses(run_dir), default=0) < GROW_AT + 5:
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() < deadline, "the run did not reach the step to signal"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0
    stopped = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM", err[-3000:]
    at = stopped[0]["step"]
    assert GROW_AT + 5 <= at < TOTAL
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == at  # save_every is 100
    p = popen(cfg)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    assert all(abs(got[s] - ref[s]) < 1e-6 for s in ref), [(s, got[s], ref[s]) for s in ref if got[s] != ref[s]]


def test_signal_during_growth_finishes_it_then_stops(tmp_path, reference):
    """A stop signal that reaches rank 1 inside the growth: the growth completes on every rank, the next step
    runs, the checkpoint holds the grown state, and the resumed run ends as the uninterrupted one."""
    ref_tmp, ref = reference
    cfg = staged_config(tmp_path, "g", total=TOTAL, grow_at=GROW_AT, zero=2, save_every=100, data_dir=ref_tmp / "data")
    run_dir = tmp_path / "g" / "staged"
    p = popen(cfg, env={"GROWTH_DS_SIGNAL_IN_GROWTH": "1"})
    _, err = p.communicate(timeout=600)
    assert p.returncode != 0 and f"exitcode  : {EXIT_STOPPED}" in err, err[-3000:]  # the workers' status
    recs = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("event") == "growth"] == [GROW_AT]
    assert [r["step"] for r in recs if r.get("event") == "stopped"] == [GROW_AT + 1], err[-3000:]
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    meta = json.loads((run_dir / "checkpoints" / latest["tag"] / "growth_meta.json").read_text())
    assert latest["step"] == GROW_AT + 1 and meta["progress"]["stage"] == 1
    p = popen(cfg)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    got = losses(run_dir)
    assert all(abs(got[s] - ref[s]) < 1e-6 for s in ref)

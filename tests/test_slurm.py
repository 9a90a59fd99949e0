"""launch/slurm.sbatch on a real one-node Slurm (Debian's slurm-wlm + munge) started by the test.

The module fixture installs Slurm if needed (apt-get, as root), writes a slurm.conf for this host with
2 CPUs into a temporary directory, starts munged (unless one already answers), slurmctld and slurmd,
and stops exactly the daemons it started, by PID. If Slurm cannot be installed or started the test
fails with the reason; it never skips.

One test, four jobs of a 2-task staged run on the test corpus (ZeRO-2, fp32, world size 2):

1. ``LAUNCHER=torchrun``: runs to the end; metrics, growth and checkpoints are checked.
2. ``LAUNCHER=deepspeed`` (DeepSpeed's ``--launcher slurm``): ``scancel`` in the first stage once a
   checkpoint exists.
3. The same script resubmitted with ``LAUNCHER=srun`` and no other change: it resumes from the latest
   complete checkpoint, grows, is ``scontrol requeue``-d in the second stage, restarts by itself (about
   11 s later, once its old credential expires) and finishes. Every step's loss equals job 1's within 1e-6.
4. ``LAUNCHER=torchrun`` sent USR1 in the second stage (Slurm's ``--signal=B:USR1@T`` warning): every rank
   checkpoints and stops, the script requeues the job, which resumes and finishes; losses equal job 1's.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import REPO, staged_config
from growth_ds.train.metrics import read_metrics

pytestmark = pytest.mark.slow
SBATCH = REPO / "launch" / "slurm.sbatch"
PACKAGES = ["slurm-wlm", "munge"]  # slurm-wlm = slurmctld + slurmd + slurm-client
GROW_AT, TOTAL, SAVE_EVERY = 50, 120, 10
JOB_TIMEOUT = 480  # per wait; the box may be shared with other test runs


def _sh(cmd, env=None, timeout=120, check=False) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({res.returncode}): {res.stdout[-2000:]}"
                           f"{res.stderr[-2000:]}")
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def ensure_slurm_installed() -> None:
    """apt-get install Slurm and munge unless their binaries exist; pytest.fail with the reason otherwise."""
    needed = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/bin/sbatch", "/usr/bin/srun"]
    if all(os.path.exists(b) for b in needed):
        return
    if os.geteuid() != 0:
        pytest.fail(f"Slurm is not installed ({[b for b in needed if not os.path.exists(b)]} missing) and this "
                    f"test is not root, so it cannot apt-get install {PACKAGES}")
    if not shutil.which("apt-get"):
        pytest.fail(f"Slurm is not installed and there is no apt-get to install {PACKAGES}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    res = _sh(cmd, env=env, timeout=900)
    if res.returncode != 0:  # stale package lists: refresh once and retry
        _sh(["apt-get", "update"], env=env, timeout=900)
        res = _sh(cmd, env=env, timeout=900)
    missing = [b for b in needed if not os.path.exists(b)]
    if res.returncode != 0 or missing:
        pytest.fail(f"cannot install Slurm with `{' '.join(cmd)}` (rc {res.returncode}, missing {missing}): "
                    f"{res.stdout[-1500:]}{res.stderr[-1500:]}")


class LocalSlurm:
    """A one-node Slurm cluster for this host in ``root``; every daemon it starts is stopped by PID."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: dict[str, subprocess.Popen] = {}
        self.munged_pid: int | None = None
        self.jobs: list[str] = []

    def write_conf(self) -> None:
        for d in ("etc", "state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        mem_mb = max(1024, int(Path("/proc/meminfo").read_text().split()[1]) // 2048)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=growthds
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
EnforcePartLimits=ALL
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd.%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=5
Waittime=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _munge_ok(self) -> bool:
        try:
            enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True,
                                                          timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def start(self) -> None:
        self.write_conf()
        if not self._munge_ok():  # start munged as slurm.md verified; reuse one that already answers
            if not Path("/etc/munge/munge.key").exists():
                _sh(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            os.chmod("/run/munge", 0o755)
            _sh(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self.munged_pid = int(Path("/run/munge/munged.pid").read_text().split()[0])
            deadline = time.time() + 20
            while not self._munge_ok():
                if time.time() > deadline:
                    raise RuntimeError("munged started but `munge -n | unmunge` does not succeed")
                time.sleep(0.2)
        for name in ("slurmctld", "slurmd"):
            log = open(self.root / "log" / f"{name}.fg.out", "ab")
            self.procs[name] = subprocess.Popen([f"/usr/sbin/{name}", "-D"], env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while True:
            state = _sh(["sinfo", "-h", "-o", "%t"], env=self.env).stdout.strip()
            if state == "idle":
                return
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}: {self.logs()}")
            if time.time() > deadline:
                raise RuntimeError(f"the node is not idle after 60 s (sinfo: {state!r}): {self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.fg.out", "slurmd.fg.out"):
            p = self.root / "log" / name
            if p.exists():
                out.append(f"--- {name}\n" + p.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def stop(self) -> None:
        for job in self.jobs:  # job steps run under slurmstepd, which outlives slurmd: cancel them first
            _sh(["scancel", job], env=self.env)
        deadline = time.time() + 30
        while self.jobs and time.time() < deadline and _sh(["squeue", "-h", "-j", ",".join(self.jobs)],
                                                            env=self.env).stdout.strip():
            time.sleep(0.5)
        for name in ("slurmd", "slurmctld"):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.munged_pid is not None and _alive(self.munged_pid):
            os.kill(self.munged_pid, signal.SIGTERM)

    # ---- jobs ----------------------------------------------------------------------------------
    def sbatch(self, args, env: dict) -> str:
        res = _sh(["sbatch", "--parsable", *map(str, args)], env={**self.env, **env}, check=True)
        job = res.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict:
        out = _sh(["scontrol", "show", "job", "-o", job], env=self.env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job: str, states, timeout: float = JOB_TIMEOUT) -> dict:
        deadline = time.time() + timeout
        while True:
            info = self.job(job)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise AssertionError(f"job {job} is {info.get('JobState')} after {timeout} s, not {states}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    ensure_slurm_installed()
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as e:  # noqa: BLE001 -- report why, after stopping what was started
        cluster.stop()
        pytest.fail(f"cannot start Slurm: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


def write_config(tmp_path: Path, name: str, data_dir: Path) -> Path:
    return staged_config(tmp_path, name, total=TOTAL, grow_at=GROW_AT, data_dir=data_dir, warmup_steps=10,
                         eval_every=40, save_every=SAVE_EVERY, keep_last=2)


def latest_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def wait_for_checkpoint(cluster: LocalSlurm, job: str, run_dir: Path, lo: int, hi: int, log: Path) -> int:
    deadline = time.time() + JOB_TIMEOUT
    while time.time() < deadline:
        step = latest_step(run_dir)
        if lo <= step < hi:
            return step
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), (state, step, _tail(log))
        assert step < hi, f"job {job} passed step {hi} before it could be interrupted (latest {step})"
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint in [{lo}, {hi}) after {JOB_TIMEOUT} s: {_tail(log)}")


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def step_losses(run_dir: Path) -> dict:
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "step"]
    losses = {r["step"]: r["train_loss"] for r in recs}
    assert len(losses) == len(recs), "a step was logged twice"
    return losses


def test_sbatch_staged_run_cancel_resubmit_requeue(slurm, tmp_path):
    data_dir = tmp_path / "data"
    env = {"GROWTH_DS_PYTHON": sys.executable, "GROWTH_DS_CACHE": str(tmp_path / "cache"), "GROWTH_DS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    common = ["--nodes=1", "--ntasks-per-node=2", f"--chdir={tmp_path}"]

    # 1. uninterrupted reference job (torchrun through srun)
    ref_cfg = write_config(tmp_path, "ref", data_dir)
    ref_log = tmp_path / "ref.out"
    job = slurm.sbatch([*common, f"--output={ref_log}", SBATCH, ref_cfg, "--no-progress"],
                       {**env, "LAUNCHER": "torchrun"})
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, _tail(ref_log))
    ref_dir = tmp_path / "ref" / "staged"
    recs = read_metrics(ref_dir / "metrics.jsonl")
    ref = step_losses(ref_dir)
    assert sorted(ref) == list(range(1, TOTAL + 1))
    assert sum(ref[s] for s in (1, 2, 3)) / 3 - sum(ref[s] for s in range(TOTAL - 2, TOTAL + 1)) / 3 > 0.5
    growth = [r for r in recs if r.get("event") == "growth"]
    assert len(growth) == 1 and growth[0]["step"] == GROW_AT
    assert abs(growth[0]["val_loss_after"] - growth[0]["val_loss_before"]) < 1e-4, growth
    assert latest_step(ref_dir) == TOTAL
    tags = sorted(d.name for d in (ref_dir / "checkpoints").iterdir() if d.name.startswith("step"))
    assert tags == [f"step{TOTAL - SAVE_EVERY:08d}", f"step{TOTAL:08d}"]
    meta = json.loads((ref_dir / "checkpoints" / tags[-1] / "growth_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["progress"]["stage"] == 1
    assert "launcher torchrun" in ref_log.read_text()

    # 2. the deepspeed launcher's slurm backend, cancelled mid-stage once a checkpoint exists
    cfg = write_config(tmp_path, "run", data_dir)
    run_dir = tmp_path / "run" / "staged"
    log = tmp_path / "run.out"
    job = slurm.sbatch([*common, f"--output={log}", SBATCH, cfg, "--no-progress"], {**env, "LAUNCHER": "deepspeed"})
    step = wait_for_checkpoint(slurm, job, run_dir, SAVE_EVERY, GROW_AT - SAVE_EVERY, log)
    _sh(["scancel", job], env=slurm.env, check=True)
    info = slurm.wait(job, ("CANCELLED",), timeout=60)
    time.sleep(1)
    cancelled_at = latest_step(run_dir)
    assert SAVE_EVERY <= step <= cancelled_at < GROW_AT, (step, cancelled_at)
    assert not [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "growth"]
    meta = json.loads((run_dir / "checkpoints" / f"step{cancelled_at:08d}" / "growth_meta.json").read_text())
    assert meta["world_size"] == 2  # DeepSpeed's srun backend started 2 ranks of one job
    assert "launcher deepspeed" in log.read_text()

    # 3. resubmitted unchanged but for the launcher; requeued in the second stage; finishes
    job = slurm.sbatch([*common, f"--output={log}", SBATCH, cfg, "--no-progress"], {**env, "LAUNCHER": "srun"})
    step = wait_for_checkpoint(slurm, job, run_dir, GROW_AT + SAVE_EVERY, TOTAL - 2 * SAVE_EVERY, log)
    # Slurm holds a requeued job until its old credential expires (cred_expire=10 s in this slurm.conf);
    # forcing StartTime=now earlier gets it killed as "non-startable: Job credential revoked".
    _sh(["scontrol", "requeue", job], env=slurm.env, check=True)
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"))
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert info.get("Restarts") == "1" and "restart 1" in text, info
    assert latest_step(run_dir) == TOTAL
    got = step_losses(run_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))  # resumed runs truncate the log: no step twice
    for s in ref:
        assert abs(ref[s] - got[s]) < 1e-6, (s, ref[s], got[s])
    growths = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "growth"]
    assert len(growths) == 1 and growths[0]["step"] == GROW_AT

    # 4. Slurm's warning signal (what --signal=B:USR1@120 sends the batch shell): every rank checkpoints at its
    #    next step and stops, the job requeues itself, resumes and finishes; the losses equal job 1's
    cfg = write_config(tmp_path, "warned", data_dir)
    run_dir = tmp_path / "warned" / "staged"
    log = tmp_path / "warned.out"
    job = slurm.sbatch([*common, f"--output={log}", SBATCH, cfg, "--no-progress"], {**env, "LAUNCHER": "torchrun"})
    step = wait_for_checkpoint(slurm, job, run_dir, GROW_AT + SAVE_EVERY, TOTAL - 2 * SAVE_EVERY, log)
    _sh(["scancel", "--batch", "--signal=USR1", job], env=slurm.env, check=True)
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"))
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, text[-4000:])
    assert "USR1" in text and "requeueing" in text
    recs = read_metrics(run_dir / "metrics.jsonl")
    stopped = [r for r in recs if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM" and stopped[0]["step"] >= step, stopped
    got = step_losses(run_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for s in ref:
        assert abs(ref[s] - got[s]) < 1e-6, (s, ref[s], got[s])

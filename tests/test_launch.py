"""launch/deepspeed.sh and launch/torchrun.sh for real on the CPU (2 gloo processes), their multi-node
command lines (DRY_RUN), a killed run resumed by re-running the identical command, and the run
published to Hugging Face reproducing its validation loss in transformers."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_utils import REPO, free_port, staged_config
from growth_ds.train.metrics import read_metrics

pytestmark = pytest.mark.slow
LAUNCH = REPO / "launch"
GROW_AT, TOTAL = 10, 24


def script_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK",
                                                                    "NPROC_PER_NODE", "HOSTFILE", "RANK",
                                                                    "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(GROWTH_DS_PYTHON=sys.executable, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GROWTH_DS_OFFLINE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(name, args, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / name), *map(str, args)], cwd=REPO, env=script_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def dry(name, args=("cfg.yaml",), **env) -> list:
    res = run_script(name, args, DRY_RUN=1, **env)
    assert res.returncode == 0, res.stderr
    return shlex.split(res.stdout)


def has(cmd: list, *seq) -> bool:
    """``seq`` appears contiguously in ``cmd``."""
    seq = list(map(str, seq))
    return any(cmd[i:i + len(seq)] == seq for i in range(len(cmd) - len(seq) + 1))


def write_config(tmp_path: Path, name: str, data_dir: Path) -> Path:
    return staged_config(tmp_path, name, total=TOTAL, grow_at=GROW_AT, data_dir=data_dir)


def step_losses(run_dir: Path) -> dict:
    return {r["step"]: r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "step"}


# ---- command lines ------------------------------------------------------------------------------
def test_scripts_are_valid_bash_and_need_a_config():
    for name in ("deepspeed.sh", "torchrun.sh", "slurm.sbatch"):
        assert subprocess.run(["bash", "-n", str(LAUNCH / name)]).returncode == 0, name
        assert os.access(LAUNCH / name, os.X_OK), f"{name} is not executable"
        res = run_script(name, [])
        assert res.returncode == 2 and "usage" in res.stderr, (name, res.stderr)
    res = run_script("slurm.sbatch", ["cfg.yaml"])  # outside a Slurm job: refuses, names sbatch
    assert res.returncode == 2 and "sbatch" in res.stderr
    assert "#SBATCH --requeue" in (LAUNCH / "slurm.sbatch").read_text()


def test_torchrun_command_lines():
    cmd = dry("torchrun.sh", ["cfg.yaml", "--no-progress"], NPROC_PER_NODE=2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert has(cmd, "--nnodes", 1, "--nproc_per_node", 2, "--node_rank", 0, "--master_addr", "127.0.0.1")
    assert cmd[-5:] == ["-m", "growth_ds.cli", "train", "cfg.yaml", "--no-progress"]
    cmd = dry("torchrun.sh", NNODES=4, NODE_RANK=3, NPROC_PER_NODE=8, MASTER_ADDR="node0", MASTER_PORT=29510)
    assert has(cmd, "--nnodes", 4, "--nproc_per_node", 8, "--node_rank", 3, "--master_addr", "node0",
               "--master_port", 29510)
    # inside a Slurm step: node count, node rank and port come from SLURM_*
    cmd = dry("torchrun.sh", SLURM_NNODES=2, SLURM_NODEID=1, SLURM_JOB_ID=123456, MASTER_ADDR="node0")
    assert has(cmd, "--nnodes", 2) and has(cmd, "--node_rank", 1) and has(cmd, "--master_port", 20000 + 123456 % 20000)
    cmd = dry("torchrun.sh", RDZV_BACKEND="c10d", NNODES=2, MASTER_ADDR="node0", MASTER_PORT=29510, SLURM_JOB_ID=7)
    assert has(cmd, "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29510", "--rdzv_id", 7)
    assert "--node_rank" not in cmd


def test_deepspeed_command_lines(tmp_path):
    cmd = dry("deepspeed.sh", ["cfg.yaml", "--scratch"], NPROC_PER_NODE=2)
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"] and has(cmd, "--num_gpus", 2)
    assert cmd[-6:] == ["--no_local_rank", "--module", "growth_ds.cli", "train", "cfg.yaml", "--scratch"]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode0 slots=8\nnode1 slots=8\n")
    cmd = dry("deepspeed.sh", HOSTFILE=hostfile)  # from one node over pdsh
    assert has(cmd, "--hostfile", hostfile) and has(cmd, "--launcher", "pdsh") and "--no_ssh" not in cmd
    cmd = dry("deepspeed.sh", HOSTFILE=hostfile, NO_SSH=1, NODE_RANK=1)  # started on every node
    assert has(cmd, "--no_ssh", "--node_rank", 1, "--master_addr", "node0")
    cache = tmp_path / "cache"
    cmd = dry("deepspeed.sh", HOSTFILE=hostfile, DS_LAUNCHER="slurm", MASTER_ADDR="node0",
              DS_LAUNCHER_ARGS="--kill-on-bad-exit=1", GROWTH_DS_CACHE=cache)
    shim = cache / "launch" / "slurm_rank_env.py"
    assert has(cmd, "--launcher", "slurm") and "--no_ssh_check" in cmd and "--num_gpus" not in cmd
    assert has(cmd, "--launcher_args", "--kill-on-bad-exit=1")
    assert cmd[-3:] == [str(shim), "train", "cfg.yaml"] and "--module" not in cmd
    # the generated script maps srun's variables and runs growth-ds
    res = subprocess.run([sys.executable, str(shim), "check", str(REPO / "configs" / "demo.yaml")], cwd=REPO,
                         env=script_env(SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_LOCALID=1), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-c", f"import os, runpy, sys; sys.argv = [{str(shim)!r}, '--help']\n"
                          f"import growth_ds.cli\ntry: runpy.run_path({str(shim)!r})\nexcept SystemExit: pass\n"
                          "print('RANK', os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['LOCAL_RANK'])"],
                         env=script_env(SLURM_PROCID=3, SLURM_NTASKS=4, SLURM_LOCALID=1), capture_output=True,
                         text=True, timeout=120)
    assert "RANK 3 4 1" in res.stdout, res.stderr


# ---- real runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    """`launch/deepspeed.sh` with a localhost hostfile: 2 CPU processes through the multi-node code path."""
    root = tmp_path_factory.mktemp("launch")
    cfg = write_config(root, "ds", root / "data")
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    res = run_script("deepspeed.sh", [cfg, "--no-progress"], HOSTFILE=hostfile, NO_SSH=1, NODE_RANK=0,
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root, cfg, root / "ds" / "staged", res


def test_deepspeed_launcher_hostfile_two_cpu_processes(ds_run):
    root, cfg, run_dir, res = ds_run
    assert "dist_world_size=2" in res.stdout + res.stderr
    recs = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in recs if r.get("event") == "step"]
    assert [r["step"] for r in steps] == list(range(1, TOTAL + 1)) and steps[-1]["stage"] == 1
    assert steps[-1]["train_loss"] < steps[0]["train_loss"] - 0.3
    growth = [r for r in recs if r.get("event") == "growth"]
    assert len(growth) == 1 and growth[0]["step"] == GROW_AT
    assert abs(growth[0]["val_loss_after"] - growth[0]["val_loss_before"]) < 1e-4
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    meta = json.loads((run_dir / "checkpoints" / latest["tag"] / "growth_meta.json").read_text())
    assert latest["step"] == TOTAL and meta["world_size"] == 2


def test_torchrun_script_killed_then_rerun_resumes_exactly(ds_run, tmp_path):
    """A run killed mid-stage continues when the identical command runs again (what a requeue does);
    its losses equal the deepspeed launcher's run step for step."""
    root, _, ref_dir, _ = ds_run
    cfg = write_config(tmp_path, "tr", root / "data")
    run_dir = tmp_path / "tr" / "staged"
    port = free_port()
    res = run_script("torchrun.sh", [cfg, "--no-progress"], NPROC_PER_NODE=2, MASTER_PORT=port,
                     GROWTH_DS_KILL_AT_STEP=15)
    assert res.returncode != 0
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == GROW_AT
    res = run_script("torchrun.sh", [cfg, "--no-progress"], NPROC_PER_NODE=2, MASTER_PORT=port)
    assert res.returncode == 0, res.stderr[-3000:]
    ref, got = step_losses(ref_dir), step_losses(run_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in ref:
        assert abs(ref[step] - got[step]) < 1e-6, (step, ref[step], got[step])


def test_run_published_to_hugging_face_reproduces_its_val_loss(ds_run):
    """`growth-ds convert RUN_DIR OUT` (ZeRO-2 shards -> fp32 -> save_pretrained); transformers' loss on
    the run's validation batches equals the trainer's last logged val loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from growth_ds.interop.hf import convert
    from growth_ds.models import lm_loss
    from growth_ds.train.data import TokenStore, eval_batches

    root, cfg, run_dir, _ = ds_run
    out = root / "published"
    convert(run_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 3
    info = json.loads((root / "data" / "data.json").read_text())
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(TokenStore.open(info["val"]), 32, 4, 2):
            total += lm_loss(model(input_ids=x).logits, y).item() * x.shape[0]
            count += x.shape[0]
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r][-1]
    assert abs(total / count - last["val_loss"]) < 1e-4, (total / count, last["val_loss"])


# ---- ready-made cluster configs -----------------------------------------------------------------
CLUSTER_CONFIGS = {  # config: (flavour, ZeRO stage, GPUs it is sized for, tokens per step there)
    "gpt2-124m-to-350m": ("gpt2", 1, 8, 2 ** 19), "gpt2-350m-to-774m": ("gpt2", 2, 16, 2 ** 19),
    "llama-1b-to-3b": ("llama", 2, 32, 2 ** 21), "llama-3b-to-7b": ("llama", 3, 64, 2 ** 22),
}


@pytest.mark.parametrize("name", list(CLUSTER_CONFIGS))
def test_cluster_configs_pass_check(name, capsys):
    from growth_ds.cli import main
    from growth_ds.train.config import load_config

    path = REPO / "configs" / f"{name}.yaml"
    assert main(["check", str(path)]) == 0
    assert "ok (2 stage(s)" in capsys.readouterr().out
    cfg = load_config(path)
    flavour, zero, gpus, tokens = CLUSTER_CONFIGS[name]
    small, large = cfg.stages[0].shape, cfg.stages[1].shape
    assert small.flavour == large.flavour == flavour and large.n_params > 2 * small.n_params
    assert cfg.deepspeed["zero_stage"] == zero and cfg.deepspeed["precision"] == "bf16"
    t = cfg.train
    assert t["seq_len"] == small.max_seq_len == large.max_seq_len
    assert cfg.data["vocab_size"] == small.vocab_size
    assert t["warmup_steps"] < cfg.stages[0].until_steps < t["total_steps"] and t["save_every"] <= 500
    assert cfg.tokens_per_step(gpus) == tokens
    # ~20 tokens per parameter of the final model (Chinchilla), within a factor of 2
    assert 10 <= t["total_steps"] * tokens / large.n_params <= 40
    # the saving study's recipe (README Results), under WSD with the decay at the run's end
    from growth_ds.ops import make_plan
    from growth_ds.ops.plan import RECIPES

    assert cfg.stages[1].grow == {"recipe": "recommended"} and t["schedule"] == "wsd"
    plan = make_plan(small, large, recipe=cfg.stages[1].grow["recipe"])
    assert (plan.width, plan.depth) == (RECIPES["recommended"]["width"], RECIPES["recommended"]["depth"])


def test_check_names_the_bad_key(tmp_path, capsys):
    from growth_ds.cli import main

    raw = yaml.safe_load((REPO / "configs" / "gpt2-124m-to-350m.yaml").read_text())
    raw["stages"][0]["shape"] = str(REPO / "configs" / "shapes" / "gpt2-124m.yaml")
    raw["stages"][1]["shape"] = str(REPO / "configs" / "shapes" / "gpt2-350m.yaml")
    raw["stages"][1]["grow"]["width"] = "duplicate"  # 768 -> 1024 is not an integer ratio
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stages[1]" in err and "d_model" in err and "lemon" in err, err

"""Launch growth-ds commands under torchrun (gloo, CPU) from tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "corpus_excerpt.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, nproc: int = 2, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GROWTH_DS_OFFLINE="1")
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "growth_ds.cli"] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_one_process(script: str, out) -> tuple:
    """Run ``script`` (argv: OUT, the tests directory) in a fresh process outside any launcher, so megatron-core's
    global state stays there; ``({RESULT json}, stderr)``, or an assertion error with its output."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(REPO / "tests")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), proc.stderr


def tiny_shape(d=32, layers=2, heads=4, kv=2, ffn=64, vocab=512, flavour="llama"):
    return dict(flavour=flavour, n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=kv if flavour == "llama" else heads,
                head_dim=8, d_ffn=ffn, vocab_size=vocab, max_seq_len=32)


def staged_config(tmp_path: Path, name: str, *, total: int, grow_at: int, data_dir: Path | None = None, zero: int = 2,
                  precision: str = "fp32", width: str = "lemon", depth: str = "identity", flavour: str = "llama",
                  **train) -> Path:
    """Write ``tmp_path/name.yaml``: a two-stage run on the committed corpus excerpt (tiny shape grown at
    ``grow_at`` of ``total`` steps with ``width`` + ``depth``, adjoint moments); ``train`` overrides train keys."""
    cfg = {
        "run": {"name": name, "out_dir": str(tmp_path / name), "seed": 0},
        "data": {"sources": [str(FIXTURE)], "vocab_size": 512, "val_fraction": 0.1,
                 "out_dir": str(data_dir or tmp_path / "data")},
        "train": {"seq_len": 32, "micro_batch_size": 4, "total_steps": total, "warmup_steps": 4, "eval_every": 4,
                  "eval_batches": 2, "save_every": 8, "lr": 3e-3, **train},
        "deepspeed": {"zero_stage": zero, "precision": precision},
        "stages": [
            {"shape": tiny_shape(flavour=flavour), "until": {"steps": grow_at}},
            {"shape": tiny_shape(d=64, layers=3, heads=8, kv=4, ffn=128, flavour=flavour),
             "grow": {"width": width, "depth": depth, "moments": "adjoint"}},
        ],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path

"""Launch growth-ds commands under torchrun (gloo, CPU) from tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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


def tiny_shape(d=32, layers=2, heads=4, kv=2, ffn=64, vocab=512, flavour="llama"):
    return dict(flavour=flavour, n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=kv if flavour == "llama" else heads,
                head_dim=8, d_ffn=ffn, vocab_size=vocab, max_seq_len=32)

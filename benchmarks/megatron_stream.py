"""Peak memory of growing a megatron-core checkpoint: streamed (one parameter at a time) against in memory.

    python benchmarks/megatron_stream.py [--d 512] [--layers 4 8] [--vocab 8192] [--out /tmp/gds_stream]

For each depth in ``--layers``: saves a Llama checkpoint with Adam state (d_model ``--d``), grows it to twice the
width and depth both ways, each in a fresh process, and prints each process's peak resident memory
(``ru_maxrss``) above that of a process that only imports megatron-core and builds nothing, against the size of
the grown training state (float32 weights and Adam moments) and of its largest parameter, the wall time, and
whether the two checkpoints are bit-identical. The streamed peak should not grow with the depth; the in-memory
one grows with the state.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def shapes(d: int, layers: int, vocab: int):
    from growth_ds.shapes import ModelShape

    small = ModelShape(flavour="llama", n_layers=layers, d_model=d, n_heads=d // 64, n_kv_heads=d // 128,
                       head_dim=64, d_ffn=int(d * 2.75), vocab_size=vocab, max_seq_len=256, tied_embeddings=False)
    large = ModelShape(flavour="llama", n_layers=2 * layers, d_model=2 * d, n_heads=d // 32, n_kv_heads=d // 64,
                       head_dim=64, d_ffn=int(d * 5.5), vocab_size=vocab, max_seq_len=256, tied_embeddings=False)
    return small, large


def phase(name: str, a) -> dict:
    import torch

    from growth_ds.interop import megatron as gm
    from growth_ds.interop.megatron_checkpoint import grow_dist_checkpoint

    small, large = shapes(a.d, a.layers[0], a.vocab)
    out = Path(a.out)
    t0 = time.perf_counter()
    if name == "save":
        gm.ensure_model_parallel(1)
        model = gm.build_gpt_model(small)
        opt = torch.optim.AdamW(model.parameters())
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": torch.randn(p.shape, generator=g) * 1e-3,
                            "exp_avg_sq": torch.rand(p.shape, generator=g) * 1e-6}
        gm.save_dist_checkpoint(model, opt, out / "small")
        info = {"small_params": sum(p.numel() for p in model.parameters())}
    elif name == "idle":
        gm.ensure_model_parallel(1)
        info = {}
    else:
        grown = grow_dist_checkpoint(out / "small", large, out / name, width="zero", depth="stack",
                                        stream=name == "streamed", overwrite=True)
        n = sum(p.numel() for p in grown.model.parameters())
        info = {"grown_params": n, "grown_state_bytes": 3 * 4 * n,
                "largest_bytes": 4 * max(p.numel() for p in grown.model.parameters())}
    info.update(seconds=time.perf_counter() - t0, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return info


def run(name: str, a) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, __file__, "--phase", name, "--d", str(a.d), "--layers", str(a.layers[0]),
                           "--vocab", str(a.vocab), "--out", a.out], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])


def identical(a: Path, b: Path) -> bool:
    from growth_ds.interop.dist_stream import checkpoint_diff

    return checkpoint_diff(a, b) == []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", default="/tmp/gds_stream")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase:
        print("RESULT " + json.dumps(phase(a.phase, a)))
        return
    import shutil

    gib = 2 ** 30
    print("| small -> grown | grown state (weights + Adam) | largest parameter | streamed: peak above idle, wall "
          "| in memory: peak above idle, wall | in memory / streamed | bit-identical |")
    print("|---|---|---|---|---|---|---|")
    depths = a.layers
    for layers in depths:
        a.layers = [layers]
        shutil.rmtree(a.out, ignore_errors=True)
        Path(a.out).mkdir(parents=True)
        small, large = shapes(a.d, layers, a.vocab)
        run("save", a)
        idle = run("idle", a)["peak_rss"]
        st, mem = run("streamed", a), run("in_memory", a)
        s, m = st["peak_rss"] - idle, mem["peak_rss"] - idle
        print(f"| {small.describe()} -> {large.describe()} | {st['grown_state_bytes'] / gib:.2f} GiB | "
              f"{st['largest_bytes'] / 2 ** 20:.0f} MiB | {s / gib:.2f} GiB, {st['seconds']:.0f} s | "
              f"{m / gib:.2f} GiB, {mem['seconds']:.0f} s | {m / max(s, 1):.1f}x | "
              f"{identical(Path(a.out) / 'in_memory', Path(a.out) / 'streamed')} |", flush=True)
    print(f"(idle process: {idle / gib:.2f} GiB)")


if __name__ == "__main__":
    main()

"""One command for the moment a GPU is lent: growth-ds's CUDA paths, measured, in one table.

    bash benchmarks/gpu_wheels.sh wheels                      # here, with PyPI: the wheels the bare machine lacks
    python benchmarks/gpu_check.py --wheels wheels --out DIR  # on the GPU machine (carry `wheels`)
    python benchmarks/gpu_check.py --cpu                      # the same sections on tiny shapes (CI)

Sections (each runs on its own, a failure is a row of the table, not the end of the check):

* ``kernel``  the fused LiGO expansion (Triton) against the torch path (einsum depth mix + two matmuls) in bf16,
  growth (L/2 layers, d/2) -> (L, d) for d = 1024..8192, L = 12..48: time, useful TFLOP/s, torch/fused ratio
  (target >= 1.3) and the share of a bf16 8192^3 matmul measured in the same run (target >= 60% at large d);
* ``train``   the trainer on CUDA in bf16, ZeRO-1 and ZeRO-3, world size 1 (NCCL): GPT-2 small's layers
  (12 x 768; the tokenizer of the committed corpus excerpt, vocabulary 2048) for a few dozen steps, then an
  in-job growth to GPT-2 medium's layers (24 x 1024; zero width + identity depth: lossless) and more steps:
  tokens/s and model FLOPs utilisation per stage, the growth's wall time, val loss before/after;
* ``zero``    the ZeRO executor's grown state equal, bit for bit, to ``growth_ds.ops.grow`` (every width and
  depth method, ZeRO-1/2/3; ``tests/zero_worker.py cases``).

``--cpu`` runs every section on tiny shapes (fp32, gloo, two ranks for ``zero``; no kernel timings), so the
script cannot rot. The table is printed and written, with the raw figures, to ``--out`` (``gpu_check.md`` and
``gpu_check.json``). ``--budget-s`` bounds the kernel sweep (the rest is short). The run on a lent GPU is the one
that counts; paste its table into the README's Benchmarks section.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM


def install_wheels(wheels: Path, target: Path) -> None:
    """``pip install --no-deps --target`` every wheel in ``wheels`` (no index, nothing else touched: torch stays)."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"--wheels {wheels}: no .whl files (make them with benchmarks/gpu_wheels.sh)")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                    str(target), *files], check=True)


def _env(extra_path: str | None = None) -> dict:
    env = dict(os.environ, GROWTH_DS_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    paths = [str(REPO)] + ([extra_path] if extra_path else []) + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# ---- kernel ------------------------------------------------------------------------------------------------
def section_kernel(cpu: bool, budget_s: float) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import kron_kernel as kk  # (the kernel benchmark's timing helpers and torch baseline)
    from growth_ds.kernels import kron_expand, kron_expand_reference

    rows = []
    if cpu:  # correctness of both paths on one tiny case; no timings
        g = torch.Generator().manual_seed(0)
        W, D = torch.randn(2, 32, 32, generator=g), torch.rand(4, 2, generator=g)
        B, A = torch.randn(4, 64, 32, generator=g), torch.randn(4, 64, 32, generator=g)
        ref = kron_expand_reference(W, D, B, A)
        got = kron_expand(W, D, B, A, backend="torch")
        err = float((got - kk.torch_baseline(W, D, B, A)).abs().max() / ref.abs().max())
        note = "cpu: torch path only"
        from growth_ds.kernels import triton_available

        if triton_available():  # the Triton kernel itself, through the interpreter (TRITON_INTERPRET=1, set in main)
            from growth_ds.kernels import kron_triton

            if kron_triton.is_interpreter():
                fused = kron_expand(W, D, B, A, backend="triton")
                err = max(err, float((fused - ref).abs().max() / ref.abs().max()))
                note = "cpu: Triton interpreter vs torch"
        rows.append({"d": 64, "L": 4, "fused_ms": None, "torch_ms": None, "ratio": None, "fused_tflops": None,
                     "pct_matmul": None, "rel_err": err, "note": note})
        return {"ok": err < 1e-5, "matmul_tflops": None, "rows": rows}
    from growth_ds.kernels import kron_triton

    dtype = torch.bfloat16
    peak = kk.matmul_rate_tflops(dtype)
    cfg = kron_triton.gpu_config(dtype)
    t0 = time.time()
    ok = True
    for d in (1024, 2048, 4096, 8192):
        for n_layers in (12, 24, 48):
            if time.time() - t0 > budget_s:
                rows.append({"d": d, "L": n_layers, "note": "skipped: time budget"})
                continue
            l_src, p = n_layers // 2, d // 2
            try:
                g = torch.Generator(device="cuda").manual_seed(0)
                W = torch.randn(l_src, p, p, device="cuda", generator=g).to(dtype) / p ** 0.5
                D = torch.rand(n_layers, l_src, device="cuda", generator=g)
                B = torch.randn(n_layers, d, p, device="cuda", generator=g).to(dtype) / p ** 0.5
                A = torch.randn(n_layers, d, p, device="cuda", generator=g).to(dtype) / p ** 0.5
                with torch.no_grad():
                    fused = kron_expand(W, D, B, A, backend="triton")
                    ref = kk.torch_baseline(W, D, B, A)
                    err = float((fused.float() - ref.float()).abs().max() / ref.float().abs().max())
                    del fused, ref
                    t_fused = kk.cuda_time_ms(lambda: kron_expand(W, D, B, A, backend="triton"), 3)
                    t_torch = kk.cuda_time_ms(lambda: kk.torch_baseline(W, D, B, A), 3)
                useful = n_layers * kron_triton.forward_cost(d, p, p, d, l_src, cfg)["useful"]
                tf = useful / t_fused / 1e9
                rows.append({"d": d, "L": n_layers, "fused_ms": t_fused, "torch_ms": t_torch,
                             "ratio": t_torch / t_fused, "fused_tflops": tf, "torch_tflops": useful / t_torch / 1e9,
                             "pct_matmul": 100 * tf / peak, "rel_err": err})
                ok &= err < 2e-2
            except torch.cuda.OutOfMemoryError:
                rows.append({"d": d, "L": n_layers, "note": "out of memory"})
            finally:
                W = D = B = A = None
                torch.cuda.empty_cache()
    return {"ok": ok, "matmul_tflops": peak, "rows": rows}


# ---- train -------------------------------------------------------------------------------------------------
def _shapes(cpu: bool):
    if cpu:
        small = dict(flavour="gpt2", n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, d_ffn=64,
                     vocab_size=512, max_seq_len=32)
        large = dict(small, n_layers=4, d_model=48, n_heads=6, n_kv_heads=6, d_ffn=96)
        return small, large, dict(seq_len=32, micro_batch_size=4, steps=(8, 6), vocab=512, precision="fp32")
    small = dict(flavour="gpt2", n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, head_dim=64, d_ffn=3072,
                 vocab_size=2048, max_seq_len=1024)
    large = dict(small, n_layers=24, d_model=1024, n_heads=16, n_kv_heads=16, d_ffn=4096)
    return small, large, dict(seq_len=1024, micro_batch_size=8, steps=(40, 30), vocab=2048, precision="bf16")


def _train_config(out: Path, stage: int, cpu: bool) -> Path:
    import yaml

    small, large, t = _shapes(cpu)
    n0, n1 = t["steps"]
    cfg = {
        "run": {"name": f"gpu-check-z{stage}", "out_dir": str(out / f"z{stage}"), "seed": 0},
        "data": {"sources": [str(REPO / "tests" / "fixtures" / "corpus_excerpt.txt")], "vocab_size": t["vocab"],
                 "val_fraction": 0.3, "out_dir": str(out / "data")},
        "train": {"seq_len": t["seq_len"], "micro_batch_size": t["micro_batch_size"], "total_steps": n0 + n1,
                  "warmup_steps": 5, "lr": 3e-4, "schedule": "wsd", "decay_fraction": 0.2, "eval_every": n0,
                  "eval_batches": 1, "save_every": 10 ** 6, "log_every": 10, "weight_decay": 0.1, "grad_clip": 1.0},
        "deepspeed": {"zero_stage": stage, "precision": t["precision"]},
        "stages": [{"shape": small, "until": {"steps": n0}},
                   {"shape": large, "grow": {"width": "zero", "depth": "identity", "moments": "adjoint"}}],
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"z{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stage_rate(steps: list, stage: int, skip: int = 5):
    """Median tokens/s of a stage's steps after its first ``skip`` (compilation, allocator warm-up)."""
    xs = [r["tokens_per_s"] for r in steps if r["stage"] == stage][skip:]
    return statistics.median(xs) if xs else None


def section_train(cpu: bool, out: Path, env: dict, peak_tflops) -> dict:
    from growth_ds.shapes import ModelShape, flops_per_token
    from growth_ds.train.metrics import read_metrics

    small, large, t = _shapes(cpu)
    fpt = [flops_per_token(ModelShape.from_dict(s), t["seq_len"]) for s in (small, large)]
    rows, ok = [], True
    for stage in (1, 3):
        cfg = _train_config(out, stage, cpu)
        run_dir = out / f"z{stage}" / "run"
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "growth_ds.cli", "train", str(cfg), "--run-dir", str(run_dir),
                              "--no-progress", "--no-resume"], cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        row = {"zero": stage, "rc": res.returncode, "wall_s": wall}
        if res.returncode != 0:
            row["error"] = (res.stdout[-1500:] + res.stderr[-3000:]).strip()
            rows.append(row)
            ok = False
            continue
        recs = read_metrics(run_dir / "metrics.jsonl")
        steps = [r for r in recs if r.get("event") == "step"]
        growth = next(r for r in recs if r.get("event") == "growth")
        for s in (0, 1):
            rate = _stage_rate(steps, s, skip=2 if cpu else 5)
            row[f"tok_s_{s}"] = rate
            row[f"tflops_{s}"] = None if rate is None else rate * fpt[s] / 1e12
            if peak_tflops and rate is not None:
                row[f"mfu_{s}"] = 100 * rate * fpt[s] / 1e12 / peak_tflops
        row.update(growth_s=growth.get("seconds"), val_before=growth.get("val_loss_before"),
                   val_after=growth.get("val_loss_after"), executor=growth.get("executor", {}).get("kind"))
        losses = [r["train_loss"] for r in steps if r["stage"] == 1]
        row["stage1_loss_first_last"] = (losses[0], losses[-1]) if losses else None
        tol = 1e-4 if cpu else 2e-2  # lossless growth; bf16 weights round the grown values
        row["lossless"] = abs(row["val_after"] - row["val_before"]) <= tol * max(1.0, abs(row["val_before"]))
        ok &= row["lossless"]
        rows.append(row)
    return {"ok": ok, "rows": rows}


# ---- zero --------------------------------------------------------------------------------------------------
def section_zero(cpu: bool, out: Path, env: dict) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = 2 if cpu else 1
    dest = out / "zero"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ws), "--master_port", str(port),
           str(REPO / "tests" / "zero_worker.py"), str(dest), "cases", "sel=1:mini,2:mini,3:mini"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    row = {"world_size": ws, "rc": res.returncode, "wall_s": time.time() - t0}
    path = dest / f"cases_ws{ws}.json"
    if res.returncode != 0 or not path.exists():
        row["error"] = (res.stdout[-1500:] + res.stderr[-3000:]).strip()
        return {"ok": False, "rows": [row]}
    recs = json.loads(path.read_text())
    bad = [r["case"] + f" z{r['stage']}" for r in recs
           if not r.get("ok") or r.get("params") or r.get("exp_avg") or r.get("exp_avg_sq") or r.get("step")]
    row.update(growths=len(recs), bit_equal=len(recs) - len(bad), failed=bad[:8],
               seconds_grow=sum(r.get("t_grow", 0.0) for r in recs))
    return {"ok": not bad and bool(recs), "rows": [row]}


# ---- table -------------------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def table(res: dict) -> str:
    env = res["env"]
    lines = [f"# growth-ds GPU check ({'CPU mode' if res['cpu'] else env.get('device')})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, deepspeed {env.get('deepspeed')}, "
             f"python {env.get('python')}; {res['seconds']:.0f} s", ""]
    k = res["sections"].get("kernel", {})
    lines += [f"## Fused LiGO expansion vs torch, bf16 (dense bf16 matmul here: {_f(k.get('matmul_tflops'), '{:.0f}')} "
              "TFLOP/s)", "", "| d | L | fused ms | torch ms | torch/fused | fused TFLOP/s | % of matmul | rel err | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in k.get("rows", []):
        lines.append(f"| {r['d']} | {r['L']} | {_f(r.get('fused_ms'))} | {_f(r.get('torch_ms'))} | "
                     f"{_f(r.get('ratio'))} | {_f(r.get('fused_tflops'), '{:.0f}')} | {_f(r.get('pct_matmul'), '{:.0f}')} | "
                     f"{_f(r.get('rel_err'), '{:.1e}')} | {r.get('note', '')} |")
    if k.get("error"):
        lines.append(f"\nkernel section failed: `{k['error'][-300:]}`")
    tr = res["sections"].get("train", {})
    lines += ["", "## Trainer with an in-job growth (stage 0 -> grown stage 1)", "",
              "| ZeRO | tok/s stage 0 | MFU 0 % | tok/s stage 1 | MFU 1 % | growth s | val before | val after | "
              "lossless | rc |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in tr.get("rows", []):
        lines.append(f"| {r['zero']} | {_f(r.get('tok_s_0'), '{:,.0f}')} | {_f(r.get('mfu_0'), '{:.1f}')} | "
                     f"{_f(r.get('tok_s_1'), '{:,.0f}')} | {_f(r.get('mfu_1'), '{:.1f}')} | {_f(r.get('growth_s'))} | "
                     f"{_f(r.get('val_before'), '{:.4f}')} | {_f(r.get('val_after'), '{:.4f}')} | "
                     f"{r.get('lossless', '-')} | {r['rc']} |")
        if r.get("error"):
            lines.append(f"\nZeRO-{r['zero']} failed: `{r['error'][-400:]}`\n")
    if tr.get("error"):
        lines.append(f"\ntrain section failed: `{tr['error'][-300:]}`")
    z = res["sections"].get("zero", {})
    lines += ["", "## ZeRO executor == ops.grow, bit for bit", "", "| world size | growths | bit-equal | failed | rc |",
              "|---|---|---|---|---|"]
    for r in z.get("rows", []):
        lines.append(f"| {r['world_size']} | {r.get('growths', '-')} | {r.get('bit_equal', '-')} | "
                     f"{', '.join(r.get('failed', [])) or '-'} | {r['rc']} |")
        if r.get("error"):
            lines.append(f"\nzero section failed: `{r['error'][-400:]}`")
    if z.get("error"):
        lines.append(f"\nzero section failed: `{z['error'][-300:]}`")
    lines += ["", "sections: " + ", ".join(f"{n} {'ok' if s.get('ok') else 'FAILED'}"
                                           for n, s in res["sections"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (CI)")
    ap.add_argument("--wheels", default=None, help="install these wheels first (benchmarks/gpu_wheels.sh)")
    ap.add_argument("--out", default=None, help="directory for gpu_check.md / .json and the runs (default: a temp dir)")
    ap.add_argument("--sections", default="kernel,train,zero")
    ap.add_argument("--budget-s", type=float, default=240.0, help="time for the kernel sweep")
    a = ap.parse_args(argv)
    out = Path(a.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    site = None
    if a.wheels:
        site = str(out / "site")
        install_wheels(Path(a.wheels), Path(site))
        sys.path.insert(0, site)
    env = _env(site)
    if a.cpu:
        env["DS_ACCELERATOR"] = "cpu"
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before growth_ds.kernels.kron_triton is first imported
    import torch

    if not a.cpu and not torch.cuda.is_available():
        raise SystemExit("no GPU visible (torch.cuda.is_available() is False): run with --cpu")
    t0 = time.time()
    res = {"cpu": a.cpu, "env": {"python": sys.version.split()[0], "torch": torch.__version__}, "sections": {}}
    for mod in ("triton", "deepspeed"):
        try:
            res["env"][mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 (absent or broken: the table says so)
            res["env"][mod] = "absent"
    res["env"]["device"] = "cpu" if a.cpu else torch.cuda.get_device_name()
    peak = None if a.cpu else next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in res["env"]["device"]), None)
    for name in a.sections.split(","):
        t1 = time.time()
        try:
            if name == "kernel":
                sec = section_kernel(a.cpu, a.budget_s)
            elif name == "train":
                sec = section_train(a.cpu, out / "train", env,
                                    peak or res["sections"].get("kernel", {}).get("matmul_tflops"))
            elif name == "zero":
                sec = section_zero(a.cpu, out, env)
            else:
                raise SystemExit(f"--sections: unknown {name!r} (kernel, train, zero)")
        except Exception:  # noqa: BLE001 (one section's failure is a row of the table)
            sec = {"ok": False, "error": traceback.format_exc()}
        sec["seconds"] = time.time() - t1
        res["sections"][name] = sec
        print(f"{name}: {'ok' if sec['ok'] else 'FAILED'} ({sec['seconds']:.0f} s)", flush=True)
    res["seconds"] = time.time() - t0
    res["mfu_peak_tflops"] = peak
    text = table(res)
    print(text)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    return 0 if all(s.get("ok") for s in res["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

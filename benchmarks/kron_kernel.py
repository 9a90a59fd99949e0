"""Fused LiGO expansion kernel vs torch (einsum depth mix + two matmuls).

Growth (L/2 layers, width d/2) -> (L layers, width d) for one square weight kind:
W: [L/2, d/2, d/2], D: [L, L/2], B, A: [L, d, d/2] (per layer), output [L, d, d].

GPU (torch.cuda.is_available()): for d in --dims and L in --layers, times the fused Triton
forward (the slab kernel, the default, and the tile kernel) and the torch baseline in the same dtype
(cuBLAS, fp32 accumulate), and prints ms, useful TFLOP/s (FLOPs of the cheaper two-matmul association
+ depth mix), bandwidth (minimal bytes: read W, D, B, A once, write the output once), torch/fused time
ratio (> 1: fused is faster; target >= 1.3) and the % of the dense matmul rate measured in this run
(8192^3 torch.mm; target >= 60% at large d). Each config is run for the full weight and for a thin row
fragment (--fragment-rows, what a sharded executor builds). Before timing, it prints the work model
(kron_triton.forward_cost): executed tensor-core FLOPs over useful ones for both kernels.

CPU: no timings. Runs the Triton interpreter (TRITON_INTERPRET=1) correctness check on small
shapes against the reference and says that no GPU was available.

    python benchmarks/kron_kernel.py [--dims 1024 2048 4096 8192] [--layers 12 24 48]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

DEVICE = "cuda"


def torch_baseline(W, D, B, A):
    """einsum + two batched matmuls in the input dtype (what the kernel replaces)."""
    w_mix = torch.einsum("lj,jpq->lpq", D.to(W.dtype), W)  # (L2, P, Q)
    r, (p, q), n = B.shape[-2], W.shape[1:], A.shape[-2]
    if r * q * (p + n) <= p * n * (q + r):
        return torch.bmm(torch.bmm(B, w_mix), A.transpose(1, 2))
    return torch.bmm(B, torch.bmm(w_mix, A.transpose(1, 2)))


def cuda_time_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_rate_tflops(dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    ms = cuda_time_ms(lambda: a @ b, reps, warmup=3)
    return 2 * n**3 / ms / 1e9


def _row_cases(args, d: int) -> list[int]:
    """Output rows to build: the full weight, plus a thin fragment if --fragment-rows > 0."""
    return [d] + ([args.fragment_rows] if 0 < args.fragment_rows < d else [])


def run_gpu(args) -> None:
    from growth_ds.kernels import kron_expand, kron_triton

    dtype = getattr(torch, args.dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    peak = matmul_rate_tflops(dtype)
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}  "
          f"dense {args.dtype} matmul (8192^3): {peak:.1f} TFLOP/s")
    cfg = kron_triton.gpu_config(dtype)
    print_cost_model(args, kron_triton)
    head = (f"{'d':>5} {'L':>3} {'rows':>5} | {'fused ms':>9} {'tile ms':>8} {'torch ms':>9} {'ratio':>6} | "
            f"{'fused TF/s':>10} {'%mm':>5} {'GB/s':>7} | {'torch TF/s':>10} {'%mm':>5} | "
            f"{'rel err':>8}")
    print(head)
    print("-" * len(head))
    for d in args.dims:
        for n_layers in args.layers:
            l_src, p = n_layers // 2, d // 2
            need = size * (l_src * p * p + 3 * n_layers * d * p + 2 * n_layers * d * d
                           + n_layers * p * p)
            if need > 0.85 * torch.cuda.mem_get_info()[0]:
                print(f"{d:>5} {n_layers:>3} | skipped: needs ~{need / 2**30:.1f} GiB")
                continue
            g = torch.Generator(device=DEVICE).manual_seed(0)
            W = torch.randn(l_src, p, p, device=DEVICE, generator=g).to(dtype) / p**0.5
            D = torch.rand(n_layers, l_src, device=DEVICE, generator=g)
            B = torch.randn(n_layers, d, p, device=DEVICE, generator=g).to(dtype) / p**0.5
            A = torch.randn(n_layers, d, p, device=DEVICE, generator=g).to(dtype) / p**0.5
            for r in _row_cases(args, d):
                b_rows = B[:, :r]
                try:
                    with torch.no_grad():
                        fused = kron_expand(W, D, B, A, rows=(0, r), backend="triton")
                        ref = torch_baseline(W, D, b_rows, A)
                        err = ((fused.float() - ref.float()).abs().max()
                               / ref.float().abs().max()).item()
                        del fused, ref
                        t_fused = cuda_time_ms(
                            lambda: kron_expand(W, D, B, A, rows=(0, r), backend="triton"),
                            args.reps)
                        t_tile = cuda_time_ms(
                            lambda: kron_triton.kron_forward(W, D, B, A, 0, r, kernel="tile"),
                            args.reps)
                        t_torch = cuda_time_ms(lambda: torch_baseline(W, D, b_rows, A),
                                               args.reps)
                except torch.cuda.OutOfMemoryError:
                    print(f"{d:>5} {n_layers:>3} {r:>5} | out of memory")
                    continue
                finally:
                    torch.cuda.empty_cache()
                useful = n_layers * kron_triton.forward_cost(r, p, p, d, l_src, cfg)["useful"]
                bytes_min = size * (l_src * p * p + n_layers * (r * p + d * p + r * d))
                tf_fused, tf_torch = useful / t_fused / 1e9, useful / t_torch / 1e9
                print(f"{d:>5} {n_layers:>3} {r:>5} | {t_fused:>9.2f} {t_tile:>8.2f} {t_torch:>9.2f} "
                      f"{t_torch / t_fused:>6.2f} | {tf_fused:>10.1f} "
                      f"{100 * tf_fused / peak:>5.1f} {bytes_min / t_fused / 1e6:>7.0f} | "
                      f"{tf_torch:>10.1f} {100 * tf_torch / peak:>5.1f} | {err:>8.1e}")
            del W, D, B, A


def print_cost_model(args, kron_triton) -> None:
    """Work model of the fused forward for the benchmark grid (no timing; any machine)."""
    dtype = getattr(torch, args.dtype)
    cfg = kron_triton.gpu_config(dtype)
    print(f"work model per layer with GPU tiles {cfg.block_i}x{cfg.block_k} ({args.dtype}), 264 programs "
          "(H100); useful = einsum + cheaper 2-matmul association; dot = tensor-core FLOPs a kernel "
          "executes; mix = its CUDA-core depth-mix FLOPs")
    print(f"{'d':>5} {'L':>3} {'rows':>5} | {'useful GF':>9} | {'slab dot/u':>10} {'mix/u':>6} {'split':>5} | "
          f"{'tile dot/u':>10} {'mix/u':>6}")
    for d in args.dims:
        for n_layers in args.layers:
            for r in _row_cases(args, d):
                c = kron_triton.forward_cost(r, d // 2, d // 2, d, n_layers // 2, cfg, n_layers=n_layers)
                u = c["useful"]
                print(f"{d:>5} {n_layers:>3} {r:>5} | {u / 1e9:>9.1f} | {c['slab_dot'] / u:>10.2f} "
                      f"{c['slab_mix'] / u:>6.2f} {c['split']:>5} | {c['dot'] / u:>10.2f} {c['mix'] / u:>6.2f}")


def run_cpu_check(args) -> None:
    print("no GPU available (torch.cuda.is_available() is False): no timings; running the "
          "Triton interpreter correctness check on small shapes instead")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kron_triton is first imported
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from growth_ds.kernels import kron_expand, kron_expand_reference, triton_available

    if not triton_available():
        print("triton is not importable: only the torch reference is available")
        return
    from growth_ds.kernels import kron_triton

    print_cost_model(args, kron_triton)
    if not kron_triton.is_interpreter():
        print("kron_triton was defined without TRITON_INTERPRET=1: cannot run on CPU")
        return
    l_src, l_tgt, p, q, m, n = 2, 3, 40, 24, 72, 56
    print(f"W [{l_src},{p},{q}]  D [{l_tgt},{l_src}]  B [({l_tgt}),{m},{p}]  "
          f"A [({l_tgt}),{n},{q}]  rows (5, 61)")
    for dtype in (torch.float32, torch.bfloat16):
        for shared in (False, True):
            g = torch.Generator().manual_seed(0)
            lead = () if shared else (l_tgt,)
            inputs = [torch.randn(l_src, p, q, generator=g).to(dtype),
                      torch.randn(l_tgt, l_src, generator=g),
                      torch.randn(*lead, m, p, generator=g).to(dtype),
                      torch.randn(*lead, n, q, generator=g).to(dtype)]
            grad_out = torch.randn(l_tgt, 56, n, generator=g).to(dtype)
            results = []
            for fn in (lambda *t: kron_expand(*t, rows=(5, 61), backend="triton"),
                       lambda *t: kron_expand_reference(*t, rows=(5, 61))):
                leaves = [x.clone().requires_grad_() for x in inputs]
                out = fn(*leaves)
                (out.float() * grad_out.float()).sum().backward()
                results.append([out] + [x.grad for x in leaves])
            errs = [((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                    for a, b in zip(*results)]
            names = ["out", "dW", "dD", "dB", "dA"]
            print(f"  {str(dtype):>15} {'shared B/A' if shared else 'per-layer B/A':>13}: "
                  + "  ".join(f"{k} {e:.1e}" for k, e in zip(names, errs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16",
                                                                 "float32"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--fragment-rows", type=int, default=128,
                        help="also build a row fragment W'[:, :rows] (0: full weights only)")
    args = parser.parse_args()
    if torch.cuda.is_available():
        run_gpu(args)
    else:
        run_cpu_check(args)


if __name__ == "__main__":
    main()

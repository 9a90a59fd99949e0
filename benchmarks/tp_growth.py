"""Tensor-parallel growth of a megatron-core GPTModel: per-rank shard growth vs gather-grow-scatter.

    python benchmarks/tp_growth.py                 # launches itself with torchrun, 2 gloo ranks (CPU)
    python benchmarks/tp_growth.py --sizes 256,512 --method lemon+identity --tp 2

For each model size (d_model = d, d_ffn = 4 d, heads of 32, GQA 2:1, 2 layers, llama flavour, vocab
4096) a small model with AdamW state is grown to 2x width and +1 layer, two ways:

* ``local``  -- :func:`growth_ds.interop.megatron.grow_gpt_model`: every rank grows its own shards
  (parameters and both Adam moments) under the TP-aware plan; no communication.
* ``gather`` -- the baseline a TP-unaware tool needs: all-gather every parameter and moment onto each
  rank, grow the full state with the reference executor, build the grown model and keep the rank's
  slice (the scatter is local slicing, so this baseline is *cheaper* than a real one with a
  scatter from rank 0).

Reported per mode: wall time (max over ranks), per-rank peak resident memory above the baseline
(``/proc/self/status`` VmHWM after resetting it with ``/proc/self/clear_refs``; glibc is told to
mmap every block over 4 MiB so freed tensors leave RSS), and bytes all-gathered per rank.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _mem():
    """(VmRSS, VmHWM) of this process in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    return out["VmRSS"], out["VmHWM"]


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _GatherBytes:
    """Counts bytes received by torch.distributed.all_gather on this rank while active."""

    def __enter__(self):
        import torch.distributed as dist

        self.bytes, self._orig = 0, dist.all_gather

        def all_gather(tensor_list, tensor, *args, **kwargs):
            self.bytes += sum(t.numel() * t.element_size() for t in tensor_list)
            return self._orig(tensor_list, tensor, *args, **kwargs)

        dist.all_gather = all_gather
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_gather = self._orig


def shapes(d):
    from growth_ds.shapes import ModelShape

    heads = d // 32
    small = ModelShape(flavour="llama", n_layers=2, d_model=d, n_heads=heads, n_kv_heads=heads // 2, head_dim=32,
                       d_ffn=4 * d, vocab_size=4096, max_seq_len=128, tied_embeddings=False)
    large = ModelShape(**{**small.to_dict(), "n_layers": 3, "d_model": 2 * d, "n_heads": 2 * heads,
                          "n_kv_heads": heads, "d_ffn": 8 * d})
    return small, large


def _small_model(small):
    import torch

    from growth_ds.interop import megatron as gm

    model = gm.build_gpt_model(small, perform_initialization=False)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.randn(p.shape, generator=g) * 1e-3,
                            "exp_avg_sq": torch.rand(p.shape, generator=g) * 1e-6}
    return model, opt


def grow_local(model, opt, plan):
    from growth_ds.interop import megatron as gm

    grown = gm.grow_gpt_model(model, opt, plan)
    return grown.model, grown.optimizer


def grow_gather(model, opt, plan):
    import torch

    from growth_ds.distributed.tensor_parallel import make_tp_plan
    from growth_ds.interop import megatron as gm
    from growth_ds.ops import grow
    from megatron.core import parallel_state as ps

    tpp = make_tp_plan(plan, ps.get_tensor_model_parallel_world_size())  # same result as the local path
    full = gm.to_reference_state(model, opt)                              # gather
    grown = grow(full, tpp.plan)                                          # grow
    del full
    new = gm.build_gpt_model(grown.shape, config=gm.grow_config(model.config, grown.shape))
    new_opt = torch.optim.AdamW(new.parameters(), lr=1e-3)
    gm.load_reference_state(new, grown, new_opt)                          # scatter (keep this rank's slice)
    return new, new_opt


def worker(args):
    import torch
    import torch.distributed as dist

    from growth_ds.interop import megatron as gm
    from growth_ds.ops import make_plan
    from growth_ds.cli import _parse_methods

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    gm.ensure_model_parallel(args.tp)
    rank = dist.get_rank()
    width, depth = _parse_methods(args.method)
    rows = []
    for d in [int(s) for s in args.sizes.split(",")]:
        small, large = shapes(d)
        plan = make_plan(small, large, width=width, depth=depth, seed=0)
        row = {"d_model": d, "small_params": small.n_params, "large_params": large.n_params}
        results = {}
        for mode, fn in (("local", grow_local), ("gather", grow_gather)):
            model, opt = _small_model(small)
            dist.barrier()
            rss0, _ = _mem()
            _reset_peak()
            t0 = time.perf_counter()
            with _GatherBytes() as gathered:
                new, new_opt = fn(model, opt, plan)
            dist.barrier()
            seconds = time.perf_counter() - t0
            _, hwm = _mem()
            results[mode] = new
            row[mode] = {"seconds": seconds, "peak_mib": hwm - rss0, "gathered_mib": gathered.bytes / 2 ** 20}
            del model, opt, new_opt
        same = all(torch.equal(a, b) for a, b in zip(results["local"].parameters(), results["gather"].parameters()))
        row["identical"] = same
        del results
        stats = [None] * dist.get_world_size()
        dist.all_gather_object(stats, row)
        if rank == 0:
            merged = dict(stats[0])
            for mode in ("local", "gather"):
                merged[mode] = {k: max(s[mode][k] for s in stats) for k in stats[0][mode]}
            merged["identical"] = all(s["identical"] for s in stats)
            rows.append(merged)
    if rank == 0:
        print(json.dumps(rows))
    dist.destroy_process_group()


def report(rows, tp, method):
    print(f"TP={tp}, {method}, llama flavour, 2x width + 1 layer, fp32 params + AdamW moments; "
          f"max over ranks")
    head = (f"{'d_model':>7} {'params small->large':>22} | {'local s':>8} {'gather s':>8} {'ratio':>6} | "
            f"{'local MiB':>9} {'gather MiB':>10} {'ratio':>6} | {'gathered MiB/rank':>17} | identical")
    print(head)
    print("-" * len(head))
    for r in rows:
        lo, ga = r["local"], r["gather"]
        print(f"{r['d_model']:>7} {r['small_params'] / 1e6:>9.2f}M -> {r['large_params'] / 1e6:>7.2f}M | "
              f"{lo['seconds']:>8.2f} {ga['seconds']:>8.2f} {ga['seconds'] / lo['seconds']:>5.1f}x | "
              f"{lo['peak_mib']:>9.0f} {ga['peak_mib']:>10.0f} {ga['peak_mib'] / max(lo['peak_mib'], 1):>5.1f}x | "
              f"{lo['gathered_mib']:>6.0f} vs {ga['gathered_mib']:>6.0f} | {r['identical']}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="256,512,768", help="comma-separated d_model values")
    p.add_argument("--method", default="lemon+identity")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="4194304")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.tp), "--master_addr",
           "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000), os.path.abspath(__file__), "--worker",
           "--sizes", args.sizes, "--method", args.method, "--tp", str(args.tp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        return proc.returncode or 1
    report(json.loads(lines[-1]), args.tp, args.method)
    return 0


if __name__ == "__main__":
    sys.exit(main())

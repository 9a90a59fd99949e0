"""ZeRO-sharded growth vs gather-grow-repartition: per-rank peak memory, time, effective bandwidth.

    python benchmarks/zero_growth.py [--sizes 10M,50M,200M] [--method duplicate+identity] [--stage 3]
                                     [--precision fp32|bf16]

Runs itself under ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU). For each size (parameters of
the *grown* model) it builds a ZeRO engine of the small model whose partitions hold random weights and
Adam moments, a grown engine (ZeRO-3: under zero.Init), and grows it twice:

* **executor**: ``growth_ds.distributed.zero.grow_engine`` -- every rank computes its own new slices from
  the old elements it needs, exchanged with one all-to-all per bucket;
* **gather**: ``gather_grow`` -- one full old parameter gathered on every rank, grown with the reference,
  every rank keeps its slice (the trainer's original path).

The exchange goes through shared memory when both ranks are on this host (``GROWTH_DS_ZERO_TRANSPORT=
collective`` forces the all-to-all, what a multi-node job uses). Reported per rank (worst rank): wall time
of the first growth (what a job pays: cold caches, first calls) and, for the executor, the best of three
growths (the memcpy is the best of three too); peak memory as *tensor bytes allocated during growth*
(TensorAccountant) on top of the rank's old + new slices (fp32 master + exp_avg + exp_avg_sq), and as
the resident-set high-water mark during growth over the resident set before it; effective bandwidth =
bytes of new state written (the rank's slices of the fp32 master, the 2 moments and the low-precision
weights the forward pass uses, all of which the executor writes) per second, against a memcpy of the same
number of bytes measured in the same run (the C library's memmove through a 64 MiB window, same process,
both ranks at once; torch's ``copy_``, which is slower here, is printed beside it); the ratio against
master + moments alone is printed as well. Targets from the issue: peak <= 1.5x (old slice + new slice),
time <= 3x that memcpy.

A *floor* run comes last (``--no-floor`` skips it): the 10M case's parameter kinds and layers at 1/12 of
its elements, grown the same way. Its time is what a growth costs whatever its size (index math, the
schedule, one synchronisation per round, Python per piece); the closing summary splits each size's time
(best of 3) into that fixed cost and the rest, which scales with the bytes written.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

SIZES = {  # grown model ~ N parameters: (small, grown) llama shapes, width x2 and deeper
    "10M": (dict(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, d_ffn=512, n_layers=6, vocab_size=8192),
            dict(d_model=256, n_heads=8, n_kv_heads=4, d_ffn=1024, n_layers=8)),
    "50M": (dict(d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_ffn=1024, n_layers=8, vocab_size=16384),
            dict(d_model=512, n_heads=8, n_kv_heads=4, d_ffn=2048, n_layers=11)),
    "200M": (dict(d_model=512, n_heads=8, n_kv_heads=4, head_dim=64, d_ffn=2048, n_layers=8, vocab_size=32000),
             dict(d_model=1024, n_heads=16, n_kv_heads=8, d_ffn=4096, n_layers=11)),
    # the fixed cost: the 10M case's kinds, layers and about its number of rounds, at 1/12 of its elements
    "floor": (dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ffn=128, n_layers=6, vocab_size=4096),
              dict(d_model=64, n_heads=8, n_kv_heads=4, d_ffn=256, n_layers=8)),
}
TRAIN = dict(micro_batch_size=1, grad_accum=1, grad_clip=0.0, weight_decay=0.1, lr=1e-3, betas=[0.9, 0.95],
             eps=1e-8)


def shapes(size):
    from growth_ds.shapes import ModelShape

    small_kw, grow_kw = SIZES[size]
    small = ModelShape(flavour="llama", max_seq_len=16, tied_embeddings=True, **small_kw)
    return small, dataclasses.replace(small, **grow_kw)


def memcpy_seconds(nbytes: int, window: int = 64 << 20, how: str = "libc") -> float:
    """Seconds to copy ``nbytes`` through a ``window``-byte buffer pair (touched first): ``how="libc"`` is
    the C library's ``memmove`` (what "memcpy" means: on large copies it streams the stores past the cache),
    ``how="torch"`` is ``Tensor.copy_`` (ordinary stores; 1.2-1.7x slower than libc here), shown for context."""
    import ctypes

    import torch

    n = window // 4
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)  # touch
    s, d = src.data_ptr(), dst.data_ptr()
    left, t0 = nbytes, time.perf_counter()
    while left > 0:
        k = min(n, left // 4) or 1
        if how == "libc":
            ctypes.memmove(d, s, 4 * k)
        else:
            dst[:k].copy_(src[:k])
        left -= 4 * k
    return time.perf_counter() - t0


def worker(args):
    import torch

    from growth_ds.distributed.zero import ZeroLayout, gather_grow, grow_engine
    from growth_ds.distributed.zero.memory import TensorAccountant, malloc_trim, rss_peak_window
    from growth_ds.models import build_model
    from growth_ds.cli import _parse_methods
    from growth_ds.ops import make_plan
    from growth_ds.train import deepspeed_engine as dse

    dse.init_distributed()
    dist = dse.dist
    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    width, depth = _parse_methods(args.method)
    results = []

    def engine(shape, fresh):
        cfg = dse.ds_config(TRAIN, {"zero_stage": args.stage, "precision": args.precision},
                            stage3_persist_threshold=0)
        model = build_model(shape, seed=0) if fresh else dse.construct_model(shape, args.stage, cfg)
        rank_of = lambda p: len(getattr(p, "ds_shape", p.shape))  # noqa: E731
        groups = [{"params": [p for p in model.parameters() if rank_of(p) >= 2], "weight_decay": 0.1},
                  {"params": [p for p in model.parameters() if rank_of(p) < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1e-3)
        import deepspeed

        return deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]

    def batch(shape):
        t = torch.randint(0, shape.vocab_size, (1, shape.max_seq_len + 1))
        return t[:, :-1], t[:, 1:]

    sizes = args.sizes.split(",")
    # the floor run last, so that every size's first growth stays the first in its process
    for size in sizes + (["floor"] if args.floor and "floor" not in sizes else []):
        small, large = shapes(size)
        plan = make_plan(small, large, width=width, depth=depth, seed=0, moments="adjoint")
        old = engine(small, fresh=True)
        dse.materialise_optimizer_state(old, batch(small))
        lay = ZeroLayout(old)
        for slot in lay.slots.values():  # random weights and moments in every rank's own slices
            slot.views[0].normal_(0, 0.02)
            slot.views[1].normal_(0, 1e-3)
            slot.views[2].uniform_(0, 1e-6)
        dse.set_step(old, 10)
        new = engine(plan.grown_shape, fresh=False)
        dse.materialise_optimizer_state(new, batch(plan.grown_shape))
        old_slice = 12 * lay.local_numel()
        new_slice = 12 * ZeroLayout(new).local_numel()
        rec = {"size": size, "n_params_grown": plan.grown_shape.n_params, "n_params_small": small.n_params,
               "ws": ws, "stage": args.stage, "precision": args.precision, "method": args.method,
               "old_slice_bytes": old_slice, "new_slice_bytes": new_slice}
        for path in ("executor", "gather"):
            if path == "gather" and (args.skip_gather or size == "floor"):
                continue
            fn = (lambda: grow_engine(old, new, plan, prefetch=args.prefetch, bucket_elems=args.bucket)) if path == "executor" else \
                (lambda: gather_grow(old, new, plan))
            gc.collect()
            malloc_trim()
            dist.barrier()
            with rss_peak_window() as win:
                t0 = time.perf_counter()
                out = fn()
                dist.barrier()
                secs = time.perf_counter() - t0
            repeats = []  # executor: two more timed runs (growth is idempotent: same old, same new engine)
            for _ in range(2 if path == "executor" else 0):
                gc.collect()
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                repeats.append(time.perf_counter() - t0)
            gc.collect()
            malloc_trim()
            dist.barrier()
            with TensorAccountant() as acct:  # one more run, for the tensor accounting
                fn()
            acct.finish()
            if args.profile and path == "executor" and rank == int(os.environ.get("PROF_RANK", "0")):  # a third, under cProfile
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.runcall(fn)
                pstats.Stats(prof).sort_stats(os.environ.get("PROF_SORT", "tottime")).print_stats(int(os.environ.get("PROF_N", "20")))
            elif args.profile and path == "executor":
                fn()
            dist.barrier()
            rec[path] = {"seconds": secs, "best_seconds": min([secs] + repeats), "rss_before": win["before"],
                         "rss_peak": win["peak"],
                         "rss_reset": win["reset"], "tracked_peak": acct.peak}
            if path == "executor":
                rec[path].update(rounds=out.rounds, bytes_sent=out.bytes_sent, new_state_bytes=out.new_state_bytes,
                                 master_state_bytes=out.master_state_bytes,
                                 exchange_s=out.seconds_exchange, compute_s=out.seconds_compute,
                                 setup_s=out.seconds_setup, refresh_s=out.seconds_refresh,
                                 transport=out.transport, pack_s=out.seconds_pack, sync_s=out.seconds_wait,
                                 bucket=int(out.extra.get("bucket_elems", 0)), pieces=out.pieces,
                                 stacked=out.stacked_pieces)
        nbytes = rec["executor"]["new_state_bytes"]
        for how in ("libc", "torch"):  # best of three, both ranks at once (as they grow)
            secs = []
            for _ in range(3):
                dist.barrier()
                secs.append(memcpy_seconds(nbytes, how=how))
            rec["memcpy_seconds" if how == "libc" else "torch_copy_seconds"] = min(secs)
        gathered = [None] * ws
        dist.all_gather_object(gathered, rec)
        if rank == 0:
            results.append(gathered)
            report(gathered)
        for e in (new, old):
            dse.release_engine(e)
        del old, new, lay
        gc.collect()
        malloc_trim()
    if rank == 0 and any(per_rank[0]["size"] == "floor" for per_rank in results):
        report_fixed_cost(results)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def report(per_rank):
    r0 = per_rank[0]
    mib = 2 ** 20
    print(f"\n== {r0['size']}: {r0['n_params_small'] / 1e6:.1f}M -> {r0['n_params_grown'] / 1e6:.1f}M params, "
          f"{r0['method']}, ZeRO-{r0['stage']}, {r0['precision']} weights, {r0['ws']} ranks", flush=True)
    slices = max(r["old_slice_bytes"] + r["new_slice_bytes"] for r in per_rank)
    memcpy = max(r["memcpy_seconds"] for r in per_rank)
    nbytes = max(r["executor"]["new_state_bytes"] for r in per_rank)
    master = max(r["executor"]["master_state_bytes"] for r in per_rank)
    print(f"   per rank: old+new slices {slices / mib:.0f} MiB; new state written {nbytes / mib:.0f} MiB "
          f"(fp32 master + moments {master / mib:.0f} MiB, low-precision weights {(nbytes - master) / mib:.0f} MiB); "
          f"memcpy of that {memcpy:.3f}s ({nbytes / memcpy / 2**30:.2f} GiB/s; libc memmove, both ranks at "
          f"once; torch's copy_ takes {max(r['torch_copy_seconds'] for r in per_rank):.3f}s)")
    for path in ("executor", "gather"):
        if path not in r0:
            continue
        secs = max(r[path]["seconds"] for r in per_rank)
        tracked = max(r[path]["tracked_peak"] for r in per_rank)
        rss_ratio = max(r[path]["rss_peak"] / r[path]["rss_before"] for r in per_rank)
        ratio = (slices + tracked) / slices
        extra = ""
        if path == "executor":
            ex = max(r[path]["exchange_s"] for r in per_rank)
            co = max(r[path]["compute_s"] for r in per_rank)
            sent = max(r[path]["bytes_sent"] for r in per_rank)
            su = max(r[path]["setup_s"] for r in per_rank)
            rf = max(r[path]["refresh_s"] for r in per_rank)
            pk = max(r[path]["pack_s"] for r in per_rank)
            sy = max(r[path]["sync_s"] for r in per_rank)
            best = max(r[path]["best_seconds"] for r in per_rank)
            extra = (f"; best of 3 runs {best:.3f}s = {best / memcpy:.1f}x memcpy"
                     f"; {secs / (memcpy * master / nbytes):.1f}x a memcpy of master + moments alone"
                     f"; {r0[path]['transport']} transport, rounds {r0[path]['rounds']} (bucket {r0[path]['bucket']}), "
                     f"pieces {r0[path]['pieces']} ({r0[path]['stacked']} stacked), setup {su:.3f}s, "
                     f"exchange {ex:.3f}s (pack {pk:.3f}s, waits {sy:.3f}s), compute {co:.3f}s, "
                     f"refresh {rf:.3f}s, sent {sent / mib:.0f} MiB")
        target = " [target <= 3x]" if path == "executor" else ""
        print(f"   {path:8s}: {secs:7.3f}s = {secs / memcpy:6.1f}x memcpy{target}, {nbytes / secs / 2**30:.2f} GiB/s; "
              f"peak = slices + {tracked / mib:.1f} MiB allocated = {ratio:.3f}x (old+new slices) "
              f"[target <= 1.5x]; RSS peak/before {rss_ratio:.3f}{extra}", flush=True)
    if "gather" in r0:
        ex, ga = (max(r[p]["seconds"] for r in per_rank) for p in ("executor", "gather"))
        tex, tga = (max(r[p]["tracked_peak"] for r in per_rank) for p in ("executor", "gather"))
        print(f"   executor vs gather: {ga / ex:.2f}x faster, {tga / max(tex, 1):.1f}x less memory allocated",
              flush=True)


def report_fixed_cost(results):
    """Each size's executor time (best of 3) split into the floor run's (what any growth costs: index math, the
    schedule, a synchronisation per round, Python per piece, ~100 pieces here) and the rest, which scales with
    the bytes written; both against the size's memcpy."""
    best = lambda per_rank: max(r["executor"]["best_seconds"] for r in per_rank)  # noqa: E731
    floor = next(per_rank for per_rank in results if per_rank[0]["size"] == "floor")
    fixed = best(floor)
    print(f"\n== fixed cost of a growth: the floor run ({floor[0]['n_params_grown'] / 1e6:.1f}M params, "
          f"{floor[0]['executor']['rounds']} rounds, {floor[0]['executor']['pieces']} pieces) takes {fixed:.3f}s "
          f"(best of 3)", flush=True)
    for per_rank in results:
        if per_rank is floor:
            continue
        t, memcpy = best(per_rank), max(r["memcpy_seconds"] for r in per_rank)
        rest = max(t - fixed, 0.0)
        print(f"   {per_rank[0]['size']:>5s}: best {t:.3f}s = {t / memcpy:.1f}x memcpy = fixed {fixed / memcpy:.1f}x "
              f"+ the rest {rest / memcpy:.1f}x ({rest:.3f}s)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10M,50M,200M")
    ap.add_argument("--method", default="duplicate+identity")
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="the low-precision weights the forward pass uses (the masters and moments are fp32)")
    ap.add_argument("--skip-gather", action="store_true")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the floor run (a 0.8M-parameter growth, last: the fixed cost of a growth)")
    ap.add_argument("--prefetch", action="store_true", help="executor: overlap the next all-to-all with compute")
    ap.add_argument("--bucket", type=int, default=None, help="executor: new elements per rank per round "
                    "(default: grow_engine's automatic bucket)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print rank 0's cProfile of one executor growth")
    args = ap.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # the workers' arguments, rebuilt: not --nproc, which torchrun would take for its own option
    forward = ["--sizes", args.sizes, "--method", args.method, "--stage", str(args.stage), "--precision",
               args.precision]
    forward += [f"--{k.replace('_', '-')}" for k in ("skip_gather", "prefetch", "profile") if getattr(args, k)]
    forward += [] if args.floor else ["--no-floor"]
    forward += ["--json", args.json] if args.json else []
    forward += ["--bucket", str(args.bucket)] if args.bucket else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
           str(port), os.path.abspath(__file__)] + forward
    sys.exit(subprocess.call(cmd, env=env, cwd=REPO))


if __name__ == "__main__":
    main()

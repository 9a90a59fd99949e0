"""Worker for tests/test_zero_growth.py: ZeRO-sharded growth on gloo processes (CPU).

    torchrun --nproc_per_node N tests/zero_worker.py OUT_DIR TASK[,TASK...] [key=value ...]

Tasks (run in order, all ranks):

* ``cases``      every growth case under ``stages`` (default 1,2,3): a ZeRO engine of the small shape holding a
                 random training state, grown with ``grow_engine`` into a grown engine; the partitions, gathered
                 afterwards, are compared bit for bit with ``growth_ds.ops.grow`` on the full state (params,
                 exp_avg, exp_avg_sq, step, low-precision weights); the tensor memory allocated during growth
                 is measured; one optimizer step after growth is compared with the unsharded reference's step.
                 Writes ``cases_ws{N}.json``.
* ``leak``       ZeRO-3: three growths in a chain (old engines must be collected) and three grow-and-release
                 cycles of the same size (resident memory must stay flat). Writes ``leak.json``.
* ``save``       trains a small ZeRO-2 engine a few steps and saves a DeepSpeed checkpoint the way the trainer
                 does, plus the gathered full state as the oracle (``src_ckpt/``, ``src_state.pt``).
* ``load``       loads the offline-grown universal checkpoint ``grown_uc/`` into a grown engine at this world
                 size and ``load_stage``; compares with ``ops.grow`` of the oracle; checks that a checkpoint whose
                 shapes do not match the target model is refused with the parameter's name. Writes ``load_ws{N}.json``.
* ``job``        a staged job in miniature (train, pre-growth checkpoint, grow, train) that resumes from the
                 pre-growth checkpoint when relaunched; ``run=NAME``. Writes ``NAME/final.json``.
"""
import gc
import hashlib
import json
import os
import sys
import time
import traceback
import weakref

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from growth_ds.train import deepspeed_engine as dse  # noqa: E402

dist = dse.dist
TRAIN = dict(micro_batch_size=2, grad_accum=1, grad_clip=0.0, weight_decay=0.1, lr=1e-3, betas=[0.9, 0.95],
             eps=1e-8)
SEED = 11


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def config(stage, precision="fp32", persist0=True):
    return dse.ds_config(TRAIN, {"zero_stage": stage, "precision": precision},
                         stage3_persist_threshold=0 if persist0 else None)


def make_engine(shape, stage, precision="fp32", fresh=True, persist0=True):
    from growth_ds.models import build_model

    cfg = config(stage, precision, persist0)
    model = build_model(shape, seed=SEED) if fresh else dse.construct_model(shape, stage, cfg)
    return dse.build_engine(model, TRAIN, cfg)


def batch_for(shape, seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, shape.vocab_size, (B, shape.max_seq_len + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def random_state(shape, seed, step=3):
    """A training state with random norms, biases and moments (same on every rank)."""
    from growth_ds.models.schema import param_shape, parameter_schema
    from growth_ds.ops.state import TrainingState

    g = torch.Generator().manual_seed(seed)
    params, m, v = {}, {}, {}
    for name, spec in parameter_schema(shape).items():
        shp = param_shape(shape, spec)
        if spec.role == "norm":
            params[name] = 1 + 0.2 * torch.randn(shp, generator=g)
        elif spec.role in ("bias", "norm_bias"):
            params[name] = 0.1 * torch.randn(shp, generator=g)
        else:
            params[name] = 0.1 * torch.randn(shp, generator=g)
        m[name] = 1e-3 * torch.randn(shp, generator=g)
        v[name] = 1e-6 * torch.rand(shp, generator=g)
    return TrainingState(shape, params, m, v, step)


def write_state(engine, state):
    """Store ``state`` into an engine's partitions (each rank its own slices)."""
    from growth_ds.distributed.zero import ZeroLayout

    lay = ZeroLayout(engine)
    me = lay.rank
    for name, slot in lay.slots.items():
        lo, hi = slot.bounds[me], slot.bounds[me + 1]
        for view, full in zip(slot.views, (state.params[name], state.exp_avg[name], state.exp_avg_sq[name])):
            view.copy_(full.reshape(-1)[lo:hi])
    dse.set_step(engine, state.step)
    dse.refresh_low_precision(engine)


def gather_state(engine, shape):
    """Full fp32 params and moments through DeepSpeed's own gather helpers (collective)."""
    from growth_ds.models.schema import parameter_schema

    dse.link_optimizer_state(engine)
    named = dse.named_params(engine)
    out = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name in parameter_schema(shape):
        p = named[name]
        out["params"][name] = dse.get_full(engine, p)
        out["exp_avg"][name] = dse.get_full(engine, p, "exp_avg")
        out["exp_avg_sq"][name] = dse.get_full(engine, p, "exp_avg_sq")
    out["step"] = dse.get_step(engine)
    return out


def bit_diff(a, b):
    """Number of elements whose bits differ (shape mismatch counts as all)."""
    a, b = a.contiguous().float(), b.contiguous().float()
    if a.shape != b.shape:
        return max(a.numel(), b.numel(), 1)
    return int((a.view(torch.int32) != b.view(torch.int32)).sum())


def compare(got, ref):
    """{field: elements differing bitwise} against a TrainingState."""
    out = {"bad_names": []}
    for field in ("params", "exp_avg", "exp_avg_sq"):
        refs = getattr(ref, field)
        out[field] = 0
        for n in refs:
            d = bit_diff(got[field][n], refs[n])
            if d:
                out["bad_names"].append(f"{field}:{n}:{d}")
            out[field] += d
    out["step"] = int(got["step"] != ref.step)
    return out


def digest(got, names):
    h = hashlib.sha256()
    for field in ("params", "exp_avg", "exp_avg_sq"):
        for n in names:
            h.update(got[field][n].contiguous().float().numpy().tobytes())
    h.update(str(got["step"]).encode())
    return h.hexdigest()[:16]


def lp_mismatch(engine):
    """Low-precision weights == their dtype of the local fp32 master slice (0 when consistent)."""
    from growth_ds.distributed.zero import ZeroLayout

    lay = ZeroLayout(engine)
    bad = 0
    named = dse.named_params(engine)
    for name, slot in lay.slots.items():
        p = named[name]
        lo, hi = slot.bounds[lay.rank], slot.bounds[lay.rank + 1]
        if hasattr(p, "ds_tensor"):
            lp = p.ds_tensor.reshape(-1)[:hi - lo]
        else:
            lp = p.data.reshape(-1)[lo:hi]
        bad += bit_diff(lp.float(), slot.views[0].to(lp.dtype).float())
    return bad


def reference_step(ref_state, shape, x, y, lr):
    """The unsharded reference: reference decoder + torch AdamW holding the grown state, one step."""
    from growth_ds.models import Decoder, lm_loss
    from growth_ds.ops.state import load_into, make_adamw

    model = Decoder(shape)
    load_into(model, ref_state)
    like = torch.optim.AdamW(dse.param_groups(model, TRAIN["weight_decay"]), lr=lr, betas=tuple(TRAIN["betas"]),
                             eps=TRAIN["eps"])
    group_of = {n: 0 if p.dim() >= 2 else 1 for n, p in model.named_parameters()}
    opt = make_adamw(model, ref_state, like=like, group_of=group_of)
    loss = lm_loss(model(x), y)
    loss.backward()
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, float(loss)


# ---- cases ----------------------------------------------------------------------------------------


def case_list(full=True):
    import dataclasses

    from helpers import small_shape

    R = dataclasses.replace
    g2 = small_shape("gpt2")                              # LayerNorm, GELU, learned positions, biases, tied
    ll = small_shape("llama", tied_embeddings=False)      # RMSNorm, SwiGLU, RoPE, GQA 4/2, untied head
    gi = R(g2, d_model=64, n_heads=8, n_kv_heads=8, d_ffn=96)
    gn = R(g2, d_model=48, n_heads=6, n_kv_heads=6, d_ffn=80, max_seq_len=24)  # non-integer: mean rows
    li = R(ll, d_model=64, n_heads=8, n_kv_heads=4, d_ffn=96)
    ln = R(ll, d_model=48, n_heads=6, n_kv_heads=3, d_ffn=80)
    cases = [  # (label, small, large, width, depth, moments)
        ("gpt2/duplicate", g2, gi, "duplicate", None, "adjoint"),
        ("gpt2/lemon", g2, gn, "lemon", None, "adjoint"),
        ("gpt2/zero", g2, gn, "zero", None, None),
        ("gpt2/hypercloning", g2, gi, "hypercloning", None, "adjoint"),
        ("gpt2/staged", g2, gi, "staged", None, None),
        ("gpt2/stack", g2, R(g2, n_layers=4), None, "stack", "adjoint"),
        ("gpt2/interleave", g2, R(g2, n_layers=4), None, "interleave", None),
        ("gpt2/identity", g2, R(g2, n_layers=3), None, "identity", None),
        ("gpt2/lemon+identity", g2, R(gn, n_layers=3), "lemon", "identity", "adjoint"),
        ("gpt2/zero+stack", g2, R(gn, n_layers=4), "zero", "stack", None),
        ("gpt2/duplicate+interleave", g2, R(gi, n_layers=4), "duplicate", "interleave", "reset"),
        ("llama/duplicate", ll, li, "duplicate", None, "adjoint"),
        ("llama/lemon", ll, ln, "lemon", None, "adjoint"),
        ("llama/zero", ll, ln, "zero", None, None),
        ("llama/hypercloning", ll, li, "hypercloning", None, "adjoint"),
        ("llama/staged", ll, li, "staged", None, None),
        ("llama/stack", ll, R(ll, n_layers=4), None, "stack", "adjoint"),
        ("llama/interleave", ll, R(ll, n_layers=4), None, "interleave", None),
        ("llama/identity", ll, R(ll, n_layers=3), None, "identity", None),
        ("llama/hypercloning+identity", ll, R(li, n_layers=3), "hypercloning", "identity", "adjoint"),
        ("llama/staged+interleave", ll, R(li, n_layers=4), "staged", "interleave", None),
        ("llama/zero+identity", ll, R(ln, n_layers=3), "zero", "identity", None),
    ]
    return cases if full else [c for c in cases if c[0] in SUBSET]


SUBSET = {"gpt2/lemon+identity", "gpt2/zero+stack", "gpt2/hypercloning", "llama/staged+interleave",
          "llama/hypercloning+identity", "llama/zero+identity", "llama/lemon"}


def task_cases(out_dir, opts):
    from growth_ds.distributed.zero import grow_engine
    from growth_ds.distributed.zero_memory import TensorAccountant
    from growth_ds.models import lm_loss
    from growth_ds.models.schema import param_shape, parameter_schema
    from growth_ds.ops import grow, make_plan

    ws = dist.get_world_size()
    stages = [int(s) for s in opts.get("stages", "1,2,3").split(",")]
    full = opts.get("subset", "0") != "1"
    bucket = int(opts.get("bucket", "256"))
    precisions = opts.get("bf16_stages", "")
    results = []
    for stage in stages:
        olds, news = {}, {}
        for label, small, large, width, depth, moments in case_list(full):
            t0 = time.time()
            rec = {"case": label, "stage": stage, "ws": ws, "precision": "fp32"}
            try:
                plan = make_plan(small, large, width=width, depth=depth, seed=5, moments=moments)
                shape = plan.grown_shape
                key = (label.split("/")[0], small)
                if key not in olds:
                    state = random_state(small, seed=len(olds) + 1)
                    e = make_engine(small, stage, fresh=True)
                    dse.materialise_optimizer_state(e, batch_for(small))
                    write_state(e, state)
                    olds[key] = (e, state)
                old, state = olds[key]
                if shape not in news:
                    e = make_engine(shape, stage, fresh=False)
                    dse.materialise_optimizer_state(e, batch_for(shape))
                    news[shape] = e
                new = news[shape]
                ref = grow(state, plan)
                with TensorAccountant() as acct:
                    stats = grow_engine(old, new, plan, bucket_elems=bucket)
                acct.finish()
                numels = [int(torch.tensor(param_shape(shape, s)).prod()) for s in parameter_schema(shape).values()]
                got = gather_state(new, shape)
                rec.update(compare(got, ref))
                rec["lp_mismatch"] = lp_mismatch(new)
                rec["digest"] = digest(got, list(parameter_schema(shape)))
                rec["peak_bytes"] = acct.peak
                rec["max_param_bytes"] = 4 * max(numels)
                rec["rounds"] = stats.rounds
                rec["bytes_sent"] = stats.bytes_sent
                # the next optimizer step equals the unsharded reference's
                x, y = batch_for(shape, seed=99)
                dse.set_lr(new, 1e-3)
                loss = lm_loss(new(x), y)
                new.backward(loss)
                new.step()
                after = gather_state(new, shape)
                ref_params, ref_loss = reference_step(ref, shape, x, y, 1e-3)
                rec["loss_diff"] = abs(float(loss) - ref_loss)
                rec["step_max_diff"] = max(float((after["params"][n] - ref_params[n]).abs().max()) for n in ref_params)
                rec["step_after"] = after["step"]
                rec["ok"] = True
            except Exception:
                rec["ok"] = False
                rec["error"] = traceback.format_exc()[-3000:]
                log(rec["error"])
            rec["seconds"] = time.time() - t0
            # peak over ranks
            t = torch.tensor([rec.get("peak_bytes", 0), rec.get("bytes_sent", 0)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            rec["peak_bytes_max_rank"], rec["bytes_sent_max_rank"] = int(t[0]), int(t[1])
            results.append(rec)
            log(f"[ws{ws} z{stage}] {label}: ok={rec['ok']} params={rec.get('params')} m={rec.get('exp_avg')} "
                f"v={rec.get('exp_avg_sq')} step={rec.get('step')} {rec.get('bad_names', [])[:6]} lp={rec.get('lp_mismatch')} "
                f"peak={rec.get('peak_bytes_max_rank')}/{rec.get('max_param_bytes')} next-step diff="
                f"{rec.get('step_max_diff')} ({rec['seconds']:.2f}s)")
        for e in list(news.values()) + [o[0] for o in olds.values()]:
            dse.release_engine(e)
        del olds, news
        gc.collect()
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f"cases_ws{ws}.json"), "w") as f:
            json.dump(results, f, indent=1)


TASKS = {"cases": task_cases}


def main():
    out_dir = sys.argv[1]
    tasks = sys.argv[2].split(",")
    opts = dict(a.split("=", 1) for a in sys.argv[3:])
    os.makedirs(out_dir, exist_ok=True)
    dse.init_distributed()
    torch.manual_seed(0)
    for t in tasks:
        t0 = time.time()
        TASKS[t](out_dir, opts)
        dist.barrier()
        log(f"task {t} done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

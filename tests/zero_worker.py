"""Worker for tests/test_zero_growth.py: ZeRO-sharded growth on gloo processes (CPU).

    torchrun --nproc_per_node N tests/zero_worker.py OUT_DIR TASK[,TASK...] [key=value ...]

Tasks (run in order, all ranks):

* ``cases``      every growth case under ``stages`` (default 1,2,3): a ZeRO engine of the small shape holding a
                 random training state, grown with ``grow_engine`` into a grown engine; the partitions, gathered
                 afterwards, are compared bit for bit with ``growth_ds.ops.grow`` on the full state (params,
                 exp_avg, exp_avg_sq, step, low-precision weights); the tensor memory allocated during growth
                 is measured; one optimizer step after growth is compared with the unsharded reference's step.
                 Writes ``cases_ws{N}.json`` (``offload=1``: under ZeRO-Offload, ``cases_ws{N}_offload.json``).
* ``leak``       ZeRO-3: three growths in a chain (old engines must be collected) and three grow-and-release
                 cycles of the same size (resident memory must stay flat). Writes ``leak.json``.
* ``save``       trains a small ZeRO-2 engine a few steps and saves a DeepSpeed checkpoint the way the trainer
                 does, plus the gathered full state as the oracle (``src_ckpt/``, ``src_state.pt``).
* ``load``       loads the offline-grown universal checkpoint ``grown_uc/`` into a grown engine at this world
                 size and ``load_stage``; compares with ``ops.grow`` of the oracle; checks that a checkpoint whose
                 shapes do not match the target model is refused with the parameter's name. Writes ``load_ws{N}.json``.
* ``job``        a staged job in miniature (train, pre-growth checkpoint, grow, train) that resumes from the
                 pre-growth checkpoint when relaunched; ``run=NAME``. Writes ``NAME/final.json``.
* ``dense``      LiGO-style dense maps through ``zero.dense.grow_dense_engine``. Writes ``dense_ws{N}.json``.
* ``killjob``    ``job`` of run ``killed`` whose rank 1 SIGKILLs itself mid-growth (the launch then fails).

Rank 0 writes ``done_TASK_wsN`` after each task.
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


OFFLOAD = {"on": False}  # cases offload=1: ZeRO-Offload (optimizer state in host memory; ZeRO-3 parameters too)


def config(stage, precision="fp32", persist0=True):
    extra = {}
    if OFFLOAD["on"]:
        zero = {"offload_optimizer": {"device": "cpu"}}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
        extra = {"zero_optimization": zero, "zero_force_ds_cpu_optimizer": False}  # (torch's AdamW: no C++ build)
    return dse.ds_config(TRAIN, {"zero_stage": stage, "precision": precision, "extra": extra},
                         stage3_persist_threshold=0 if persist0 else None)


def param_groups(model, weight_decay):
    """dse.param_groups, but reading a ZeRO-3 partitioned parameter's rank from ``ds_shape`` (under
    zero.Init every ``p.dim()`` is 1, which would put every weight in the no-decay group)."""
    rank = lambda p: len(getattr(p, "ds_shape", p.shape))  # noqa: E731
    return [{"params": [p for p in model.parameters() if rank(p) >= 2], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if rank(p) < 2], "weight_decay": 0.0}]


def make_engine(shape, stage, precision="fp32", fresh=True, persist0=True):
    import deepspeed

    from growth_ds.models import build_model

    cfg = config(stage, precision, persist0)
    model = build_model(shape, seed=SEED) if fresh else dse.construct_model(shape, stage, cfg)
    opt = torch.optim.AdamW(param_groups(model, TRAIN["weight_decay"]), lr=TRAIN["lr"], betas=tuple(TRAIN["betas"]),
                            eps=TRAIN["eps"])
    if stage == 3:
        dse._register_external_params(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def batch_for(shape, seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, shape.vocab_size, (B, shape.max_seq_len + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def random_state(shape, seed, step=3, signed_zeros=True):
    """A training state with random norms, biases and moments (same on every rank); ``signed_zeros``: a +0 and a
    -0 near the end of every ``attn.q`` and the embedding (value and ``exp_avg``)."""
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
        if signed_zeros and (name.endswith("attn.q.weight") or name == "tok_emb.weight"):
            # signed zeros near the end (the last rank's slice): the executor's fast path must normalise them as
            # the reference does, which it learns from zero flags reduced over every rank
            for t in (params[name], m[name]):
                t.view(-1)[-3], t.view(-1)[-5] = -0.0, 0.0
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


def gather_exact(engine):
    """Every rank's own partitions concatenated (one all_gather, no arithmetic: signed zeros survive, unlike
    DeepSpeed's all-reduce based safe_get_full_* helpers). ``{field: {name: full tensor}}`` + step."""
    from growth_ds.distributed.zero import ZeroLayout

    lay = ZeroLayout(engine)
    slots = list(lay.slots.values())
    sizes = [[s.bounds[r + 1] - s.bounds[r] for s in slots] for r in range(lay.world)]
    n = max(sum(x) for x in sizes)
    mine = torch.zeros(3, n)
    off = 0
    for s, k in zip(slots, sizes[lay.rank]):
        for c in range(3):
            mine[c, off:off + k] = s.views[c]
        off += k
    parts = [torch.empty_like(mine) for _ in range(lay.world)]
    dist.all_gather(parts, mine, group=lay.group)
    out = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    offs = [0] * lay.world
    for i, s in enumerate(slots):
        pieces = []
        for r in range(lay.world):
            k = sizes[r][i]
            pieces.append(parts[r][:, offs[r]:offs[r] + k])
            offs[r] += k
        full = torch.cat(pieces, dim=1)
        for c, field in enumerate(("params", "exp_avg", "exp_avg_sq")):
            out[field][s.name] = full[c].reshape(s.shape).clone()
    out["step"] = dse.get_step(engine)
    return out


def value_diff(got, ref):
    """Elements that differ in value (-0 == +0) between a gathered state and a TrainingState."""
    return sum(int((got[f][n] != getattr(ref, f)[n]).sum()) for f in ("params", "exp_avg", "exp_avg_sq")
               for n in getattr(ref, f))


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
    return h.hexdigest()


def lp_mismatch(engine, full=None):
    """Low-precision weights == their dtype of the local fp32 master slice (0 when consistent); with
    ``full`` (:func:`gather_exact`), also every rank's whole ZeRO-1/2 low-precision parameter (what the
    refresh's all-gather wrote) against the whole master."""
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
        if full is not None and not hasattr(p, "ds_tensor"):
            bad += bit_diff(p.data.float(), full["params"][name].to(p.dtype).float())
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


def case_plan(small, large, width, depth, moments, seed=5):
    """The plan of one case_list entry; width ``zero-relative``: the zero method with the new units' fan-in
    at 1.5 x the std of the old weight they join (GrowthPlan.random_relative)."""
    from growth_ds.ops import make_plan

    if width == "zero-relative":
        return make_plan(small, large, width="zero", depth=depth, seed=seed, moments=moments, random_std=1.5,
                         random_relative=True)
    return make_plan(small, large, width=width, depth=depth, seed=seed, moments=moments)


def case_list(which="full"):
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
        ("llama/duplicate+stack", ll, R(li, n_layers=4), "duplicate", "stack", "adjoint"),
        # the new units' fan-in relative to each old weight's std: one scalar reduced over the partitions
        ("llama/zero-relative+stack", ll, R(ln, n_layers=4), "zero-relative", "stack", None),
    ]
    if which == "full":
        return cases
    keep = SUBSET if which == "subset" else MINI
    return [c for c in cases if c[0] in keep]


BF16_CASES = {"gpt2/lemon+identity", "llama/staged+interleave"}
# every width and depth method on both flavours
SUBSET = {"gpt2/duplicate+interleave", "gpt2/lemon+identity", "gpt2/zero+stack", "gpt2/hypercloning", "gpt2/staged",
          "llama/lemon", "llama/hypercloning+identity", "llama/staged+interleave", "llama/zero+identity",
          "llama/duplicate+stack", "llama/zero-relative+stack"}
MINI = {"gpt2/lemon+identity", "llama/staged+interleave"}


def task_cases(out_dir, opts):
    from growth_ds.distributed.zero import grow_engine
    from growth_ds.models import lm_loss
    from growth_ds.models.schema import parameter_schema
    from growth_ds.ops import grow, make_plan

    ws = dist.get_world_size()
    # sel=STAGE:WHICH,...  with WHICH one of full | subset | mini
    sel = [x.split(":") for x in opts.get("sel", "3:full,1:subset,2:subset").split(",") if x]
    bf16_stages = [int(s) for s in opts.get("bf16_stages", "").split(",") if s]
    buckets = {1: 768, 2: 4096, 3: 1536}  # different buckets per stage: the result must not depend on them
    only = opts.get("only")
    OFFLOAD["on"] = opts.get("offload") == "1"
    runs = [(int(st), "fp32", case_list(which), int(st)) for st, which in sel]
    runs += [(st, "bf16", [c for c in case_list() if c[0] in BF16_CASES], st) for st in bf16_stages]
    # cross=OLD>NEW: the old engine under one ZeRO stage, the grown one under another
    runs += [(int(x.split(">")[1]), "fp32", case_list("mini"), int(x.split(">")[0]))
             for x in opts.get("cross", "").split(",") if x]
    results = []
    for stage, precision, cases, old_stage in runs:
        olds, news = {}, {}
        for label, small, large, width, depth, moments in cases:
            if only and label not in only.split("|"):
                continue
            t0 = time.time()
            rec = {"case": label, "stage": stage, "old_stage": old_stage, "ws": ws, "precision": precision,
                   "offload": OFFLOAD["on"]}
            try:
                plan = case_plan(small, large, width, depth, moments)
                shape = plan.grown_shape
                key = (label.split("/")[0], small)
                if key not in olds:
                    state = random_state(small, seed=len(olds) + 1)
                    e = make_engine(small, old_stage, precision, fresh=True)
                    dse.materialise_optimizer_state(e, batch_for(small))
                    write_state(e, state)
                    olds[key] = (e, state)
                old, state = olds[key]
                if shape not in news:
                    e = make_engine(shape, stage, precision, fresh=False)
                    dse.materialise_optimizer_state(e, batch_for(shape))
                    news[shape] = e
                new = news[shape]
                ref = grow(state, plan)
                tt = time.time()
                rec["t_setup"] = tt - t0
                stats = grow_engine(old, new, plan, bucket_elems=buckets[stage], prefetch=stage == 2)
                rec["t_grow"] = time.time() - tt
                tt = time.time()
                got = gather_exact(new)
                rec.update(compare(got, ref))
                if label in MINI:  # DeepSpeed's own gather agrees (in value: it sums)
                    rec["ds_gather_value_diff"] = value_diff(gather_state(new, shape), ref)
                rec["lp_mismatch"] = lp_mismatch(new, got)
                rec["digest"] = digest(got, list(parameter_schema(shape)))
                zo = new.optimizer  # (what DeepSpeed made of the config: ZeRO-1/2 cpu_offload, ZeRO-3 offload_*)
                rec["offloaded"] = sorted(a for a in ("cpu_offload", "offload_optimizer", "offload_param")
                                          if getattr(zo, a, False) is True)
                rec["rounds"] = stats.rounds
                rec["pieces"], rec["stacked_pieces"] = stats.pieces, stats.stacked_pieces
                rec["transport"], rec["full_rounds"] = stats.transport, stats.full_rounds
                rec["bytes_sent"] = stats.bytes_sent
                rec["t_check"] = time.time() - tt
                tt = time.time()
                rec["ok"] = True
                if precision != "fp32":
                    raise StopIteration  # bf16 forward differs from the fp32 reference: no step comparison
                # the next optimizer step equals the unsharded reference's
                x, y = batch_for(shape, seed=99)
                dse.set_lr(new, 1e-3)
                loss = lm_loss(new(x), y)
                new.backward(loss)
                new.step()
                after = gather_exact(new)
                ref_params, ref_loss = reference_step(ref, shape, x, y, 1e-3)
                rec["loss_diff"] = abs(float(loss) - ref_loss)
                rec["step_max_diff"] = max(float((after["params"][n] - ref_params[n]).abs().max()) for n in ref_params)
                rec["step_after"], rec["ref_step"] = after["step"], ref.step
                rec["t_step"] = time.time() - tt
            except StopIteration:
                pass
            except Exception:
                rec["ok"] = False
                rec["error"] = traceback.format_exc()[-3000:]
                log(rec["error"])
            rec["seconds"] = time.time() - t0
            # peak over ranks
            t = torch.tensor([rec.get("bytes_sent", 0)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            rec["bytes_sent_max_rank"] = int(t[0])
            results.append(rec)
            log(f"[ws{ws} z{old_stage}>{stage} {precision}] {label}: ok={rec['ok']} params={rec.get('params')} "
                f"m={rec.get('exp_avg')} v={rec.get('exp_avg_sq')} step={rec.get('step')} "
                f"{rec.get('bad_names', [])[:6]} lp={rec.get('lp_mismatch')} rounds={rec.get('rounds')} next-step diff="
                f"{rec.get('step_max_diff')} ({rec['seconds']:.2f}s: setup {rec.get('t_setup', 0):.2f} grow "
                f"{rec.get('t_grow', 0):.2f} check {rec.get('t_check', 0):.2f} step {rec.get('t_step', 0):.2f})")
        for e in list(news.values()) + [o[0] for o in olds.values()]:
            dse.release_engine(e)
        del olds, news
        gc.collect()
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f"cases_ws{ws}{'_offload' if OFFLOAD['on'] else ''}.json"), "w") as f:
            json.dump(results, f, indent=1)


def memory_cases():
    import dataclasses

    from growth_ds.shapes import ModelShape

    R = dataclasses.replace
    # a realistic proportion: the embedding is the largest parameter (so the bound is one embedding)
    g = ModelShape(flavour="gpt2", n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16, d_ffn=256,
                   vocab_size=4096, max_seq_len=16)
    ll = ModelShape(flavour="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ffn=256,
                    vocab_size=4096, max_seq_len=16, tied_embeddings=False)
    return [  # the two cases that hold a whole old parameter on one rank (mean rows, relative noise)
        ("gpt2/lemon+identity", g, R(g, d_model=96, n_heads=6, n_kv_heads=6, d_ffn=384, n_layers=3), "lemon",
         "identity", "adjoint"),
        ("llama/hypercloning+identity", ll, R(ll, d_model=128, n_heads=8, n_kv_heads=4, d_ffn=512, n_layers=3),
         "hypercloning", "identity", "adjoint"),
        ("llama/staged+interleave", ll, R(ll, d_model=128, n_heads=8, n_kv_heads=4, d_ffn=512, n_layers=4),
         "staged", "interleave", None),
    ]


def memory_bound(plan):
    """One full parameter: the largest new parameter in fp32, or, where the reference reduces a whole old
    parameter (GPT-2 mean rows, HyperCloning's relative noise), that old parameter in float64; plus the
    O(sum of space sizes) index vectors (at most 64 bytes per new coordinate of every space: source index,
    adjoint and its two inverse powers, for the out and the in side)."""
    from growth_ds.distributed.zero.param_growth import ParamGrowth
    from growth_ds.models.schema import parameter_schema

    gs = [ParamGrowth(plan, n, s) for n, s in parameter_schema(plan.grown_shape).items()]
    one = max([4 * g.new_numel for g in gs] + [8 * g.old_numel for g in gs if g.reductions])
    meta = 64 * sum(m.new for m in plan.spaces.values())
    return {"max_param_bytes": 4 * max(g.new_numel for g in gs), "one_param_bytes": one, "metadata_bytes": meta,
            "bound_bytes": one + meta}


def task_memory(out_dir, opts):
    """Tensor memory allocated during growth (auto bucket) against one full new parameter."""
    from growth_ds.distributed.zero import ZeroLayout, grow_engine
    from growth_ds.distributed.zero.memory import TensorAccountant
    from growth_ds.ops import grow, make_plan

    ws = dist.get_world_size()
    cases = memory_cases()
    runs = [(3, cases[i]) for i in (range(len(cases)) if opts.get("mem_cases") != "1" else [1])]
    runs += [(int(st), cases[0]) for st in opts.get("mem_stages", "").split(",") if st]
    results = []
    for stage, case in runs:
        for label, small, large, width, depth, moments in [case]:
            t0 = time.time()
            rec = {"case": label, "stage": stage, "ws": ws}
            try:
                plan = case_plan(small, large, width, depth, moments)
                shape = plan.grown_shape
                state = random_state(small, seed=7)
                old = make_engine(small, stage, fresh=True)
                dse.materialise_optimizer_state(old, batch_for(small))
                write_state(old, state)
                new = make_engine(shape, stage, fresh=False)
                dse.materialise_optimizer_state(new, batch_for(shape))
                ref = grow(state, plan)
                gc.collect()
                with TensorAccountant() as acct:
                    stats = grow_engine(old, new, plan)
                acct.finish()
                got = gather_exact(new)
                rec.update(compare(got, ref))
                lay_old, lay_new = ZeroLayout(old), ZeroLayout(new)
                part = torch.tensor([acct.peak, 12 * lay_old.local_numel(), 12 * lay_new.local_numel()],
                                    dtype=torch.float64)
                dist.all_reduce(part, op=dist.ReduceOp.MAX)
                rec["peak_bytes"], rec["old_slice_bytes"], rec["new_slice_bytes"] = (int(v) for v in part)
                rec.update(memory_bound(plan))
                rec["rounds"] = stats.rounds
                rec["ok"] = True
                for e in (old, new):
                    dse.release_engine(e)
            except Exception:
                rec["ok"] = False
                rec["error"] = traceback.format_exc()[-3000:]
                log(rec["error"])
            rec["seconds"] = time.time() - t0
            results.append(rec)
            log(f"[mem ws{ws} z{stage}] {label}: ok={rec['ok']} bits={rec.get('params')},{rec.get('exp_avg')},"
                f"{rec.get('exp_avg_sq')} peak={rec.get('peak_bytes')} bound={rec.get('bound_bytes')} "
                f"slices old/new={rec.get('old_slice_bytes')}/{rec.get('new_slice_bytes')} rounds={rec.get('rounds')} "
                f"({rec['seconds']:.1f}s)")
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f"memory_ws{ws}.json"), "w") as f:
            json.dump(results, f, indent=1)


# ---- no leak: three growths in one job -----------------------------------------------------------


def task_leak(out_dir, opts):
    """ZeRO-3: (1) a chain of three growths, each releasing the old engine: every released engine, module
    and optimizer must be garbage collected; (2) three grow-and-release cycles of the same size: resident
    memory after each cycle must stay flat."""
    import dataclasses

    from growth_ds.distributed.zero import grow_engine
    from growth_ds.distributed.zero.memory import malloc_trim, rss
    from growth_ds.ops import make_plan
    from growth_ds.shapes import ModelShape

    R = dataclasses.replace
    s0 = ModelShape(flavour="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ffn=64,
                    vocab_size=256, max_seq_len=16, tied_embeddings=False)
    chain = [s0, R(s0, d_model=48, n_heads=6, n_kv_heads=3, d_ffn=96), R(s0, d_model=64, n_heads=8, n_kv_heads=4,
                                                                          d_ffn=128, n_layers=3),
             R(s0, d_model=96, n_heads=12, n_kv_heads=6, d_ffn=192, n_layers=4)]
    rec = {}
    refs = []
    cur = make_engine(chain[0], 3, fresh=True)
    dse.materialise_optimizer_state(cur, batch_for(chain[0]))
    shape = chain[0]
    for nxt in chain[1:]:
        plan = make_plan(shape, nxt, width="lemon", depth="identity" if nxt.n_layers > shape.n_layers else None,
                         seed=3, moments="adjoint")
        new = make_engine(plan.grown_shape, 3, fresh=False)
        dse.materialise_optimizer_state(new, batch_for(plan.grown_shape))
        grow_engine(cur, new, plan)
        x, y = batch_for(plan.grown_shape, seed=1)
        from growth_ds.models import lm_loss

        loss = lm_loss(new(x), y)  # the grown engine trains
        new.backward(loss)
        new.step()
        refs += [weakref.ref(cur), weakref.ref(cur.module), weakref.ref(cur.optimizer)]
        dse.release_engine(cur)
        del cur
        cur, shape = new, plan.grown_shape
    dse.release_engine(cur)
    del cur, new
    gc.collect()
    rec["chain_alive"] = sum(r() is not None for r in refs)
    rec["chain_refs"] = len(refs)
    # same-size cycles: resident memory after each must not grow
    small = ModelShape(flavour="llama", n_layers=2, d_model=96, n_heads=4, n_kv_heads=2, head_dim=24, d_ffn=384,
                       vocab_size=2048, max_seq_len=16, tied_embeddings=False)
    large = R(small, d_model=192, n_heads=8, n_kv_heads=4, d_ffn=768, n_layers=3)
    plan = make_plan(small, large, width="duplicate", depth="identity", seed=1, moments="adjoint")
    rss_after, cycle_refs = [], []
    for _ in range(3):
        a = make_engine(small, 3, fresh=True)
        dse.materialise_optimizer_state(a, batch_for(small))
        b = make_engine(plan.grown_shape, 3, fresh=False)
        dse.materialise_optimizer_state(b, batch_for(plan.grown_shape))
        grow_engine(a, b, plan)
        cycle_refs += [weakref.ref(a), weakref.ref(b)]
        dse.release_engine(a)
        dse.release_engine(b)
        del a, b
        gc.collect()
        malloc_trim()
        rss_after.append(rss())
    rec["cycle_alive"] = sum(r() is not None for r in cycle_refs)
    rec["rss_after_cycles"] = rss_after
    rec["large_params"] = large.n_params
    t = torch.tensor([max(rss_after[1:]) - rss_after[0], rss_after[2] - rss_after[1], rec["chain_alive"],
                      rec["cycle_alive"]], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    rec["rss_growth_max_rank"], rec["rss_growth_last_max_rank"] = float(t[0]), float(t[1])
    rec["chain_alive_max_rank"], rec["cycle_alive_max_rank"] = int(t[2]), int(t[3])
    log(f"[leak] {rec}")
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "leak.json"), "w") as f:
            json.dump(rec, f, indent=1)


# ---- universal checkpoints -------------------------------------------------------------------------


def universal_case():
    import dataclasses

    from helpers import small_shape

    g2 = small_shape("gpt2")
    large = dataclasses.replace(g2, d_model=48, n_heads=6, n_kv_heads=6, d_ffn=80, n_layers=3)
    return g2, large, dict(width="lemon", depth="identity", seed=5, moments="adjoint")


def train_steps(engine, shape, steps, first=0):
    from growth_ds.models import lm_loss

    losses = []
    for k in range(first, first + steps):
        x, y = batch_for(shape, seed=1000 * k + dist.get_rank())
        dse.set_lr(engine, 1e-3)
        loss = lm_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def save_like_trainer(engine, ckpt_dir, tag, shape, step):
    """engine.save_checkpoint as StagedTrainer.save does: tag dir + growth_meta.json, then latest.json."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                           client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}})
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {"tag": tag, "shape": shape.to_dict(), "world_size": dist.get_world_size(),
                "progress": {"step": step, "stage": 0, "schedule_step": step}}
        (ckpt_dir / tag / "growth_meta.json").write_text(json.dumps(meta))
        tmp = ckpt_dir / ".latest.json.tmp"
        tmp.write_text(json.dumps({"tag": tag, "step": step}))
        os.replace(tmp, ckpt_dir / "latest.json")
    dist.barrier()


def task_save(out_dir, opts):
    from pathlib import Path

    small, _, _ = universal_case()
    stage = int(opts.get("save_stage", "2"))
    e = make_engine(small, stage, fresh=True)
    train_steps(e, small, 3)
    ck = Path(out_dir) / "src_ckpt"
    save_like_trainer(e, ck, "step00000003", small, 3)
    got = gather_exact(e)
    if dist.get_rank() == 0:
        torch.save({"shape": small.to_dict(), **got}, os.path.join(out_dir, "src_state.pt"))
    dse.release_engine(e)


def task_load(out_dir, opts):
    """Load the grown universal checkpoint at this world size and ZeRO stage; refuse a mismatched one."""
    import dataclasses

    from growth_ds.distributed.zero.universal import load_universal_checkpoint
    from growth_ds.ops import grow, make_plan
    from growth_ds.ops.state import TrainingState
    from growth_ds.shapes import ModelShape

    ws = dist.get_world_size()
    stage = int(opts.get("load_stage", "3"))
    small, large, kw = universal_case()
    plan = make_plan(small, large, **kw)
    src = torch.load(os.path.join(out_dir, "src_state.pt"), weights_only=False)
    state = TrainingState(ModelShape.from_dict(src["shape"]), src["params"], src["exp_avg"], src["exp_avg_sq"],
                          src["step"])
    ref = grow(state, plan)
    rec = {"ws": ws, "stage": stage}
    uc = os.path.join(out_dir, "grown_uc")

    def engine_for(shape):
        cfg = config(stage)
        cfg["checkpoint"] = {"load_universal": True}
        import deepspeed

        model = dse.construct_model(shape, stage, cfg)
        opt = torch.optim.AdamW(param_groups(model, TRAIN["weight_decay"]), lr=TRAIN["lr"],
                                betas=tuple(TRAIN["betas"]), eps=TRAIN["eps"])
        if stage == 3:
            dse._register_external_params(model)
        return deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]

    try:
        e = engine_for(plan.grown_shape)
        load_universal_checkpoint(e, uc)
        got = gather_exact(e)
        rec.update(compare(got, ref))
        rec["lp_mismatch"] = lp_mismatch(e)
        rec["weight_decay"] = [g["weight_decay"] for g in dse.base_optimizer(e).param_groups]
        rec["loss_after"] = train_steps(e, plan.grown_shape, 1)[0]
        dse.release_engine(e)
        bad = dataclasses.replace(plan.grown_shape, d_ffn=plan.grown_shape.d_ffn + 16)
        e = engine_for(bad)
        try:
            load_universal_checkpoint(e, uc)
            rec["refused"] = None
        except ValueError as err:
            rec["refused"] = str(err)
        dse.release_engine(e)
        rec["ok"] = True
    except Exception:
        rec["ok"] = False
        rec["error"] = traceback.format_exc()[-3000:]
        log(rec["error"])
    log(f"[load ws{ws} z{stage}] {rec}")
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f"load_ws{ws}_z{stage}.json"), "w") as f:
            json.dump(rec, f, indent=1)


# ---- fault tolerance -------------------------------------------------------------------------------


def task_job(out_dir, opts):
    """Train, checkpoint before growth, grow (a rank may be SIGKILLed here), train, record the final state.
    Relaunched after a crash, the job resumes from the pre-growth checkpoint and grows again."""
    from pathlib import Path

    from growth_ds.distributed.zero import grow_engine
    from growth_ds.ops import make_plan

    stage = int(opts.get("job_stage", "3"))
    run = Path(out_dir) / opts["run"]
    ck = run / "ckpt"
    small, large, kw = universal_case()
    plan = make_plan(small, large, **kw)
    resumed = (ck / "latest.json").exists()
    old = make_engine(small, stage, fresh=True)
    if resumed:
        tag = json.loads((ck / "latest.json").read_text())["tag"]
        old.load_checkpoint(str(ck), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        losses = json.loads((ck / tag / "losses.json").read_text())
    else:
        losses = train_steps(old, small, 3)
        save_like_trainer(old, ck, "step00000003", small, 3)
        if dist.get_rank() == 0:
            (ck / "step00000003" / "losses.json").write_text(json.dumps(losses))
    new = make_engine(plan.grown_shape, stage, fresh=False)
    dse.materialise_optimizer_state(new, batch_for(plan.grown_shape))
    stats = grow_engine(old, new, plan, bucket_elems=1024)
    dse.release_engine(old)
    losses += train_steps(new, plan.grown_shape, 3, first=3)
    got = gather_exact(new)
    if dist.get_rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "final.json").write_text(json.dumps({
            "resumed": resumed, "transport": stats.transport, "losses": losses, "digest": digest(got, sorted(got["params"])),
            "step": got["step"]}))
    dse.release_engine(new)


def task_dense(out_dir, opts):
    """LiGO-style dense maps (W' = B W A per space, tied across layers): per-rank partial products
    reduce-scattered to the new owners, against B W A on the full tensors."""
    import dataclasses

    from growth_ds.distributed.zero.dense import DenseMap, grow_dense_engine
    from growth_ds.models.schema import parameter_schema
    from helpers import small_shape

    ws = dist.get_world_size()
    small = small_shape("llama", tied_embeddings=False)
    large = dataclasses.replace(small, d_model=48, n_heads=6, n_kv_heads=3, d_ffn=80)
    g = torch.Generator().manual_seed(4)
    maps_by_space = {}
    for space in ("model", "ffn", "heads", "kv", "vocab"):
        d, D = small.space_dim(space), large.space_dim(space)
        B = torch.randn(D, d, generator=g, dtype=torch.float64) / d ** 0.5
        A = torch.randn(d, D, generator=g, dtype=torch.float64) / d ** 0.5
        maps_by_space[space] = (B, A)
    schema = parameter_schema(large)
    maps = {}
    for name, spec in schema.items():
        B = maps_by_space[spec.axes[0]][0]
        A = maps_by_space[spec.axes[1]][1] if len(spec.axes) == 2 else None
        maps[name] = DenseMap(name, B, A)
    state = random_state(small, seed=21)
    results = []
    for stage in [int(x) for x in opts.get("dense_stages", "3").split(",")]:
        old = make_engine(small, stage, fresh=True)
        dse.materialise_optimizer_state(old, batch_for(small))
        write_state(old, state)
        new = make_engine(large, stage, fresh=False)
        dse.materialise_optimizer_state(new, batch_for(large))
        grow_dense_engine(old, new, maps)
        got = gather_exact(new)
        worst = 0.0
        for name, m in maps.items():
            w = state.params[name].double()
            ref = (m.B @ w @ m.A if m.A is not None else m.B @ w).float()
            err = float((got["params"][name] - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
            worst = max(worst, err)
        zero_moments = all(bool((got[f][n] == 0).all()) for f in ("exp_avg", "exp_avg_sq") for n in maps)
        for e in (old, new):
            dse.release_engine(e)
        # a LiGO operator (depth mixing, couplings, noise, norm offsets), moved away from its initial plan
        ligo_err = 0.0
        for flavour in ("llama", "gpt2"):
            lsmall, lmaps, lref, lstate = ligo_case(flavour)
            old = make_engine(lsmall, stage, fresh=True)
            dse.materialise_optimizer_state(old, batch_for(lsmall))
            write_state(old, lstate)
            lshape = ligo_case.grown[flavour]
            new = make_engine(lshape, stage, fresh=False)
            dse.materialise_optimizer_state(new, batch_for(lshape))
            grow_dense_engine(old, new, lmaps)
            lgot = gather_exact(new)
            for name, t in lref.items():
                err = float((lgot["params"][name] - t).abs().max() / t.abs().max().clamp(min=1e-30))
                ligo_err = max(ligo_err, err)
            for e in (old, new):
                dse.release_engine(e)
        results.append({"ws": ws, "stage": stage, "max_rel_err": worst, "zero_moments": zero_moments,
                        "step": got["step"], "ligo_max_rel_err": ligo_err})
        log(f"[dense ws{ws} z{stage}] {results[-1]}")
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f"dense_ws{ws}.json"), "w") as f:
            json.dump(results, f, indent=1)


def ligo_case(flavour):
    """(small shape, dense maps, materialised reference, small state) of a LiGO operator initialised from
    lemon+interleave and then perturbed (so the maps are dense and the depth mix is not a copy)."""
    import dataclasses

    from growth_ds.ops import make_plan
    from growth_ds.ops.ligo import LigoOperator
    from helpers import small_shape

    small = small_shape(flavour, tied_embeddings=flavour == "gpt2")
    large = dataclasses.replace(small, d_model=48, n_heads=6, n_kv_heads=3 if flavour == "llama" else 6, d_ffn=80,
                                n_layers=3)
    state = random_state(small, seed=31)
    op = LigoOperator(make_plan(small, large, width="lemon", depth="interleave", seed=2), state.params)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        ref = {n: t.detach().clone() for n, t in op.materialise().items()}
    ligo_case.grown[flavour] = large
    return small, op.dense_maps(), ref, state


ligo_case.grown = {}


def task_killjob(out_dir, opts):
    """``job`` (run ``killed``) with rank 1 SIGKILLed in the third all-to-all round of the growth."""
    from growth_ds.distributed.zero import KILL_ENV

    os.environ[KILL_ENV] = opts.get("kill", "1:2")
    task_job(out_dir, dict(opts, run="killed"))


TASKS = {"cases": task_cases, "memory": task_memory, "leak": task_leak, "save": task_save, "load": task_load,
         "job": task_job, "killjob": task_killjob, "dense": task_dense}


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
        if dist.get_rank() == 0:
            with open(os.path.join(out_dir, f"done_{t}_ws{dist.get_world_size()}"), "w") as f:
                f.write(f"{time.time() - t0:.1f}")


if __name__ == "__main__":
    main()

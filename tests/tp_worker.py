"""Worker for tests/test_tensor_parallel.py: megatron-core growth at TP=1 and TP=2 in one 2-process gloo job.

Launched as ``torchrun --nproc_per_node 2 tests/tp_worker.py OUT_DIR``. Phases, each on both ranks:

1. TP=1 (data-parallel 2, both ranks compute the same): grow every case, keep the gathered results,
   train 10 steps, save the small and the grown model as dist checkpoints.
2. TP=2: grow the same cases; compare with phase 1 and with the reference executor; train; save;
   reload phase 1's checkpoint at TP=2; grow phase 1's small checkpoint with grow_dist_checkpoint.
3. TP=1: reload phase 2's checkpoint.

Rank 0 writes ``OUT_DIR/results.json``: ``{check name: value}`` (max differences, counts, messages).
Top-level imports stay light: dist_checkpointing's writer spawns a process that re-imports this file.
"""
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

SEED = 1234
STEPS = 10


def cases():
    import dataclasses

    from helpers import small_shape

    gpt2 = small_shape("gpt2", tied_embeddings=True)  # LayerNorm, GELU, learned positions, biases, MHA, tied
    llama = small_shape("llama", tied_embeddings=False)  # RMSNorm, SwiGLU, RoPE, GQA 4/2, untied
    grow = dict(d_model=64, d_ffn=96, n_layers=3)
    return [
        ("gpt2", gpt2, dataclasses.replace(gpt2, n_heads=8, n_kv_heads=8, **grow),
         ["duplicate+identity", "lemon+identity", "zero+stack"]),
        ("llama", llama, dataclasses.replace(llama, n_heads=8, n_kv_heads=4, **grow),
         ["lemon+identity", "staged+interleave", "hypercloning+identity", "zero+identity"]),
    ]


def methods(spec):
    from growth_ds.cli import _parse_methods

    return _parse_methods(spec)


class CollectiveLog:
    """Records every collective issued through torch.distributed or a ProcessGroup while active."""

    FUNCS = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "broadcast",
             "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
             "send", "recv", "isend", "irecv", "reduce", "_all_gather_base", "_reduce_scatter_base")
    PG_METHODS = ("allgather", "allgather_coalesced", "allgather_into_tensor_coalesced", "_allgather_base",
                  "allreduce", "allreduce_coalesced", "alltoall", "alltoall_base", "broadcast", "gather", "reduce",
                  "reduce_scatter", "_reduce_scatter_base", "scatter", "send", "recv")

    def __init__(self):
        self.calls = []

    @staticmethod
    def _numel(args):
        n = 0
        for a in args:
            if hasattr(a, "numel"):
                n += a.numel()
            elif isinstance(a, (list, tuple)):
                n += CollectiveLog._numel(a)
        return n

    def __enter__(self):
        import torch.distributed as dist
        from torch._C._distributed_c10d import ProcessGroup

        self._saved = []
        for mod, names in ((dist, self.FUNCS), (dist.distributed_c10d, self.FUNCS), (ProcessGroup, self.PG_METHODS)):
            for name in names:
                raw = vars(mod).get(name)  # the raw attribute: a pybind method must be put back as it was
                if raw is None:
                    continue
                orig = getattr(mod, name)
                self._saved.append((mod, name, raw))

                def wrapper(*args, _orig=orig, _name=name, **kwargs):
                    self.calls.append((_name, self._numel(list(args) + list(kwargs.values()))))
                    return _orig(*args, **kwargs)

                setattr(mod, name, wrapper)
        return self

    def __exit__(self, *exc):
        for mod, name, raw in reversed(self._saved):
            setattr(mod, name, raw)


def reference_state(shape, seed):
    """A random reference TrainingState with non-trivial Adam moments and step."""
    import torch

    from growth_ds.ops.state import TrainingState
    from helpers import randomised_model

    st = TrainingState.from_module(randomised_model(shape, seed=seed))
    g = torch.Generator().manual_seed(seed + 7)
    st.exp_avg = {n: 1e-3 * torch.randn(p.shape, generator=g) for n, p in st.params.items()}
    st.exp_avg_sq = {n: 1e-6 * torch.rand(p.shape, generator=g) for n, p in st.params.items()}
    st.step = 7
    return st


def batches(shape, n=2, B=2):
    import torch

    g = torch.Generator().manual_seed(99)
    out = []
    for _ in range(n):
        t = torch.randint(0, shape.vocab_size, (B, shape.max_seq_len + 1), generator=g)
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def max_diff(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def state_diff(a, b):
    """Max |a - b| over params and moments of two TrainingStates (same names)."""
    worst = 0.0
    for field in ("params", "exp_avg", "exp_avg_sq"):
        x, y = getattr(a, field), getattr(b, field)
        assert set(x) == set(y), (field, sorted(set(x) ^ set(y))[:4])
        for k in x:
            if x[k].shape != y[k].shape:
                return float("inf")
            worst = max(worst, max_diff(x[k], y[k]))
    return worst


def setup_tp(tp):
    from megatron.core import parallel_state as ps

    from growth_ds.interop import megatron as gm

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    gm.ensure_model_parallel(tp, seed=SEED)


def train(model, optimizer, shape, steps=STEPS):
    from growth_ds.interop import megatron as gm

    losses = []
    data = batches(shape)
    for i in range(steps):
        x, y = data[i % len(data)]
        optimizer.zero_grad()
        loss = gm.lm_loss(model, x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def small_model(small, state):
    import torch

    from growth_ds.interop import megatron as gm

    model = gm.build_gpt_model(small)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gm.load_reference_state(model, state, opt)
    return model, opt


def phase(tp, out, res, keep):
    """Grow every case at TP=``tp``; compare with what an earlier phase kept in ``keep``."""
    import torch
    import torch.distributed as dist

    from growth_ds.interop import megatron as gm
    from growth_ds.ops import grow, make_plan

    setup_tp(tp)
    tag = f"tp{tp}"
    for flavour, small, large, specs in cases():
        state = reference_state(small, seed=5)
        model, opt = small_model(small, state)
        x, _ = batches(small)[0]
        with torch.no_grad():
            small_logits = gm.gather_logits(model, x)
        res[f"{tag}.{flavour}.small_vs_reference_logits"] = max_diff(small_logits, _reference_logits(state, x))
        res[f"{tag}.{flavour}.roundtrip"] = state_diff(gm.to_reference_state(model, opt), state)
        for spec in specs:
            width, depth = methods(spec)
            plan = make_plan(small, large, width=width, depth=depth, seed=11)
            key = f"{flavour}.{spec}"
            t0 = time.perf_counter()
            with CollectiveLog() as log:
                grown = gm.grow_gpt_model(model, opt, plan, plan_tp=2)
            res[f"{tag}.{key}.grow_seconds"] = time.perf_counter() - t0
            res[f"{tag}.{key}.collectives"] = log.calls
            res[f"{tag}.{key}.tp_plan"] = grown.tp_plan.describe()
            got = gm.to_reference_state(grown.model, grown.optimizer)
            res[f"{tag}.{key}.vs_reference_executor"] = state_diff(got, grow(state, grown.plan))
            res[f"{tag}.{key}.step"] = grown.step
            with torch.no_grad():
                logits = gm.gather_logits(grown.model, x)
            res[f"{tag}.{key}.lossless_logits"] = max_diff(logits, small_logits)
            res[f"{tag}.{key}.lossless"] = bool(plan.lossless)
            if tp == 1:
                keep[key] = got
                # the source plan (not made block-diagonal): equal up to the documented permutation
                src = gm.grow_gpt_model(model, opt, plan, plan_tp=1)
                if grown.tp_plan.is_permutation and plan.noise == "none" and not any(
                        plan.spaces[s].residue == "random" and bool((plan.spaces[s].src < 0).any())
                        for s in ("ffn", "heads", "kv")):
                    from growth_ds.distributed.tensor_parallel import permute_like
                    from growth_ds.models.schema import parameter_schema

                    src_state = gm.to_reference_state(src.model, src.optimizer)
                    worst = 0.0
                    for field in ("params", "exp_avg", "exp_avg_sq"):
                        for name, spec_ in parameter_schema(grown.shape).items():
                            a = permute_like(grown.tp_plan, spec_, getattr(src_state, field)[name])
                            worst = max(worst, max_diff(a, getattr(got, field)[name]))
                    res[f"tp1.{key}.source_plan_permuted"] = worst
            else:
                res[f"tp2.{key}.vs_tp1"] = state_diff(got, keep[key])
            if spec == specs[0]:
                res[f"{tag}.{flavour}.train_losses"] = train(grown.model, grown.optimizer, grown.shape)
                with torch.no_grad():
                    keep[f"{flavour}.trained_logits.{tag}"] = gm.gather_logits(grown.model, x)
                gm.save_dist_checkpoint(grown.model, grown.optimizer, os.path.join(out, f"{flavour}_grown_{tag}"))
                res[f"{tag}.{flavour}.trained_step"] = int(next(iter(grown.optimizer.state.values()))["step"])
        gm.save_dist_checkpoint(model, opt, os.path.join(out, f"{flavour}_small_{tag}"))
        keep[f"{flavour}.small_logits"] = small_logits
        dist.barrier()


def _reference_logits(state, x):
    import torch

    from growth_ds.models import Decoder
    from growth_ds.ops.state import load_into

    ref = Decoder(state.shape)
    load_into(ref, state)
    with torch.no_grad():
        return ref(x)


def reload(tp, out, res, keep, other):
    """Load the grown checkpoints written at TP=``other`` at the current TP=``tp`` (after training)."""
    import torch

    from growth_ds.interop import megatron as gm

    for flavour, small, large, specs in cases():
        path = os.path.join(out, f"{flavour}_grown_tp{other}")
        shape = gm.checkpoint_shape(path)
        model = gm.build_gpt_model(shape, perform_initialization=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        common = gm.load_dist_checkpoint(model, opt, path)
        x, _ = batches(small)[0]
        with torch.no_grad():
            logits = gm.gather_logits(model, x)
        want = keep[f"{flavour}.trained_logits.tp{other}"]
        res[f"reload.tp{other}_at_tp{tp}.{flavour}.logits"] = max_diff(logits, want)
        res[f"reload.tp{other}_at_tp{tp}.{flavour}.step"] = common["step"]
        # one more training step continues identically at either TP size
        res[f"reload.tp{other}_at_tp{tp}.{flavour}.next_loss"] = train(model, opt, shape, steps=1)[0]


def grow_checkpoint(tp, out, res, keep):
    """grow_dist_checkpoint on phase 1's small checkpoint, and the refusal to load it into a grown shape."""
    import torch
    import torch.distributed as dist

    from growth_ds.interop import megatron as gm
    from growth_ds.interop.megatron_checkpoint import grow_dist_checkpoint

    for flavour, small, large, specs in cases():
        width, depth = methods(specs[0])
        src = os.path.join(out, f"{flavour}_small_tp1")
        dst = os.path.join(out, f"{flavour}_grown_by_ckpt_tp{tp}")
        if flavour == "llama":  # through the command line (growth-ds grow-megatron), as torchrun would run it
            import yaml

            from growth_ds.cli import build_parser

            to = os.path.join(out, f"{flavour}_large_tp{tp}.yaml")
            with open(to + f".{dist.get_rank()}", "w") as f:
                yaml.safe_dump(large.to_dict(), f)
            os.replace(to + f".{dist.get_rank()}", to)
            args = build_parser().parse_args(["grow-megatron", "--from", src, "--to", to, "--method", specs[0], "--out", dst,
                                      "--tp", str(tp), "--seed", "11"])
            res[f"ckpt_grow.tp{tp}.{flavour}.cli_rc"] = args.func(args)
        else:
            grow_dist_checkpoint(src, large, dst, width=width, depth=depth, seed=11)
        model = gm.build_gpt_model(gm.checkpoint_shape(dst), perform_initialization=False)
        opt = torch.optim.AdamW(model.parameters())
        gm.load_dist_checkpoint(model, opt, dst)
        x, _ = batches(small)[0]
        with torch.no_grad():
            logits = gm.gather_logits(model, x)
        res[f"ckpt_grow.tp{tp}.{flavour}.lossless_logits"] = max_diff(logits, keep[f"{flavour}.small_logits"])
        res[f"ckpt_grow.tp{tp}.{flavour}.vs_in_memory"] = state_diff(
            gm.to_reference_state(model, opt), keep[f"{flavour}.{specs[0]}"])
        # a grown model cannot load the small checkpoint: refused by growth-ds, and by megatron
        for check in (True, False):
            try:
                gm.load_dist_checkpoint(model, None, src, check_shape=check)
                msg = None
            except BaseException as e:  # noqa: BLE001 - the message is the result (DCP raises a BaseException)
                text = str(e)
                lines = [ln.strip() for ln in text.splitlines() if "shape mismatch" in ln]
                msg = f"{type(e).__name__}: {(lines[0] if lines else text)[:600]}"
            res[f"ckpt_grow.tp{tp}.{flavour}.load_small_into_grown.check_shape={check}"] = msg


def sanity(res):
    """The collective log sees an all-gather of a weight-sized tensor."""
    import torch
    import torch.distributed as dist

    with CollectiveLog() as log:
        t = torch.ones(64, 32)
        outs = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(outs, t)
    res["sanity.collectives"] = log.calls


def main():
    import torch
    import torch.distributed as dist

    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    res, keep = {}, {}
    t0 = time.perf_counter()
    try:
        sanity(res)
        phase(1, out, res, keep)
        phase(2, out, res, keep)
        reload(2, out, res, keep, other=1)
        grow_checkpoint(2, out, res, keep)
        setup_tp(1)
        reload(1, out, res, keep, other=2)
        res["ok"] = True
    except Exception:  # noqa: BLE001 - reported to the test
        res["ok"] = False
        res["error"] = traceback.format_exc()
    res["seconds"] = time.perf_counter() - t0
    rank = dist.get_rank()
    with open(os.path.join(out, f"results.rank{rank}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Streamed growth of megatron-core checkpoints (``growth_ds.interop.megatron_stream``).

Invariants:
* the streamed checkpoint equals the in-memory executor's at the same plan TP size, key for key, chunk for chunk,
  dtype for dtype and bit for bit (common state and objects included), for GPT-2 and Llama-GQA, tied and
  untied, every width / depth method family, moments reset, bf16 masters of a Megatron-LM run, weights only;
* the growth's own tensors alive at once never exceed one old plus one grown parameter of each kind in flight
  (tracked with weak references on every tensor it reads or produces);
* spread over 2 processes (torchrun), the streamed checkpoint equals the one-process one, and both equal the
  in-memory executor's at TP = 2 over 2 processes.
"""
import pytest

from dist_utils import launch, run_one_process

_WORKER = r'''
import json, sys, weakref
from pathlib import Path
import torch
import yaml
from megatron.core import dist_checkpointing
from growth_ds.interop import megatron as gm
from growth_ds.interop import megatron_stream as ms
from growth_ds.interop.megatron_checkpoint import grow_dist_checkpoint
from growth_ds.interop.dist_stream import ChunkReader, checkpoint_diff
from growth_ds.shapes import ModelShape

out = Path(sys.argv[1])
sys.path.insert(0, sys.argv[2])
import pp_worker  # (the Megatron-LM args of a shape)
gm.ensure_model_parallel(1)
res = {}

LLAMA = (ModelShape(flavour="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ffn=64,
                    vocab_size=96, max_seq_len=32, tied_embeddings=False),
         ModelShape(flavour="llama", n_layers=4, d_model=64, n_heads=8, n_kv_heads=4, head_dim=8, d_ffn=128,
                    vocab_size=96, max_seq_len=32, tied_embeddings=False))
GPT2 = (ModelShape(flavour="gpt2", n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, d_ffn=64,
                   vocab_size=96, max_seq_len=32),
        ModelShape(flavour="gpt2", n_layers=3, d_model=64, n_heads=8, n_kv_heads=8, head_dim=8, d_ffn=128,
                   vocab_size=96, max_seq_len=32))


def trained(small, seed):
    torch.manual_seed(seed)
    model = gm.build_gpt_model(small)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, small.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    for _ in range(2):
        opt.zero_grad()
        gm.lm_loss(model, x[:, :-1], x[:, 1:]).backward()
        opt.step()
    return model, opt


def megatron_lm_run(model, opt, small, root):
    """A Megatron-LM bf16 run: bf16 weights, float32 masters (fp32_param), its common entries."""
    params = list(model.parameters())
    masters = {id(p): p.data for p in params}
    for p in params:
        p.data = p.data.to(torch.bfloat16)
    sd = gm.checkpoint_state_dict(model, opt, masters=masters)
    del sd[gm.COMMON_KEY]
    sd.update(args=pp_worker.megatron_lm_args(small, 1, 1), iteration=2, checkpoint_version=3.0,
              opt_param_scheduler={"max_lr": 3e-4, "min_lr": 3e-5, "num_steps": 32, "warmup_steps": 2,
                                   "decay_style": "cosine"}, num_floating_point_operations_so_far=1e12)
    (Path(root) / "iter_0000002").mkdir(parents=True)
    dist_checkpointing.save(sd, str(Path(root) / "iter_0000002"))
    for p in params:
        p.data = masters[id(p)]
    (Path(root) / "latest_checkpointed_iteration.txt").write_text("2")


class Alive:
    """Peak bytes of the tensors the streamed growth reads and produces that are alive at once."""

    def __init__(self):
        self.now = self.peak = 0

    def track(self, t):
        n = t.numel() * t.element_size()
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n):
        self.now -= n


alive = Alive()
_read, _tensor = ms.SourceParams.read, ms.StreamedGrowth.tensor
ms.SourceParams.read = lambda self, *a: alive.track(_read(self, *a))
ms.StreamedGrowth.tensor = lambda self, *a: _tensor(self, *a) if self._cache and self._cache[0] == a else \
    alive.track(_tensor(self, *a))

cases = [  # (name, shapes, width, depth, extra options)
    ("llama_zero_stack", LLAMA, "zero", "stack", {}),
    ("gpt2_lemon_identity_reset", GPT2, "lemon", "identity", {"moments": "reset"}),
    ("gpt2_hypercloning_interleave", GPT2, "hypercloning", "interleave", {}),
    ("llama_duplicate_identity_weights_only", LLAMA, "duplicate", "identity", {"no_optim": True}),
    ("llama_megatron_lm_bf16", LLAMA, "zero", "identity", {}),
    ("llama_plan_tp2", LLAMA, "zero", "stack", {"tp": 2}),
    ("gpt2_hypercloning_plan_tp2", GPT2, "hypercloning", "interleave", {"tp": 2}),  # (noise from the whole std)
    # the new units' fan-in relative to each old weight's std: that std too is the whole weight's
    ("llama_relative_plan_tp2", LLAMA, "zero", "stack",
     {"tp": 2, "plan_options": {"random_std": 1.5, "random_relative": True}}),
]
for i, (name, (small, large), width, depth, kw) in enumerate(cases):
    model, opt = trained(small, i)
    src = out / f"{name}_src"
    if "megatron_lm" in name:
        megatron_lm_run(model, opt, small, src)
    else:
        gm.save_dist_checkpoint(model, opt, src)
    (out / f"{name}_large.yaml").write_text(yaml.safe_dump(large.to_dict()))
    alive.peak = alive.now = 0
    grown = grow_dist_checkpoint(src, large, out / f"{name}_streamed", width=width, depth=depth, seed=3,
                                    stream=True, **kw)
    old_max = max(p.numel() for p in model.parameters())
    new_max = max(p.numel() for p in grown.model.parameters())
    res[name + ".peak_over_bound"] = alive.peak / ((old_max + new_max) * 4)
    res[name + ".model_device"] = next(grown.model.parameters()).device.type
    if kw.get("tp", 1) == 1:
        grow_dist_checkpoint(src, large, out / f"{name}_in_memory", width=width, depth=depth, seed=3,
                                stream=False, **kw)
        sub = "iter_0000002" if "megatron_lm" in name else ""
        res[name + ".diff"] = checkpoint_diff(out / f"{name}_in_memory" / sub, out / f"{name}_streamed" / sub)
        res[name + ".n_tensors"] = len(ChunkReader(out / f"{name}_streamed" / sub).metadata.state_dict_metadata)
# a shape the checkpoint does not hold (--shape): refused by name before anything is written
import dataclasses
try:
    grow_dist_checkpoint(out / "llama_zero_stack_src", LLAMA[1], out / "wrong", width="zero", depth="stack",
                            small=dataclasses.replace(LLAMA[0], d_ffn=48), stream=True)
    res["wrong_shape"] = None
except ValueError as e:
    res["wrong_shape"] = str(e)
res["wrong_shape_wrote"] = sorted(p.name for p in out.iterdir() if "wrong" in p.name)
print("RESULT " + json.dumps(res))
'''

NAMES = ["llama_zero_stack", "gpt2_lemon_identity_reset", "gpt2_hypercloning_interleave",
         "llama_duplicate_identity_weights_only", "llama_megatron_lm_bf16"]


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    res, _ = run_one_process(_WORKER, out)
    return out, res


@pytest.mark.parametrize("name", NAMES)
def test_streamed_checkpoint_equals_the_in_memory_one(streamed, name):
    _, res = streamed
    assert res[name + ".diff"] == []
    assert res[name + ".n_tensors"] > 10
    assert res[name + ".model_device"] == "meta"  # the growth never materialised the grown model


TP2 = ["llama_plan_tp2", "gpt2_hypercloning_plan_tp2", "llama_relative_plan_tp2"]


@pytest.mark.parametrize("name", NAMES + TP2)
def test_streamed_growth_holds_one_parameter_at_a_time(streamed, name):
    # one old and one grown parameter (float32) alive at once, never the model; a leak or an up-front read of
    # the old checkpoint breaks the bound at once (every case has more than 10 parameters)
    assert 0 < streamed[1][name + ".peak_over_bound"] <= 1.0


@pytest.mark.parametrize("name,method", [("llama_plan_tp2", ["zero+stack"]),
                                         ("gpt2_hypercloning_plan_tp2", ["hypercloning+interleave"]),
                                         ("llama_relative_plan_tp2",
                                          ["zero+stack", "--fan-in-std", "1.5", "--fan-in-relative"])])
def test_two_processes_stream_what_one_does_and_match_in_memory_tp2(streamed, name, method):
    from growth_ds.interop.dist_stream import checkpoint_diff

    out, _ = streamed
    src, large = out / f"{name}_src", out / f"{name}_large.yaml"
    common = ["grow-megatron", "--from", src, "--to", large, "--method", *method, "--seed", "3"]
    two = launch(common + ["--out", out / f"{name}_two_streamed", "--tp", "2"], nproc=2,
                 env={"PYTHONWARNINGS": "ignore"})
    assert two.returncode == 0, two.stderr[-4000:]
    mem = launch(common + ["--out", out / f"{name}_two_in_memory", "--in-memory"], nproc=2,  # (TP = 2 processes)
                 env={"PYTHONWARNINGS": "ignore"})
    assert mem.returncode == 0, mem.stderr[-4000:]
    # each rank wrote its own share of the tensors
    assert sorted(p.name for p in (out / f"{name}_two_streamed").glob("*.distcp")) == ["__0_0.distcp",
                                                                                       "__1_0.distcp"]
    assert checkpoint_diff(out / f"{name}_streamed", out / f"{name}_two_streamed") == []  # (plan TP = 2 in both)
    assert checkpoint_diff(out / f"{name}_two_in_memory", out / f"{name}_two_streamed") == []


def test_the_number_of_processes_does_not_change_a_streamed_growth(streamed):
    """Three processes (no TP size divides the 2 KV heads by 3): the plan as made, the same checkpoint as one
    process writes."""
    from growth_ds.interop.dist_stream import checkpoint_diff

    out, _ = streamed
    name = "llama_zero_stack"
    three = launch(["grow-megatron", "--from", out / f"{name}_src", "--to", out / f"{name}_large.yaml", "--method",
                    "zero+stack", "--seed", "3", "--out", out / f"{name}_three"], nproc=3,
                   env={"PYTHONWARNINGS": "ignore"})
    assert three.returncode == 0, three.stderr[-4000:]
    assert len(list((out / f"{name}_three").glob("*.distcp"))) == 3
    assert checkpoint_diff(out / f"{name}_streamed", out / f"{name}_three") == []


def test_a_shape_the_checkpoint_does_not_hold_is_refused_before_writing(streamed):
    msg = streamed[1]["wrong_shape"]
    assert msg is not None and "linear_fc1.weight" in msg and "global shape" in msg, msg
    assert streamed[1]["wrong_shape_wrote"] == []

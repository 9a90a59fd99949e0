"""Growing a Megatron-LM run's checkpoint as it is on disk: ``ROOT/latest_checkpointed_iteration.txt`` and
``ROOT/iter_*/`` written by megatron-core's own ``dist_checkpointing.save`` of a GPTModel's and an optimizer's
sharded state dicts, with Megatron-LM's common entries (``args``, ``iteration``, scheduler, FLOPs counter) and no
growth-ds entry. ``growth-ds grow --from ROOT`` reads the shape from ``args`` and the tensor metadata, grows, and
writes ``NEW_ROOT/iter_*`` + the tracker with the args grown and the run state carried; megatron-core's loader
reads it back at the grown shape: logits equal the small model's, moments equal ``ops.grow``. Bad input is
refused, by name, before anything is written."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from dist_utils import REPO, run_one_process

_WORKER = r'''
import argparse, json, os, sys, time
from pathlib import Path
import torch
import yaml
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedObject
from growth_ds.cli import main as cli
from growth_ds.interop.extra_state import read_objects
from growth_ds.interop.megatron_lm import is_rng_key
from growth_ds.interop import megatron as gm
from growth_ds.ops import grow, make_plan
from growth_ds.shapes import ModelShape

out_dir = Path(sys.argv[1])
sys.path.insert(0, sys.argv[2])
import pp_worker  # (the Megatron-LM args of a shape)
gm.ensure_model_parallel(1)
res = {}


def megatron_lm_args(shape):
    return pp_worker.megatron_lm_args(shape, 1, 1)


def save_run(model, opt, shape, root, iteration, content_metadata=None, bf16=False):
    params = list(model.parameters())
    masters = {id(p): p.data for p in params} if bf16 else None
    for p in params if bf16 else ():  # a bf16 run: bf16 weights, float32 masters in the optimizer
        p.data = p.data.to(torch.bfloat16)
    sd = gm.checkpoint_state_dict(model, opt, masters=masters)
    del sd[gm.COMMON_KEY]  # a Megatron-LM checkpoint: no growth-ds entry
    # the run's RNG states, as Megatron-LM saves them: one object of global shape (PP, TP), one list per rank
    rng = [{"random_rng_state": __import__("random").getstate(), "torch_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}, "tag": f"iteration {iteration}"}]
    sd["rng_state"] = ShardedObject("rng_state", rng, (1, 1), (0, 0), replica_id=0)
    sd.update(args=megatron_lm_args(shape), iteration=iteration, checkpoint_version=3.0,
              opt_param_scheduler={"max_lr": 3e-4, "min_lr": 3e-5, "num_steps": iteration * 16, "warmup_steps": 2,
                                   "decay_style": "cosine"},
              num_floating_point_operations_so_far=1.25e12)
    d = Path(root) / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    dist_checkpointing.save(sd, str(d), content_metadata=content_metadata)
    for p in params if bf16 else ():
        p.data = masters[id(p)]
    (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def err(argv):
    try:
        rc = cli(argv)
        return f"rc={rc}"
    except SystemExit as e:
        return f"exit={e.code}"


for flavour, small, large in [
    ("gpt2", ModelShape(flavour="gpt2", n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, d_ffn=64,
                        vocab_size=96, max_seq_len=32),
     ModelShape(flavour="gpt2", n_layers=3, d_model=48, n_heads=6, n_kv_heads=6, head_dim=8, d_ffn=96,
                vocab_size=96, max_seq_len=32)),
    ("llama", ModelShape(flavour="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ffn=64,
                         vocab_size=96, max_seq_len=32, tied_embeddings=False),
     ModelShape(flavour="llama", n_layers=4, d_model=64, n_heads=8, n_kv_heads=4, head_dim=8, d_ffn=128,
                vocab_size=96, max_seq_len=32, tied_embeddings=False)),
]:
    torch.manual_seed(0)
    model = gm.build_gpt_model(small)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, small.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        gm.lm_loss(model, x[:, :-1], x[:, 1:]).backward()
        opt.step()
    root, new = out_dir / f"{flavour}_run", out_dir / f"{flavour}_grown"
    rng_before = torch.get_rng_state()  # (what save_run stores as torch_rng_state)
    save_run(model, opt, small, root, 3)
    to = out_dir / f"{flavour}_large.yaml"
    to.write_text(yaml.safe_dump(large.to_dict()))
    method = "zero+identity"
    r = f"{flavour}."
    # refusals first: nothing may be written
    res[r + "missing_iteration"] = err(["grow", "--from", str(root), "--iteration", "9", "--to", str(to),
                                        "--method", method, "--out", str(new)])
    res[r + "missing_iteration_wrote"] = new.exists()
    bad = out_dir / f"{flavour}_bucketed"
    save_run(model, opt, small, bad, 3, content_metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    res[r + "dp_reshardable"] = err(["grow", "--from", str(bad), "--to", str(to), "--method", method, "--out",
                                     str(new)])
    res[r + "dp_reshardable_wrote"] = new.exists()
    flat = out_dir / f"{flavour}_flattened"
    save_run(model, opt, small, flat, 3, content_metadata={"distrib_optim_sharding_type": "fully_sharded_model_space"})
    res[r + "fully_sharded_model_space"] = err(["grow", "--from", str(flat), "--to", str(to), "--method", method,
                                                "--out", str(new)])
    res[r + "fully_sharded_model_space_wrote"] = new.exists()
    cut = out_dir / f"{flavour}_truncated"  # a copy of the run with one shard cut short
    __import__("shutil").copytree(root, cut)
    shard = sorted((cut / "iter_0000003").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    res[r + "truncated"] = err(["grow", "--from", str(cut), "--to", str(to), "--method", method, "--out", str(new)])
    res[r + "truncated_wrote"] = new.exists()
    res[r + "target_tp"] = err(["grow", "--from", str(root), "--to", str(to), "--method", method, "--out", str(new),
                                "--target-tp", "5"])  # no grown size splits over 5 ranks
    res[r + "target_tp_wrote"] = new.exists()
    # the growth, for a next job at TP=2 and one layer or two per stage
    res[r + "rc"] = cli(["grow", "--from", str(root), "--to", str(to), "--method", method, "--out", str(new),
                         "--target-tp", "2", "--target-pp", "3" if flavour == "gpt2" else "2"])
    res[r + "tracker"] = (new / "latest_checkpointed_iteration.txt").read_text().strip()
    res[r + "dirs"] = sorted(p.name for p in new.iterdir())
    common = dist_checkpointing.load_common_state_dict(str(new / "iter_0000003"))
    a = common["args"]
    res[r + "args"] = [a.num_layers, a.hidden_size, a.num_attention_heads, a.num_query_groups, a.ffn_hidden_size,
                       a.lr, a.train_iters]
    res[r + "layout"] = [a.tensor_model_parallel_size, a.pipeline_model_parallel_size]
    # the layout changed: no rank's RNG state fits the new ranks; none written, and args say so
    res[r + "rng_layout_changed"] = [sorted(k for k, _ in read_objects(new / "iter_0000003", is_rng_key)),
                                     getattr(a, "no_save_rng", None)]
    res[r + "run_state"] = [common["iteration"], common["checkpoint_version"], common["opt_param_scheduler"]["num_steps"],
                            common["num_floating_point_operations_so_far"]]
    # megatron-core's loader at the grown shape (the plan's: zero width rescales the norm's eps)
    plan = make_plan(small, large, width="zero", depth="identity", seed=0)
    grown_model = gm.build_gpt_model(plan.grown_shape, perform_initialization=False)
    grown_opt = torch.optim.AdamW(grown_model.parameters())
    gm.load_dist_checkpoint(grown_model, grown_opt, new / "iter_0000003")
    with torch.no_grad():
        a_logits, b_logits = gm.gather_logits(model, x), gm.gather_logits(grown_model, x)
    res[r + "logit_err"] = float(((a_logits - b_logits).abs() / a_logits.abs().clamp(min=1)).max())
    ref = grow(gm.to_reference_state(model, opt), plan)
    got = gm.to_reference_state(grown_model, grown_opt)
    res[r + "moments_equal"] = all(torch.equal(got.exp_avg[n], ref.exp_avg[n]) and
                                   torch.equal(got.exp_avg_sq[n], ref.exp_avg_sq[n]) for n in ref.exp_avg)
    res[r + "step"] = [got.step, ref.step]
    # an existing output is kept without --force
    mtime = (new / "latest_checkpointed_iteration.txt").stat().st_mtime_ns
    res[r + "exists"] = err(["grow", "--from", str(root), "--to", str(to), "--method", method, "--out", str(new)])
    res[r + "exists_kept"] = (new / "latest_checkpointed_iteration.txt").stat().st_mtime_ns == mtime
    res[r + "force_rc"] = cli(["grow", "--from", str(root), "--to", str(to), "--method", method, "--out", str(new),
                               "--force"])  # replaced whole, through a staging name
    res[r + "force_dirs"] = sorted(p.name for p in new.iterdir())
    # the layout kept: the RNG states travel as they were
    kept = read_objects(new / "iter_0000003", is_rng_key)
    res[r + "rng_kept"] = [[k, list(off), list(shape), payload[0]["tag"],
                            torch.equal(payload[0]["torch_rng_state"], rng_before)]
                           for (k, off), (payload, shape) in sorted(kept.items())]
    res[r + "rng_kept_no_save_rng"] = getattr(dist_checkpointing.load_common_state_dict(
        str(new / "iter_0000003"))["args"], "no_save_rng", None)
    res[r + "leftovers"] = sorted(p.name for p in out_dir.iterdir() if p.name.startswith("."))
    # weights only
    w = out_dir / f"{flavour}_weights"
    res[r + "no_optim_rc"] = cli(["grow", "--from", str(root / "iter_0000003"), "--to", str(to), "--method", method,
                                  "--out", str(w), "--no-optim"])
    keys = dist_checkpointing.load_tensors_metadata(str(w / "iter_0000003"))
    res[r + "no_optim_keys"] = [sum(k.startswith("optimizer.") for k in keys), sum(k.startswith("decoder.") for k in keys)]
    # the LR policy: one the run's scheduler expresses, or refused before writing
    rw = out_dir / f"{flavour}_rewarm"
    res[r + "rewarm"] = err(["grow", "--from", str(root), "--to", str(to), "--method", method, "--out", str(rw),
                             "--lr-policy", "rewarm"])
    res[r + "rewarm_wrote"] = rw.exists()
    rs = out_dir / f"{flavour}_restart"
    res[r + "restart_rc"] = cli(["grow", "--from", str(root), "--to", str(to), "--method", method, "--out", str(rs),
                                 "--lr-policy", "restart", "--moments", "reset"])
    sched = dist_checkpointing.load_common_state_dict(str(rs / "iter_0000003"))["opt_param_scheduler"]
    res[r + "restart_scheduler"] = [sched["num_steps"], sched["max_lr"]]
    # a bf16 run: the float32 masters are grown (not the rounded weights) and written back as masters
    b_root, b_new = out_dir / f"{flavour}_bf16_run", out_dir / f"{flavour}_bf16_grown"
    save_run(model, opt, small, b_root, 3, bf16=True)
    res[r + "bf16_rc"] = cli(["grow", "--from", str(b_root), "--to", str(to), "--method", method, "--out", str(b_new)])
    meta = dist_checkpointing.load_tensors_metadata(str(b_new / "iter_0000003"))
    res[r + "bf16_dtypes"] = [str(meta["embedding.word_embeddings.weight"].dtype),
                              str(meta["optimizer.state.fp32_param.embedding.word_embeddings.weight"].dtype)]
    m2 = gm.build_gpt_model(plan.grown_shape, perform_initialization=False)
    o2 = torch.optim.AdamW(m2.parameters())
    gm.load_dist_checkpoint(m2, o2, b_new / "iter_0000003")
    res[r + "bf16_masters_loaded"] = gm.load_fp32_masters(m2, b_new / "iter_0000003")
    got2 = gm.to_reference_state(m2, o2)
    res[r + "bf16_values_equal"] = all(torch.equal(got2.params[n], ref.params[n]) for n in ref.params)
    res[r + "bf16_moments_equal"] = all(torch.equal(got2.exp_avg[n], ref.exp_avg[n]) for n in ref.exp_avg)
print("RESULT " + json.dumps(res))
'''


_one_process = run_one_process


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm")
    return _one_process(_WORKER, out)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_megatron_lm_run_is_grown_in_its_layout(lm, flavour):
    res, _ = lm
    r = f"{flavour}."
    assert res[r + "rc"] == 0
    assert res[r + "tracker"] == "3" and res[r + "dirs"] == ["iter_0000003", "latest_checkpointed_iteration.txt"]
    layers, hidden, heads, groups, ffn = (3, 48, 6, 6, 96) if flavour == "gpt2" else (4, 64, 8, 4, 128)
    assert res[r + "args"] == [layers, hidden, heads, groups, ffn, 3e-4, 1000]  # sizes grown, the rest kept
    assert res[r + "run_state"] == [3, 3.0, 48, 1.25e12]
    assert res[r + "layout"] == [2, 3 if flavour == "gpt2" else 2]  # the next job's layout (--target-tp/-pp)
    assert res[r + "logit_err"] < 1e-5
    assert res[r + "moments_equal"] and res[r + "step"] == [3, 3]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_the_run_rng_states_travel_when_the_layout_does(lm, flavour):
    """Megatron-LM reloads its RNG states only at the checkpoint's own (TP, PP): kept when the layout is, dropped
    (and ``args.no_save_rng`` set, so the next job seeds afresh instead of failing on missing shards) when not."""
    res, _ = lm
    r = f"{flavour}."
    assert res[r + "rng_layout_changed"] == [[], True]
    assert res[r + "rng_kept"] == [["rng_state", [0, 0], [1, 1], "iteration 3", True]]
    assert res[r + "rng_kept_no_save_rng"] is None


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_bad_megatron_lm_input_is_refused_before_writing(lm, flavour):
    res, stderr = lm
    r = f"{flavour}."
    assert res[r + "missing_iteration"] == "rc=2" and not res[r + "missing_iteration_wrote"]
    assert "no iter_0000009" in stderr and "iter_0000003" in stderr
    assert res[r + "dp_reshardable"] == "rc=2" and not res[r + "dp_reshardable_wrote"]
    assert "dp_reshardable" in stderr and "--dist-ckpt-optim-fully-reshardable" in stderr
    assert res[r + "fully_sharded_model_space"] == "rc=2" and not res[r + "fully_sharded_model_space_wrote"]
    assert "(fully_sharded_model_space), which megatron-core no longer loads" in stderr
    assert res[r + "truncated"] == "rc=2" and not res[r + "truncated_wrote"] and "is truncated" in stderr
    assert res[r + "target_tp"] == "rc=2" and not res[r + "target_tp_wrote"]
    assert "num_attention_heads" in stderr and "is not divisible by --target-tp 5" in stderr
    assert res[r + "exists"] == "rc=2" and res[r + "exists_kept"]
    assert res[r + "force_rc"] == 0 and res[r + "force_dirs"] == ["iter_0000003", "latest_checkpointed_iteration.txt"]
    assert res[r + "leftovers"] == []
    assert res[r + "no_optim_rc"] == 0
    n_optim, n_model = res[r + "no_optim_keys"]
    assert n_optim == 0 and n_model > 0


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_the_lr_policy_reaches_the_run_scheduler(lm, flavour):
    """``continue`` carries the scheduler state (above); ``restart`` starts it over; ``rewarm``, which Megatron-LM's
    scheduler cannot express, is refused before anything is written."""
    res, stderr = lm
    r = f"{flavour}."
    assert res[r + "rewarm"] == "rc=2" and not res[r + "rewarm_wrote"] and "--lr-policy rewarm" in stderr
    assert res[r + "restart_rc"] == 0 and res[r + "restart_scheduler"] == [0, 3e-4]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_a_bf16_run_grows_its_float32_masters(lm, flavour):
    """Megatron-LM's mixed precision keeps float32 masters as ``optimizer.state.fp32_param``: they, not the
    bf16 weights, are grown (equal to ops.grow of the float32 state) and written back as masters beside bf16
    weights."""
    res, _ = lm
    r = f"{flavour}."
    assert res[r + "bf16_rc"] == 0
    assert res[r + "bf16_dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert res[r + "bf16_masters_loaded"] and res[r + "bf16_values_equal"] and res[r + "bf16_moments_equal"]


# ---- any TP x PP in, any TP x PP out -------------------------------------------------------------------------
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
TARGET = {(1, 1): (2, 2), (2, 1): (1, 2), (1, 2): (2, 1), (2, 2): (1, 1)}  # reload at a different (TP, PP)

_GROW_PP = r'''
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
import pp_worker
from growth_ds.cli import main as cli
from growth_ds.interop import megatron as gm
from growth_ds.ops import grow, make_plan

out = Path(sys.argv[1])
gm.ensure_model_parallel(1)
res = {}
for src in sorted(p for p in out.iterdir() if p.is_dir()):
    for flavour in ("gpt2", "llama"):
        small, large = pp_worker.shapes(flavour)
        to = out / f"{flavour}_large.yaml"
        to.write_text(__import__("yaml").safe_dump(large.to_dict()))
        r = f"{src.name}.{flavour}."
        res[r + "rc"] = cli(["grow", "--from", str(src / f"{flavour}_run"), "--to", str(to), "--method",
                             "zero+identity", "--out", str(src / f"{flavour}_grown")])
        # the small model and its Adam state, read at (TP, PP) = (1, 1), as the reference
        model = gm.build_gpt_model(small, perform_initialization=False)
        opt = torch.optim.AdamW(model.parameters())
        gm.load_dist_checkpoint(model, opt, src / f"{flavour}_run" / "iter_0000005", step=5)
        with torch.no_grad():
            torch.save(gm.gather_logits(model, pp_worker.tokens()), src / f"{flavour}_small_logits.pt")
        plan = make_plan(small, large, width="zero", depth="identity", seed=0)
        ref = grow(gm.to_reference_state(model, opt), plan)
        grown = gm.build_gpt_model(plan.grown_shape, perform_initialization=False)
        gopt = torch.optim.AdamW(grown.parameters())
        gm.load_dist_checkpoint(grown, gopt, src / f"{flavour}_grown" / "iter_0000005")
        got = gm.to_reference_state(grown, gopt)
        res[r + "moments_equal"] = all(torch.equal(got.exp_avg[n], ref.exp_avg[n]) and
                                       torch.equal(got.exp_avg_sq[n], ref.exp_avg_sq[n]) for n in ref.exp_avg)
        res[r + "values_equal"] = all(torch.equal(got.params[n], ref.params[n]) for n in ref.params)
print("RESULT " + json.dumps(res))
'''


def _torchrun(out, phase, tp, pp):
    from dist_utils import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp * pp), "--master_port",
           str(free_port()), str(REPO / "tests" / "pp_worker.py"), str(out), phase, str(tp), str(pp)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def pp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp")
    for tp, pp in LAYOUTS:  # a Megatron-LM run saved at every layout
        (out / f"s{tp}{pp}").mkdir()
        _torchrun(out / f"s{tp}{pp}", "save", tp, pp)
    res, _ = _one_process(_GROW_PP, out)
    for (tp, pp), target in TARGET.items():  # each grown checkpoint read back at another layout
        _torchrun(out / f"s{tp}{pp}", "check", *target)
    return out, res


@pytest.mark.parametrize("src", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_any_tp_pp_in_any_tp_pp_out(pp_runs, src, flavour):
    """Saved at (TP, PP) = ``src`` with Transformer Engine-style ``_extra_state`` objects, grown (zero width +
    identity depth), read back by megatron-core at another layout: the pipeline's logits equal the small
    model's; every stage holds the layers the target layout prescribes, and each layer's modules load the
    extra state of the layer it was grown from; values and Adam moments equal ops.grow on the state read at
    (1, 1)."""
    import torch

    out, res = pp_runs
    d = out / f"s{src[0]}{src[1]}"
    r = f"{d.name}.{flavour}."
    assert res[r + "rc"] == 0 and res[r + "moments_equal"] and res[r + "values_equal"]
    tp, pp = TARGET[src]
    want = torch.load(d / f"{flavour}_small_logits.pt")
    got = torch.load(d / f"{flavour}_tp{tp}_pp{pp}_logits.pt")
    assert got.shape == want.shape
    assert float(((got - want).abs() / want.abs().clamp(min=1)).max()) < 1e-5
    per_stage = 4 // pp
    from growth_ds.ops import make_plan
    from pp_worker import TE_MODULES, shapes

    sources = [e.source for e in make_plan(*shapes(flavour), width="zero", depth="identity", seed=0).layers]
    for s in range(pp):
        got = json.loads((d / f"{flavour}_tp{tp}_pp{pp}_stage{s}.json").read_text())
        assert got["layers"] == list(range(s * per_stage, (s + 1) * per_stage))
        # Transformer Engine's _extra_state: each grown layer loaded the payload of the layer it was built from
        for layer in got["layers"]:
            assert got["extra_state"][str(layer)] == {n: f"{sources[layer]}:{n}" for n in TE_MODULES}


def test_the_next_jobs_layout_is_checked_by_name():
    """Pure: each grown size the next job's TP / PP cannot split is named (before anything is loaded)."""
    from growth_ds.interop.megatron_lm import check_target_layout
    from growth_ds.shapes import ModelShape

    s = ModelShape(flavour="llama", n_layers=4, d_model=64, n_heads=8, n_kv_heads=2, head_dim=8, d_ffn=96,
                   vocab_size=96, max_seq_len=32)
    check_target_layout(s, 2, 4)  # splits
    with pytest.raises(ValueError) as e:
        check_target_layout(s, 4, 3)
    msg = str(e.value)
    assert "num_query_groups 2 is not divisible by --target-tp 4" in msg
    assert "num_layers 4 is not divisible by --target-pp 3" in msg and "num_attention_heads" not in msg
    # the vocabulary (96 rows) is no obstacle: Megatron-LM pads it again for TP=64, and megatron-core loads the
    # embedding with allow_shape_mismatch
    check_target_layout(dataclasses.replace(s, n_heads=64, n_kv_heads=64, d_ffn=128), 64, None)

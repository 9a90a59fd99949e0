"""Growing checkpoints written by megatron-core's REAL optimizers, as Megatron-LM saves and loads them.

``megatron_optim_harness`` builds megatron-core's own ``DistributedDataParallel`` and ``get_megatron_optimizer``
(the ``DistributedOptimizer`` with ``fully_reshardable`` state, or the non-distributed ``FP32Optimizer`` /
``Float16OptimizerWithFloat16Params``) on the CPU, trains 3 steps and saves the run as Megatron-LM's
``save_checkpoint`` does (``iter_0000003`` + tracker, content metadata, the optimizer's own common entries).
``growth-ds grow`` grows it; a fresh megatron optimizer of the grown shape then loads the result through
Megatron-LM's ``load_checkpoint`` path. Checked: the loaded fp32 masters, ``exp_avg`` and ``exp_avg_sq`` equal
``ops.grow`` of the state the small run's optimizer held, exactly; Adam's step carries; the grown model's logits
equal the small model's (float32 runs); and the real optimizer trains the grown model on (its loss falls).
"""
import pytest

from dist_utils import run_one_process

_WORKER = r'''
import json, sys
from pathlib import Path
import torch
import yaml
sys.path.insert(0, sys.argv[2])
import megatron_optim_harness as h
import pp_worker
from growth_ds.cli import main as cli
from growth_ds.interop import megatron as gm
from growth_ds.ops import grow, make_plan

out = Path(sys.argv[1])
res = {}


def plain_state(shape, snap, step):
    """A local-spec model + AdamW holding a megatron optimizer's snapshot (fp32 masters, moments; the
    distributed optimizer's are flat shards, whole parameters at DP=1)."""
    model = gm.build_gpt_model(shape, perform_initialization=False)
    opt = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(snap[n]["main_param"].reshape(p.shape))
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": snap[n]["exp_avg"].reshape(p.shape).clone(),
                            "exp_avg_sq": snap[n]["exp_avg_sq"].reshape(p.shape).clone()}
    return model, opt


def logits(model, shape):
    x = pp_worker.tokens()
    with torch.no_grad():
        return gm.forward_logits(h.unwrap_model(model), x).float()


for flavour, distributed, bf16 in [("llama", True, False), ("gpt2", False, False), ("llama", False, True),
                                   ("gpt2", True, True)]:
    tag = f"{flavour}_{'distopt' if distributed else 'nondist'}_{'bf16' if bf16 else 'fp32'}"
    small, large = pp_worker.shapes(flavour)
    model, opt, _ = h.build(small, distributed=distributed, bf16=bf16, seed=1234)
    h.train_steps(model, opt, 3)
    root = out / tag / "run"
    h.save(model, opt, h.iteration_dir(root, 3), iteration=3)
    h.write_tracker(root, 3)
    snap = h.optimizer_state_snapshot(model, opt)
    ref_model, ref_opt = plain_state(small, snap, 3)
    plan = make_plan(small, large, width="zero", depth="identity", seed=0)
    want = grow(gm.to_reference_state(ref_model, ref_opt), plan)
    to = out / tag / "large.yaml"
    to.write_text(yaml.safe_dump(large.to_dict()))
    r = tag + "."
    res[r + "rc"] = cli(["grow", "--from", str(root), "--to", str(to), "--method", "zero+identity",
                         "--out", str(out / tag / "grown")])
    # Megatron-LM's loader, a fresh megatron optimizer of the grown shape
    gmodel, gopt, _ = h.build(plan.grown_shape, distributed=distributed, bf16=bf16, seed=99)
    loaded = h.load(gmodel, gopt, str(out / tag / "grown"))
    got = h.optimizer_state_snapshot(gmodel, gopt)
    exp_model, exp_opt = gm.build_gpt_model(plan.grown_shape, perform_initialization=False), None
    exp_opt = torch.optim.AdamW(exp_model.parameters())
    gm.load_reference_state(exp_model, want, exp_opt)
    equal = {}
    for n, p in exp_model.named_parameters():
        st = exp_opt.state[p]
        equal[n] = [torch.equal(got[n][k].reshape(p.shape), v) for k, v in
                    (("main_param", p.detach()), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"]))]
    res[r + "not_equal"] = sorted(n for n, v in equal.items() if not all(v))
    res[r + "n_params"] = len(equal)
    res[r + "steps"] = sorted({int(v["step"]) for v in got.values()})
    res[r + "iteration"] = loaded["iteration"]
    res[r + "sharding"] = (loaded.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    if not bf16:
        a, b = logits(model, small), logits(gmodel, plan.grown_shape)
        res[r + "logit_err"] = float(((a - b).abs() / a.abs().clamp(min=1)).max())
    res[r + "losses"] = h.train_steps(gmodel, gopt, 3)
print("RESULT " + json.dumps(res))
'''

CASES = ["llama_distopt_fp32", "gpt2_nondist_fp32", "llama_nondist_bf16", "gpt2_distopt_bf16"]


@pytest.fixture(scope="module")
def real_optim(tmp_path_factory):
    return run_one_process(_WORKER, tmp_path_factory.mktemp("mlm_optim"))[0]


@pytest.mark.parametrize("case", CASES)
def test_real_megatron_optimizer_loads_the_grown_run(real_optim, case):
    r = case + "."
    res = real_optim
    assert res[r + "rc"] == 0
    assert res[r + "n_params"] > 0 and res[r + "not_equal"] == []  # masters and moments = ops.grow, exactly
    assert res[r + "steps"] == [3] and res[r + "iteration"] == 3  # Adam's step and the iteration carry
    if "distopt" in case:
        assert res[r + "sharding"] == "fully_reshardable"
    if "fp32" in case:
        assert res[r + "logit_err"] < 1e-5  # lossless growth, read back by megatron-core
    losses = res[r + "losses"]
    assert all(x == x for x in losses) and losses[-1] < losses[0]  # the real optimizer trains on

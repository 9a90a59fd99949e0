"""benchmarks/saving.py builds each arm as data: the staged arm's stage boundaries sit at the planned share of
the budget's FLOPs (the small stages' FLOPs counted), its first shape is the recipe's, every stage gets its LR."""
import sys

import pytest

from dist_utils import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
saving = pytest.importorskip("saving")


def _budget_flops(budget):
    return round(saving.BASE_STEPS * budget) * saving._fpt(saving.LARGE)


@pytest.mark.parametrize("name", ["zero-stack@15%", "tiny-zero-stack@15%", "zero-then-stack@10-25%"])
@pytest.mark.parametrize("budget", [0.5, 1.0])
def test_stage_boundaries_spend_the_planned_share_of_flops(tmp_path, name, budget):
    st = saving.Study(tmp_path, jobs=1, eval_tokens=1024)
    rec = saving.RECIPES[name]
    lrs = (4e-3,) + (8e-3,) * len(rec.grows)
    run, cfg = st.staged(3, rec, budget, 8e-3, lrs=lrs)
    stages = cfg["stages"]
    assert run.startswith(f"staged/{name}-lr") and run.endswith(f"/b{budget:g}/seed3")
    assert len(stages) == len(rec.grows) + 1 and [s["lr"] for s in stages] == list(lrs)
    first = stages[0]["shape"]
    assert first == (rec.first if isinstance(rec.first, dict) else str(rec.first))
    spent, prev_step, prev = 0.0, 0, rec.first
    for stage, (shape, grow, at) in zip(stages, rec.grows):  # each stage ends once `at` of the FLOPs are spent
        steps = stage["until"]["steps"] - prev_step
        spent += steps * saving._fpt(prev)
        want = at * _budget_flops(budget)
        assert spent == pytest.approx(want, rel=2 * saving._fpt(prev) / want)  # (to within a step)
        prev_step, prev = stage["until"]["steps"], shape
    assert cfg["train"]["total_steps"] == round(saving.BASE_STEPS * budget) and cfg["train"]["budget"] == "flops"
    assert stages[-1]["grow"] == {k: v for k, v in rec.grows[-1][1].items()}


def test_reinit_arm_only_differs_by_the_reinitialised_growth(tmp_path):
    st = saving.Study(tmp_path, jobs=1, eval_tokens=1024)
    rec = saving.RECIPES["zero-stack@15%"]
    _, a = st.staged(0, rec, 1.0, 8e-3, lrs=(4e-3, 8e-3))
    _, b = st.staged(0, rec, 1.0, 8e-3, reinit=True, lrs=(4e-3, 8e-3))
    assert b["stages"][1]["grow"] == {**a["stages"][1]["grow"], "reinit": True}
    assert a["stages"][0] == b["stages"][0] and a["train"] == b["train"]

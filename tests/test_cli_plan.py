"""`growth-ds plan`: a known law and candidate shapes give the stage table, JSON and plot."""
import json

from growth_ds.cli import main
from growth_ds.schedule import ChinchillaFit, StagePlan


def test_plan_from_a_law(tmp_path, capsys):
    law = ChinchillaFit(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Hoffmann et al.'s fit
    (tmp_path / "law.json").write_text(law.to_json())
    shapes = ["configs/shapes/gpt2-124m.yaml", "configs/shapes/gpt2-350m.yaml", "configs/shapes/gpt2-774m.yaml"]
    out = tmp_path / "plan.json"
    assert main(["plan", "--law", str(tmp_path / "law.json"), "--shapes", *shapes, "--budget", "1e20",
                 "--out", str(out), "--png", str(tmp_path / "plan.png")]) == 0
    printed = capsys.readouterr().out
    plan = StagePlan.from_json(out.read_text())
    assert plan.stages and "saving" in printed.lower()
    assert json.loads((tmp_path / "plan.law.json").read_text())
    assert (tmp_path / "plan.png").stat().st_size > 1000
    assert main(["plan", "--shapes", *shapes, "--budget", "1e20"]) == 2  # neither --law nor --logs


def test_fitting_options_with_a_fitted_law_are_refused(tmp_path, capsys):
    law = ChinchillaFit(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)
    (tmp_path / "law.json").write_text(law.to_json())
    shapes = ["configs/shapes/gpt2-124m.yaml", "configs/shapes/gpt2-350m.yaml"]
    for extra in (["--form", "kaplan_ns"], ["--bootstrap", "50"]):
        assert main(["plan", "--law", str(tmp_path / "law.json"), "--shapes", *shapes, "--budget", "1e20",
                     *extra]) == 2
        assert extra[0] in capsys.readouterr().err


def test_plan_out_is_not_overwritten_without_force(tmp_path, capsys):
    law = ChinchillaFit(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)
    (tmp_path / "law.json").write_text(law.to_json())
    shapes = ["configs/shapes/gpt2-124m.yaml", "configs/shapes/gpt2-350m.yaml"]
    out = tmp_path / "plan.json"
    out.write_text("precious")
    argv = ["plan", "--law", str(tmp_path / "law.json"), "--shapes", *shapes, "--budget", "1e20", "--out", str(out)]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "precious"
    assert main(argv + ["--force"]) == 0
    assert StagePlan.from_json(out.read_text()).stages
    law_path = tmp_path / "law.json"  # --out may not clobber the law it reads
    assert main(["plan", "--law", str(law_path), "--shapes", *shapes, "--budget", "1e20",
                 "--out", str(tmp_path / "law.json"), "--force"]) == 2
    assert json.loads(law_path.read_text())

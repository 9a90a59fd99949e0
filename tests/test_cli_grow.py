"""`growth-ds grow` on saved checkpoints: lossless result, atomic writes, clear refusals."""
import dataclasses

import pytest
import torch
import yaml

from growth_ds.checkpoint import load_state, save_state
from growth_ds.cli import main
from growth_ds.models import Decoder
from growth_ds.ops import TrainingState
from growth_ds.ops.state import load_into
from helpers import batch, randomised_model, small_shape


@pytest.fixture
def small_ckpt(tmp_path):
    shape = small_shape("llama")
    model = randomised_model(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch(shape)
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    opt.step()
    path = tmp_path / "small.pt"  # a plain training loop's checkpoint
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1, "shape": shape.to_dict()}, path)
    large = dataclasses.replace(shape, d_model=64, n_heads=8, n_kv_heads=4, d_ffn=96, n_layers=3)
    to = tmp_path / "large.yaml"
    to.write_text(yaml.safe_dump(large.to_dict()))
    return shape, model, path, to


def test_grow_checkpoint_is_lossless(small_ckpt, tmp_path):
    shape, model, path, to = small_ckpt
    out = tmp_path / "big.pt"
    assert main(["grow", "--from", str(path), "--to", str(to), "--method", "lemon+identity", "--out", str(out),
                 "--moments", "adjoint"]) == 0
    state = load_state(out)
    assert state.step == 1 and state.exp_avg is not None
    big = Decoder(state.shape)
    load_into(big, state)
    x, _ = batch(shape)
    with torch.no_grad():
        assert (big(x) - model(x)).abs().max().item() < 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
    assert main(["verify", str(path).replace("small.pt", "small2.pt"), str(out)]) == 2  # missing file: clear error


def test_grow_refuses_to_overwrite(small_ckpt, tmp_path, capsys):
    shape, model, path, to = small_ckpt
    out = tmp_path / "big.pt"
    out.write_bytes(b"precious")
    assert main(["grow", "--from", str(path), "--to", str(to), "--method", "duplicate+identity",
                 "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(["grow", "--from", str(path), "--to", str(to), "--method", "duplicate+identity", "--out", str(out),
                 "--force"]) == 0
    assert load_state(out).shape.d_model == 64


def test_grow_refusals_name_the_problem(small_ckpt, tmp_path, capsys):
    shape, model, path, to = small_ckpt
    out = tmp_path / "big.pt"
    shrink = tmp_path / "shrink.yaml"
    shrink.write_text(yaml.safe_dump(dataclasses.replace(shape, d_ffn=8).to_dict()))
    assert main(["grow", "--from", str(path), "--to", str(shrink), "--method", "lemon", "--out", str(out)]) == 2
    assert "d_ffn" in capsys.readouterr().err
    assert main(["grow", "--from", str(path), "--to", str(to), "--method", "nope", "--out", str(out)]) == 2
    assert "--method" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:1000])
    assert main(["grow", "--from", str(corrupt), "--to", str(to), "--method", "lemon", "--out", str(out)]) == 2
    assert "corrupt" in capsys.readouterr().err
    other = tmp_path / "other.yaml"  # the checkpoint does not hold the shape the user claims
    other.write_text(yaml.safe_dump(dataclasses.replace(shape, d_ffn=40).to_dict()))
    plain = tmp_path / "plain.pt"
    ck = torch.load(path, weights_only=True)
    del ck["shape"]
    torch.save(ck, plain)
    assert main(["grow", "--from", str(plain), "--to", str(to), "--method", "lemon", "--out", str(out),
                 "--shape", str(other)]) == 2
    assert "mlp" in capsys.readouterr().err
    assert main(["grow", "--from", str(path), "--to", str(to), "--method", "lemon", "--out", str(out),
                 "--tag", "step00000003"]) == 2  # tags belong to DeepSpeed checkpoint directories
    assert "--tag" in capsys.readouterr().err
    assert not out.exists()


def test_save_state_round_trip(tmp_path):
    shape = small_shape("gpt2")
    state = TrainingState.from_module(randomised_model(shape), None, step=5)
    save_state(state, tmp_path / "s.pt")
    back = load_state(tmp_path / "s.pt")
    assert back.step == 5 and back.shape == shape
    assert all(torch.equal(back.params[k], v) for k, v in state.params.items())
    with pytest.raises(FileExistsError):
        save_state(state, tmp_path / "s.pt")


@pytest.mark.parametrize("extra,named", [
    (["--tp", "2"], "--tp"),                          # a dist checkpoint's option
    (["--dtype", "bf16"], "--dtype"),                 # --from-hf's
    (["--max-seq-len", "8"], "--max-seq-len"),        # --from-hf's
    (["--init", "lemon"], "--init"),                  # ligo's, with a fixed method
    (["--steps", "5"], "--steps"),
    (["--batch-size", "2"], "--batch-size"),
])
def test_options_of_another_source_or_method_are_refused_not_ignored(small_ckpt, tmp_path, capsys, extra, named):
    shape, model, path, to = small_ckpt
    out = tmp_path / "big.pt"
    assert main(["grow", "--from", str(path), "--to", str(to), "--method", "lemon", "--out", str(out)] + extra) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_ligo_refuses_moment_rules_it_does_not_apply(small_ckpt, tmp_path, capsys):
    shape, model, path, to = small_ckpt
    out = tmp_path / "big.pt"
    for rule in ("adjoint", "reset"):
        assert main(["grow", "--from", str(path), "--to", str(to), "--method", "ligo", "--moments", rule,
                     "--out", str(out)]) == 2
        assert f"--moments {rule}" in capsys.readouterr().err
    ds_dir = tmp_path / "ds"  # a DeepSpeed checkpoint directory takes fixed methods, and says so
    ds_dir.mkdir()
    assert main(["grow", "--from", str(ds_dir), "--to", str(to), "--method", "ligo", "--out", str(out)]) == 2
    assert "--method ligo" in capsys.readouterr().err
    assert not out.exists()


def test_demo_and_train_refuse_options_that_do_not_apply(capsys):
    assert main(["demo", "--ops", "--nproc", "4"]) == 2
    assert "--nproc" in capsys.readouterr().err
    assert main(["demo", "--steps", "5"]) == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "x.yaml", "--resume", "--no-resume"])
    assert e.value.code == 2


def test_grow_recommended_with_a_relative_fan_in(small_ckpt, tmp_path, capsys):
    """``--method recommended`` is make_plan's recipe; ``--fan-in-std`` / ``--fan-in-relative`` reach the plan (the
    file equals growth_ds.ops.grow under that plan); ligo refuses them by name."""
    from growth_ds.ops import grow, make_plan

    shape, model, path, to = small_ckpt
    out = tmp_path / "big.pt"
    assert main(["grow", "--from", str(path), "--to", str(to), "--method", "recommended", "--fan-in-std", "2",
                 "--fan-in-relative", "--seed", "4", "--out", str(out)]) == 0
    large = load_state(out).shape
    plan = make_plan(shape, large, recipe="recommended", seed=4, random_std=2.0, random_relative=True)
    assert (plan.width, plan.depth, plan.random_relative) == ("zero", "stack", True)
    want = grow(load_state(path), plan)
    got = load_state(out)
    for name, t in want.params.items():
        assert torch.equal(got.params[name], t), name
    absolute = grow(load_state(path), make_plan(shape, large, recipe="recommended", seed=4, random_std=2.0,
                                                random_relative=False))
    assert not torch.equal(absolute.params["layers.0.mlp.up.weight"], got.params["layers.0.mlp.up.weight"])
    capsys.readouterr()
    assert main(["grow", "--from", str(path), "--to", str(to), "--method", "ligo", "--fan-in-std", "0.1",
                 "--out", str(tmp_path / "l.pt")]) == 2
    assert "--fan-in-std" in capsys.readouterr().err

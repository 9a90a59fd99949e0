"""benchmarks/gpu_check.py --cpu: the GPU check's every section on tiny shapes, so it cannot rot before a GPU
is lent (the kernel through the Triton interpreter when triton imports, the trainer with an in-job lossless
growth under ZeRO-1 and ZeRO-3, the ZeRO executor bit-equal to ops.grow on two ranks)."""
import json
import os
import subprocess
import sys

from dist_utils import REPO


def test_gpu_check_cpu_mode_runs_every_section(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(out["sections"]) == {"kernel", "train", "zero"}
    assert all(s["ok"] for s in out["sections"].values())
    train = out["sections"]["train"]["rows"]
    assert [r["zero"] for r in train] == [1, 3]
    for r in train:  # both stages trained; the growth kept the function; the grown model kept learning
        assert r["tok_s_0"] > 0 and r["tok_s_1"] > 0 and r["lossless"] and r["executor"] == "zero-sharded"
        first, last = r["stage1_loss_first_last"]
        assert last < first
    zero = out["sections"]["zero"]["rows"][0]
    assert zero["growths"] > 0 and zero["bit_equal"] == zero["growths"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "sections: kernel ok, train ok, zero ok" in table

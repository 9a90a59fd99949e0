"""Progress output in a batch job: plain lines, about 20 a run, never a redrawn bar."""
import io

from growth_ds.train.progress import ProgressOutput


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()  # not a tty
    p = ProgressOutput("demo", total=1000, stream=out)
    for step in range(1, 1001):
        p.update(step, 0 if step < 400 else 1, 4.0, 1e-3, 20000.0, 3.9 if step % 100 == 0 else None)
        if step == 400:
            p.write("grew at step 400")
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and 20 <= len(lines) <= 22
    assert lines[0].startswith("[demo] step 50/1000 (5%) stage 0 loss 4.0000 lr 1.00e-03")
    assert "grew at step 400" in lines and lines[-1].startswith("[demo] step 1000/1000 (100%) stage 1")
    assert "val 3.9000" in lines[1] and "eta" in lines[-1]
    q = io.StringIO()
    p = ProgressOutput("x", total=10, every=3, stream=q)
    for step in range(1, 11):
        p.update(step, 0, 1.0, 1.0, 1.0)
    p.set_total(12)
    p.update(12, 0, 1.0, 1.0, 1.0)
    assert [ln.split()[2] for ln in q.getvalue().splitlines()] == ["3/10", "6/10", "9/10", "10/10", "12/12"]

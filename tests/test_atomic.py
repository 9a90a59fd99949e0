"""growth_ds.atomic: a write replaces the file whole or not at all, and leaves no temporary file."""
import json
import os

import pytest

from growth_ds import atomic


def _only(d):
    return sorted(os.listdir(d))


def test_round_trips(tmp_path):
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01\xff"
    atomic.write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    obj = {"b": [1, 2.5, None], "a": "x"}
    atomic.write_json(tmp_path / "j.json", obj, indent=1, sort_keys=True, end="\n")
    assert (tmp_path / "j.json").read_text() == json.dumps(obj, indent=1, sort_keys=True) + "\n"
    assert json.loads((tmp_path / "j.json").read_text()) == obj
    with atomic.replace_on_success(tmp_path / "s.txt", "w") as f:
        f.write("a\n")
        f.write("b\n")
    assert (tmp_path / "s.txt").read_text() == "a\nb\n"
    assert _only(tmp_path) == ["b.bin", "j.json", "s.txt", "t.txt"]


def test_replaces_existing(tmp_path):
    p = tmp_path / "f.json"
    atomic.write_json(p, {"v": 1})
    atomic.write_json(p, {"v": 2})
    assert json.loads(p.read_text()) == {"v": 2}
    assert _only(tmp_path) == ["f.json"]


def test_unserialisable_json_leaves_old_file(tmp_path):
    p = tmp_path / "f.json"
    atomic.write_json(p, {"v": 1})
    with pytest.raises(TypeError):
        atomic.write_json(p, {"v": object()})
    assert json.loads(p.read_text()) == {"v": 1}
    assert _only(tmp_path) == ["f.json"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_inside_replace_on_success_leaves_old_file(tmp_path, exc):
    p = tmp_path / "f.bin"
    atomic.write_bytes(p, b"old")
    with pytest.raises(exc):
        with atomic.replace_on_success(p) as f:
            f.write(b"new, half written")
            assert len(_only(tmp_path)) == 2  # (the temporary sibling, beside the target)
            raise exc("boom")
    assert p.read_bytes() == b"old"
    assert _only(tmp_path) == ["f.bin"]


def test_failure_without_previous_file_creates_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic.replace_on_success(tmp_path / "new.txt", "w"):
            raise RuntimeError("boom")
    assert _only(tmp_path) == []


def test_bad_mode(tmp_path):
    with pytest.raises(ValueError):
        with atomic.replace_on_success(tmp_path / "x", "a"):
            pass
    assert _only(tmp_path) == []


def test_fsync_tree_and_path(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "x").write_bytes(b"1")
    atomic.fsync_tree(tmp_path / "d")
    atomic.fsync_path(tmp_path / "d" / "e" / "x")
    with pytest.raises(OSError):
        atomic.fsync_path(tmp_path / "missing")


def test_replace_dir_swaps_a_complete_directory_in_and_leaves_nothing_behind(tmp_path):
    from growth_ds.atomic import replace_dir

    dest, staging = tmp_path / "out", tmp_path / ".out.partial"
    staging.mkdir()
    (staging / "a.txt").write_text("new")
    replace_dir(dest, staging)  # no dest yet
    assert (dest / "a.txt").read_text() == "new" and not staging.exists()
    staging.mkdir()
    (staging / "b.txt").write_text("newer")
    replace_dir(dest, staging)  # an existing dest is replaced whole
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no old copy left aside

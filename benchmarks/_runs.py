"""Shared helpers for the benchmarks: derive configs from a base YAML and run them under torchrun."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from growth_ds.demo import _launch  # noqa: E402


def derive(base: str | Path, out_dir: Path, **overrides) -> Path:
    """Write a copy of ``base`` with ``run.out_dir`` and dotted overrides (``train.total_steps=...``)."""
    base = Path(base)
    raw = yaml.safe_load(base.read_text())
    raw = copy.deepcopy(raw)
    raw.setdefault("run", {})["out_dir"] = str(out_dir)
    for key, value in overrides.items():
        node = raw
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    for st in raw.get("stages", []):  # shapes are paths relative to the base config
        if isinstance(st.get("shape"), str) and not Path(st["shape"]).is_absolute():
            st["shape"] = str((base.parent / st["shape"]).resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(config: Path, *extra, nproc: int = 2) -> None:
    _launch(["train", str(config), "--no-resume", "--no-progress", *extra], nproc)

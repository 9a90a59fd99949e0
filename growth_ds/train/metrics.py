"""Compute accounting and the metrics log (JSON lines)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List

from growth_ds import atomic
from growth_ds.shapes import flops_per_token  # noqa: F401  (re-exported: it lives with the shapes)


class MetricsLog:
    """Append-only JSON-lines log; on resume, records past the resumed step are dropped first."""

    def __init__(self, path: str | Path, enabled: bool = True, sink=None):
        """``sink``: also called with every record written (e.g. ``Monitor.write``: TensorBoard, CSV)."""
        self.path = Path(path)
        self.enabled = enabled
        self.sink = sink

    def truncate_after(self, step: int, stage: int) -> None:
        """Drop what was logged after a checkpoint at (``step``, ``stage``): a checkpoint written just
        before growth is in the old stage, so that growth's record goes too."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path)
                if r.get("step", 0) < step or (r.get("step", 0) == step and r.get("stage", 0) <= stage)]
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.sink is not None:
            self.sink(record)


def read_metrics(path: str | Path) -> List[dict]:
    """Records of a metrics log; a torn last line (killed writer) is ignored."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def val_curve(records: Iterable[dict]):
    """``[(flops, tokens, step, val_loss)]`` from step records that carry a val loss."""
    return [(r["flops"], r["tokens"], r["step"], r["val_loss"]) for r in records
            if "val_loss" in r and r.get("event", "step") == "step"]


__all__ = ["MetricsLog", "flops_per_token", "read_metrics", "val_curve"]

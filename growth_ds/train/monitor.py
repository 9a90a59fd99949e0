"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard event files and a CSV of the steps.

Config (``monitor:``, every key optional)::

    monitor:
      tensorboard: true      # RUN_DIR/tensorboard/ (or tensorboard_dir)
      csv: true              # RUN_DIR/steps.csv: one row per step
      tensorboard_dir: PATH

TensorBoard scalars: ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``val/loss`` (x = step, and
``val/loss_vs_flops`` with x = FLOPs / 1e9), ``growth/stage`` and ``growth/n_params`` at each growth, and a text
entry per growth (from, to, methods, val loss before/after). Rank 0 writes; a resumed run appends.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

MONITOR_KEYS = {"tensorboard", "csv", "tensorboard_dir"}
CSV_FIELDS = ["step", "stage", "tokens", "flops", "n_params", "train_loss", "lr", "val_loss", "seconds",
              "tokens_per_s"]


class Monitor:
    def __init__(self, cfg: Optional[dict], run_dir: Path, enabled: bool = True):
        cfg = cfg or {}
        self.tb = self.csv_path = None
        if not enabled:
            return
        if cfg.get("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(cfg.get("tensorboard_dir") or Path(run_dir) / "tensorboard"))
        if cfg.get("csv"):
            self.csv_path = Path(run_dir) / "steps.csv"

    def truncate_after(self, step: int) -> None:
        """On resume: drop CSV rows past the checkpoint's step (TensorBoard shows the latest value per step)."""
        if self.csv_path is None or not self.csv_path.exists():
            return
        with open(self.csv_path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self._write_csv(rows, "w")

    def _write_csv(self, rows, mode: str) -> None:
        new = mode == "w" or not self.csv_path.exists()
        with open(self.csv_path, mode, newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)

    def write(self, rec: dict) -> None:
        event = rec.get("event")
        if event == "step":
            if self.csv_path is not None:
                self._write_csv([rec], "a")
            if self.tb is not None:
                s = rec["step"]
                self.tb.add_scalar("train/loss", rec["train_loss"], s)
                self.tb.add_scalar("train/lr", rec["lr"], s)
                self.tb.add_scalar("train/tokens_per_s", rec["tokens_per_s"], s)
                if "val_loss" in rec:
                    self.tb.add_scalar("val/loss", rec["val_loss"], s)
                    self.tb.add_scalar("val/loss_vs_flops", rec["val_loss"], int(rec["flops"] / 1e9))
        elif event == "growth" and self.tb is not None:
            s = rec["step"]
            self.tb.add_scalar("growth/stage", rec["stage"], s)
            self.tb.add_scalar("growth/n_params", _n_params(rec["to"]), s)
            self.tb.add_text("growth", json.dumps({k: rec.get(k) for k in (
                "step", "stage", "width", "depth", "moments", "lr_policy", "val_loss_before", "val_loss_after")}), s)
        if self.tb is not None and event in ("growth", "resume"):
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _n_params(shape: dict) -> int:
    from growth_ds.shapes import ModelShape

    return ModelShape.from_dict(shape).n_params

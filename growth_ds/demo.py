"""The operator demo: train a small model briefly on real text (bytes of the embedded excerpt),
grow it with every lossless method, and print loss before/after and the max logit difference."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from growth_ds.models import build_model, lm_loss
from growth_ds.ops import METHODS, grow_module, make_plan
from growth_ds.shapes import ModelShape

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "corpus_excerpt.txt"


def byte_batches(text: str, seq_len: int, batch: int, seed: int):
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=g)
        chunk = torch.stack([data[i:i + seq_len + 1] for i in idx.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def run_ops_demo(steps: int = 60, seed: int = 0, out=print) -> list:
    text = FIXTURE.read_text(encoding="utf-8") if FIXTURE.exists() else "growth-ds " * 2000
    rows = []
    for flavour in ("gpt2", "llama"):
        small = ModelShape(flavour=flavour, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2 if flavour == "llama" else 4,
                           head_dim=16, d_ffn=172 if flavour == "llama" else 256, vocab_size=256, max_seq_len=64)
        torch.manual_seed(seed)
        model = build_model(small, seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        batches = byte_batches(text, 64, 16, seed)
        t0 = time.time()
        for _ in range(steps):
            x, y = next(batches)
            opt.zero_grad()
            lm_loss(model(x), y).backward()
            opt.step()
        x, y = next(batches)
        with torch.no_grad():
            logits = model(x)
            before = lm_loss(logits, y).item()
        out(f"\n{small.describe()}: trained {steps} steps on {FIXTURE.name} bytes in {time.time() - t0:.1f}s, "
            f"loss {before:.4f}")
        out(f"{'width':>13} {'depth':>9} {'grown to':<42} {'loss before':>11} {'loss after':>11} {'max |dlogit|':>12}")
        for width in [m for m, v in METHODS.items() if v["width_lossless"]] + [None]:
            for depth in (None, "identity"):
                if width is None and depth is None:
                    continue
                large = dataclasses.replace(small, n_layers=small.n_layers + (2 if depth else 0))
                if width:
                    large = dataclasses.replace(large, d_model=2 * small.d_model, n_heads=2 * small.n_heads,
                                                n_kv_heads=2 * small.n_kv_heads, d_ffn=2 * small.d_ffn)
                plan = make_plan(small, large, width=width, depth=depth, seed=seed)
                big, _ = grow_module(model, opt, plan)
                with torch.no_grad():
                    big_logits = big(x)
                    after = lm_loss(big_logits, y).item()
                diff = (big_logits - logits).abs().max().item()
                rows.append(dict(flavour=flavour, width=width, depth=depth, before=before, after=after, diff=diff))
                out(f"{width or '-':>13} {depth or '-':>9} {large.describe():<42} {before:>11.6f} {after:>11.6f} "
                    f"{diff:>12.2e}")
    return rows


def _launch(args, nproc: int) -> None:
    """Run ``growth-ds ARGS`` under torchrun with ``nproc`` processes (raises on failure)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port: other jobs may hold torchrun's default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "growth_ds.cli"] + list(args)
    subprocess.run(cmd, check=True, env=env)


SHORT_BUDGET = 0.5  # the staged arm's second budget: the saving is read off complete (fully decayed) runs


def scaled_config(cfg, factor: float, path: Path) -> Path:
    """Write ``cfg`` (its YAML as loaded) at ``factor`` x its budget to ``path``: ``train.total_steps`` and
    every stage boundary (``until`` steps or tokens, an ``auto`` stage's caps) scaled, so growth comes at the
    same fraction of the FLOPs; shape paths made absolute."""
    import copy

    import yaml

    raw = copy.deepcopy(cfg.raw)
    base = cfg.source.parent if cfg.source else Path.cwd()
    raw["train"]["total_steps"] = max(1, round(raw["train"]["total_steps"] * factor))
    for st in raw["stages"]:
        if isinstance(st.get("shape"), str) and not Path(st["shape"]).is_absolute():
            st["shape"] = str((base / st["shape"]).resolve())
        until = st.get("until")
        if isinstance(until, dict):
            for k in ("steps", "tokens"):
                if k in until:
                    until[k] = max(1, round(until[k] * factor))
            for k in ("max_tokens", "max_flops"):
                if isinstance(until.get("auto"), dict) and k in until["auto"]:
                    until["auto"][k] = until["auto"][k] * factor
    data = raw.setdefault("data", {})
    data["out_dir"] = str(Path(data.get("out_dir") or Path(cfg.out_dir) / "data").resolve())
    if data.get("sources") not in (None, "embedded"):
        srcs = data["sources"] if isinstance(data["sources"], list) else [data["sources"]]
        data["sources"] = [s if s == "embedded" else str((base / s).resolve()) if not Path(s).is_absolute() else s
                           for s in srcs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_main_job(config=None, nproc: int = 2, out=print) -> int:
    """The main job: prepare the embedded corpus, train the final shape from scratch and the staged run
    (small -> grown) at equal FLOPs on ``nproc`` CPU processes, and the staged run again at half the budget;
    then print the report (the saving read off the complete runs) and write its plot."""
    from growth_ds.train.config import load_config
    from growth_ds.train.data import _resolve_source, prepare_data
    from growth_ds.train.report import report

    config = Path(config) if config else Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    cfg = load_config(config)
    data_cfg = dict(cfg.data)
    data_dir = data_cfg.pop("out_dir", None) or Path(cfg.out_dir) / "data"
    srcs = data_cfg.get("sources")  # relative paths as `train` resolves them
    if srcs is not None:
        data_cfg["sources"] = [_resolve_source(s, config.parent) for s in srcs] if isinstance(srcs, list) \
            else _resolve_source(srcs, config.parent)
    t0 = time.time()
    info = prepare_data(data_cfg, data_dir)
    st = info["stats"]
    out(f"data: {', '.join(st['sources'])}; {st['n_tokens']['train']:,} train / {st['n_tokens']['val']:,} val tokens "
        f"(vocab {st['vocab_size']}) in {time.time() - t0:.0f}s")
    short = scaled_config(cfg, SHORT_BUDGET, Path(cfg.out_dir) / "staged-short.yaml")
    runs = (("from scratch", [str(config), "--scratch"]), ("staged", [str(config)]),
            (f"staged at {SHORT_BUDGET:g}x the budget", [str(short), "--run-dir",
                                                          str(Path(cfg.out_dir) / "staged-short")]))
    for label, args in runs:
        t0 = time.time()
        out(f"\n== {label}: {config.name}, {nproc} processes ==")
        _launch(["train", "--no-resume"] + args, nproc)
        out(f"{label} run took {time.time() - t0:.0f}s")
    _, lines = report(cfg.out_dir)
    out("\n== report ==\n" + "\n".join(lines))
    return 0

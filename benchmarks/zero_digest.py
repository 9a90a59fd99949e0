"""Behaviour fingerprint of the ZeRO executor: a SHA-256 digest of every grown partition, moment and step, and
the executor's counters, over flavour x method x world size x ZeRO stage x transport.

    python benchmarks/zero_digest.py --write benchmarks/results/zero_digest.json   # record
    python benchmarks/zero_digest.py --check benchmarks/results/zero_digest.json   # compare, exit 1 on change

Each (world size, transport) is one ``torchrun`` of ``tests/zero_worker.py cases`` over every case of
``zero_worker.case_list()`` under ZeRO-1, -2 and -3 (fp32; the worker's per-stage buckets; prefetch under
ZeRO-2), plus the bf16 cases and cross-stage growths at world size 2. The worker gathers each grown engine
bit-exactly and hashes its parameters, ``exp_avg``, ``exp_avg_sq`` and step; the counters are the
executor's ``GrowthStats`` (rounds, whole-parameter rounds, pieces, stacked pieces, bytes sent, transport).
A refactor of the executor must leave this file unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "zero_worker.py"
FIELDS = ("digest", "rounds", "full_rounds", "pieces", "stacked_pieces", "bytes_sent", "bytes_sent_max_rank",
          "transport", "ok")
RUNS = [  # (world size, transport, worker options)
    (1, "auto", ["sel=1:full,2:full,3:full"]),
    (2, "auto", ["sel=1:full,2:full,3:full", "bf16_stages=1,2,3", "cross=2>3,3>1"]),
    (2, "collective", ["sel=1:full,2:full,3:full"]),
    (3, "auto", ["sel=1:full,2:full,3:full"]),
    (3, "collective", ["sel=1:full,2:full,3:full"]),
    (4, "auto", ["sel=1:full,2:full,3:full"]),
    (4, "collective", ["sel=1:full,2:full,3:full"]),
]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ws: int, transport: str, opts) -> list:
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GROWTH_DS_OFFLINE="1",
                   GROWTH_DS_ZERO_TRANSPORT=transport)
        env.pop("GROWTH_DS_KILL_IN_GROWTH", None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ws), "--master_port",
               str(_port()), str(WORKER), out, "cases", *opts]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"ws {ws} {transport}: worker failed\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        recs = json.loads((Path(out) / f"cases_ws{ws}.json").read_text())
    rows = []
    for r in recs:
        key = f"ws{ws}/{transport}/z{r['old_stage']}>{r['stage']}/{r['precision']}/{r['case']}"
        rows.append({"key": key, **{f: r.get(f) for f in FIELDS}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", help="record the fingerprint to this JSON file")
    ap.add_argument("--check", help="compare with this recorded JSON file")
    ap.add_argument("--ws", type=int, nargs="*", help="only these world sizes")
    a = ap.parse_args(argv)
    rows = []
    for ws, transport, opts in RUNS:
        if a.ws and ws not in a.ws:
            continue
        got = run(ws, transport, opts)
        print(f"ws {ws} {transport}: {len(got)} growths, {sum(not r['ok'] for r in got)} failed", flush=True)
        rows += got
    table = {r.pop("key"): r for r in rows}
    if a.write:
        Path(a.write).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    if a.check:
        want = json.loads(Path(a.check).read_text())
        if a.ws:
            want = {k: v for k, v in want.items() if int(k.split("/")[0][2:]) in a.ws}
        diff = [k for k in sorted(set(want) | set(table)) if want.get(k) != table.get(k)]
        for k in diff[:40]:
            print(f"CHANGED {k}: {want.get(k)} -> {table.get(k)}")
        print(f"{len(table)} growths compared with {a.check}: {len(diff)} differ")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

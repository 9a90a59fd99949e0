"""The shared-memory transport of ZeRO growth on its own: rounds of packed data arrive intact through the
header protocol (and through the all-gather fallback), segment names are gone after the first round, and
a rank whose peer dies gets an error naming that rank instead of waiting forever."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from growth_ds.distributed.zero import shm as zero_shm
from dist_utils import free_port


def _payload(rnd: int, src: int, dst: int) -> torch.Tensor:
    """What rank ``src`` sends rank ``dst`` in round ``rnd``: a length that varies, values that say where
    they come from."""
    n = 1 + (7 * rnd + 3 * src + dst) % 11
    return torch.arange(n, dtype=torch.float32) + 1000 * rnd + 100 * src + 10 * dst


def _worker(rank: int, world: int, port: int, fenced: bool, die: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    zero_shm.FENCED = fenced
    os.environ[zero_shm.TRANSPORT_ENV] = "shm"
    os.environ[zero_shm.TIMEOUT_ENV] = "60"
    rounds = 6
    cap = max(sum(_payload(k, rank, q).numel() for q in range(world) if q != rank) for k in range(rounds))
    offer = zero_shm.ShmOffer(world, True, cap)
    every = torch.empty(world * offer.ROW, dtype=torch.int64)
    zero_shm.all_gather_fn(dist)(every, torch.tensor(offer.row, dtype=torch.int64))
    rows = every.view(world, offer.ROW).tolist()
    assert offer.agreed(rows)
    tr = offer.open(dist, None, rank, rows)
    from growth_ds.train.deepspeed_engine import comm_device

    log = [("comm_device", str(comm_device(None)))]  # gloo moves host tensors (NCCL would need the GPU)
    try:
        for k in range(rounds):
            if rank == die and k == 2:
                os._exit(0)  # a rank that vanishes mid-growth (no collective can tell the others)
            counts, off = [0] * world, 0
            for q in range(world):
                if q != rank:
                    p = _payload(k, rank, q)
                    tr.buffer(off + p.numel())[off:].copy_(p)
                    counts[q], off = p.numel(), off + p.numel()
            tr.publish(counts)
            if k == 1:  # every rank has finished publishing round 0, so has unlinked its name
                log.append(("names", [p for p in tr.paths if os.path.exists(p)]))
            for p in range(world):
                if p != rank:
                    log.append(("ok", k, p, bool(torch.equal(tr.incoming(p), _payload(k, p, rank)))))
            tr.next_round()
    except RuntimeError as e:
        log.append(("error", str(e)))
    finally:
        tr.close()
    torch.save(log, f"{out}.{rank}")
    if die < 0:
        dist.barrier()  # (no rank tears its gloo pairs down while a peer still uses them)
        dist.destroy_process_group()


@pytest.mark.parametrize("world,fenced", [(2, True), (3, True), (3, False)])
def test_rounds_arrive_intact_and_names_are_unlinked(world, fenced, tmp_path):
    if fenced and not zero_shm.FENCED:
        pytest.skip("header protocol needs total store order (x86-64)")
    out = str(tmp_path / "log")
    mp.spawn(_worker, args=(world, free_port(), fenced, -1, out), nprocs=world, join=True)
    for r in range(world):
        log = torch.load(f"{out}.{r}")
        assert ("names", []) in [e for e in log if e[0] == "names"], log[:1]  # gone once all have mapped
        oks = [e for e in log if e[0] == "ok"]
        assert len(oks) == 6 * (world - 1) and all(e[3] for e in oks), log
        assert ("comm_device", "cpu") in log


def test_a_dead_peer_is_named_instead_of_a_hang(tmp_path):
    if not zero_shm.FENCED:
        pytest.skip("header protocol needs total store order (x86-64)")
    out = str(tmp_path / "log")
    ctx = mp.spawn(_worker, args=(2, free_port(), True, 1, out), nprocs=2, join=False)
    while not ctx.join(timeout=60):
        pass
    log = torch.load(f"{out}.0")
    errors = [e[1] for e in log if e[0] == "error"]
    assert errors and "rank 1" in errors[0] and "exited" in errors[0], log


def test_a_bad_timeout_is_refused_before_any_segment_exists(monkeypatch):
    monkeypatch.setenv(zero_shm.TIMEOUT_ENV, "soon")
    before = set(os.listdir(zero_shm.SHM_DIR))
    with pytest.raises(ValueError, match=zero_shm.TIMEOUT_ENV):
        zero_shm.ShmOffer(2, True, 16)
    assert set(os.listdir(zero_shm.SHM_DIR)) == before


def test_an_offer_across_hosts_is_declined_and_leaves_no_segment(monkeypatch):
    """Ranks on two hosts (or one without usable shared memory) fall back to the all-to-all: the offer is not
    agreed and its segment is gone after withdraw; forcing shm then is an error that says why."""
    monkeypatch.setenv(zero_shm.TRANSPORT_ENV, "auto")
    offer = zero_shm.ShmOffer(2, True, 1000)
    assert offer.path is not None and os.path.exists(offer.path)
    other_host = [offer.row[0] + 1] + offer.row[1:]
    no_shm = [offer.row[0], 0] + offer.row[2:]
    assert not offer.agreed([offer.row, other_host]) and not offer.agreed([offer.row, no_shm])
    assert offer.agreed([offer.row, offer.row])
    offer.withdraw()
    assert not os.path.exists(offer.path)
    monkeypatch.setenv(zero_shm.TRANSPORT_ENV, "shm")
    forced = zero_shm.ShmOffer(2, True, 1000)
    try:
        with pytest.raises(RuntimeError, match="not all on one host"):
            forced.agreed([forced.row, other_host])
    finally:
        forced.withdraw()
    monkeypatch.setenv(zero_shm.TRANSPORT_ENV, "collective")
    assert zero_shm.ShmOffer(2, True, 1000).path is None  # nothing created

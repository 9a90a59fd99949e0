"""Documents -> sentencepiece tokenizer -> memory-mapped token stores -> training batches.

Pipeline (``prepare_data``), every stage content-addressed so a re-run with unchanged inputs
rewrites nothing:

1. ``load_documents``: ``.txt`` / ``.jsonl`` files or directories -> ``list[str]``.
2. ``split_documents``: document-level shuffle with a fixed seed, then a held-out val split.
3. ``train_tokenizer``: sentencepiece BPE on the train split (byte fallback: no ``<unk>``).
4. ``TokenStore``: documents -> flat token file (``eos`` after every document) + JSON index.
5. ``Batches`` / ``eval_batches``: deterministic, resumable ``(x, y)`` int64 batches.

On-disk layout of ``prepare_data(cfg, out_dir)``::

    out_dir/tokenizer.model       sentencepiece model
    out_dir/tokenizer.meta.json   cache key (hash of train docs + settings), model sha256
    out_dir/train.bin             tokens, uint16 if vocab < 65536 else uint32, native order
    out_dir/train.bin.json        index: dtype, n_tokens, content/tokenizer hash, split
    out_dir/val.bin, val.bin.json
    out_dir/data.json             summary returned by prepare_data

Multi-process use: call ``prepare_data`` on one process (rank 0), barrier, then every rank
opens the stores read-only with ``TokenStore.open``.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from growth_ds import atomic

from .corpus import SOURCES, fetch_corpus, split_blocks

PathLike = str | os.PathLike

DEFAULT_DATA_CONFIG: dict = {
    "sources": "embedded",        # list of paths, or "embedded" (fetch_corpus / fixture)
    "vocab_size": 8192,
    "val_fraction": 0.05,
    "seed": 0,
    "doc_chars": 8000,            # .txt sources: pack paragraphs to ~this size; 0 = one per file
    "embedded_sources": list(SOURCES),
    "cache_dir": None,            # default: $GROWTH_DS_CACHE or ~/.cache/growth-ds
    "offline": False,             # also: env GROWTH_DS_OFFLINE=1; embedded -> fixture only
}

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "corpus_excerpt.txt"

# sentencepiece settings: exact round trip, nothing unknown. The defaults (``nmt_nfkc`` normalisation,
# extra-whitespace removal) do not round-trip: they collapse tabs and repeated spaces and rewrite
# characters; ``identity``, ``remove_extra_whitespaces=False`` and ``byte_fallback=True`` do.
# add_dummy_prefix=False keeps a line's first word the same piece in training (one line per
# sentence) and in encoding (whole documents, where lines follow a newline byte).
TOKENIZER_SETTINGS: dict = {
    "model_type": "bpe",
    "character_coverage": 0.9995,
    "byte_fallback": True,
    "max_sentence_length": 16384,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "add_dummy_prefix": False,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
}
_STORE_FORMAT = 1
_NUM_THREADS = max(1, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def content_hash(docs: Iterable[str]) -> str:
    """sha256 over length-prefixed UTF-8 documents (order-sensitive, boundary-sensitive)."""
    h = hashlib.sha256()
    n = 0
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        n += 1
    h.update(n.to_bytes(8, "little"))
    return h.hexdigest()


def file_hash(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    """This module's JSON files (index, meta, summary): sorted keys, one trailing newline; atomic."""
    atomic.write_json(path, obj, indent=1, sort_keys=True, end="\n")


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# --------------------------------------------------------------------------------------------
# documents
# --------------------------------------------------------------------------------------------

def _iter_files(src: Path) -> list[Path]:
    if src.is_dir():
        return sorted(p for p in src.rglob("*")
                      if p.is_file() and p.suffix in (".txt", ".jsonl")
                      and not p.name.startswith("."))
    if not src.exists():
        raise FileNotFoundError(f"data source not found: {src}")
    if src.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"unsupported data source {src} (want .txt, .jsonl or a directory)")
    return [src]


def load_documents(sources: PathLike | Sequence[PathLike], doc_chars: int = 8000) -> list[str]:
    """Read documents from ``.txt`` / ``.jsonl`` files or directories of them (recursive).

    ``.txt``: blank-line-separated paragraphs packed into documents of about ``doc_chars``
    characters (``doc_chars <= 0``: one document per file).  ``.jsonl``: one document per
    line, field ``"text"``.  Order is deterministic: sources in the given order, files
    within a directory sorted by path.  Empty documents are dropped.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    docs: list[str] = []
    for src in sources:
        for path in _iter_files(Path(src).expanduser()):
            if path.suffix == ".txt":
                docs.extend(split_blocks(path.read_text(encoding="utf-8", errors="replace"),
                                         doc_chars))
                continue
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    text = obj.get("text") if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: no string field 'text'")
                    if text.strip():
                        docs.append(text)
    return docs


def shuffle_documents(docs: Sequence[str], seed: int) -> list[str]:
    """Return a new list: ``docs`` in a seed-determined order (``random.Random(seed)``)."""
    out = list(docs)
    random.Random(seed).shuffle(out)
    return out


def split_documents(docs: Sequence[str], val_fraction: float = 0.05,
                    seed: int = 0) -> tuple[list[str], list[str]]:
    """Shuffle documents with ``seed``, then hold out ``max(1, round(n * val_fraction))``.

    Returns ``(train, val)``; both non-empty, disjoint, and together a permutation of
    ``docs``.  Needs at least 2 documents.
    """
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents for a train/val split, got {len(docs)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    shuffled = shuffle_documents(docs, seed)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    return shuffled[n_val:], shuffled[:n_val]


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

def _sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-blank lines of every text; over-long lines are cut into ``max_bytes``-ish pieces."""
    for t in texts:
        for line in t.split("\n"):
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > max_bytes:
                cut = max_bytes // 4  # <= max_bytes bytes even if every char is 4 bytes
                yield line[:cut]
                line = line[cut:]
            yield line


def train_tokenizer(texts: Sequence[str], vocab_size: int, model_prefix: PathLike,
                    **overrides) -> Path:
    """Train (or reuse) a sentencepiece BPE model; returns ``Path(model_prefix + ".model")``.

    Training sentences are the non-blank lines of ``texts``.  The cache key is
    sha256(content_hash(texts), vocab_size, settings); ``<prefix>.meta.json`` (written after
    the model) records it with the model's sha256, and a matching meta + model make this a
    no-op.  ``overrides`` update ``TOKENIZER_SETTINGS`` (and enter the key).
    """
    settings = {**TOKENIZER_SETTINGS, **overrides, "vocab_size": int(vocab_size)}
    key = hashlib.sha256(json.dumps({"docs": content_hash(texts), "settings": settings},
                                    sort_keys=True).encode()).hexdigest()
    model = Path(str(model_prefix) + ".model")
    meta_path = Path(str(model_prefix) + ".meta.json")
    meta = _read_json(meta_path)
    if (meta and meta.get("key") == key and model.exists()
            and meta.get("model_sha256") == file_hash(model)):
        return model

    import sentencepiece as spm

    model.parent.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():
        meta_path.unlink()  # the old meta must never vouch for the new model
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts, settings["max_sentence_length"]),
        model_writer=buf, num_threads=_NUM_THREADS, minloglevel=2, **settings)
    data = buf.getvalue()
    atomic.write_bytes(model, data)
    sp = spm.SentencePieceProcessor(model_proto=data)
    _write_json_atomic(meta_path, {
        "key": key, "model_sha256": hashlib.sha256(data).hexdigest(),
        "vocab_size": sp.get_piece_size(), "settings": settings,
        "n_texts": len(texts), "docs_hash": content_hash(texts)})
    return model


def load_tokenizer(model_path: PathLike):
    """``sentencepiece.SentencePieceProcessor`` for a model file."""
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(model_path))


# --------------------------------------------------------------------------------------------
# token store
# --------------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


class TokenStore:
    """A flat token file ``path`` plus its JSON index ``path + ".json"``.

    File: ``n_tokens`` ids of ``index["dtype"]`` (native byte order); documents in order,
    each followed by ``eos_id``.  Index keys: ``format, dtype, n_tokens, n_docs, eos_id,
    vocab_size, content_hash, tokenizer_hash, split``.

    Completeness invariant: the index is written last (after the data file has been renamed
    into place) and deleted first on rebuild, so a store is complete iff its index parses,
    the data file size equals ``n_tokens * itemsize``, and the hashes match the inputs.
    Anything else (no index, wrong hash, wrong size) is rebuilt, never trusted.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.index_path = Path(str(self.path) + ".json")

    def read_index(self) -> dict | None:
        return _read_json(self.index_path)

    def is_complete(self, content_hash: str | None = None,
                    tokenizer_hash: str | None = None) -> bool:
        """True iff index and data agree and (when given) the hashes match."""
        idx = self.read_index()
        if not idx or idx.get("format") != _STORE_FORMAT:
            return False
        try:
            dtype = np.dtype(idx["dtype"])
            n = int(idx["n_tokens"])
            if not self.path.exists() or self.path.stat().st_size != n * dtype.itemsize:
                return False
        except (KeyError, TypeError, ValueError):
            return False
        if content_hash is not None and idx.get("content_hash") != content_hash:
            return False
        if tokenizer_hash is not None and idx.get("tokenizer_hash") != tokenizer_hash:
            return False
        return True

    def build(self, docs: Sequence[str], tokenizer_model: PathLike, split: str,
              doc_hash: str | None = None, chunk_docs: int = 256) -> dict:
        """Tokenize ``docs`` (eos after each) into the store; returns the new index."""
        sp = load_tokenizer(tokenizer_model)
        eos = sp.eos_id()
        if eos < 0:
            raise ValueError("tokenizer has no eos id")
        vocab = sp.get_piece_size()
        dtype = token_dtype(vocab)
        doc_hash = doc_hash or content_hash(docs)
        tok_hash = file_hash(tokenizer_model)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.index_path.exists():
            self.index_path.unlink()  # from here on the store reads as incomplete
        n_tokens = 0
        with atomic.replace_on_success(self.path, "wb") as f:
            for i in range(0, len(docs), chunk_docs):
                ids = sp.encode(list(docs[i:i + chunk_docs]), out_type=int,
                                num_threads=_NUM_THREADS)
                flat = np.fromiter(
                    itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids),
                    dtype=dtype)
                flat.tofile(f)
                n_tokens += flat.size
        index = {"format": _STORE_FORMAT, "dtype": dtype.name, "n_tokens": int(n_tokens),
                 "n_docs": len(docs), "eos_id": int(eos), "vocab_size": int(vocab),
                 "content_hash": doc_hash, "tokenizer_hash": tok_hash, "split": split}
        _write_json_atomic(self.index_path, index)  # last: marks the store complete
        return index

    def ensure(self, docs: Sequence[str], tokenizer_model: PathLike,
               split: str) -> tuple[dict, bool]:
        """Build unless already complete for these docs and tokenizer; ``(index, built)``."""
        doc_hash = content_hash(docs)
        if self.is_complete(doc_hash, file_hash(tokenizer_model)):
            return self.read_index(), False
        return self.build(docs, tokenizer_model, split, doc_hash=doc_hash), True

    @classmethod
    def open(cls, path: PathLike) -> np.ndarray:
        """Read-only ``np.memmap`` of shape ``[n_tokens]``; raises if the store is incomplete."""
        store = cls(path)
        if not store.is_complete():
            raise FileNotFoundError(f"token store {path} is missing or incomplete (no valid index)")
        idx = store.read_index()
        dtype, n = np.dtype(idx["dtype"]), int(idx["n_tokens"])
        if n == 0:
            out = np.zeros(0, dtype=dtype)
            out.flags.writeable = False
            return out
        return np.memmap(store.path, dtype=dtype, mode="r", shape=(n,))


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------

def _gather(tokens: np.ndarray, starts: np.ndarray,
            seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int64)
    return (torch.from_numpy(np.ascontiguousarray(buf[:, :-1])),
            torch.from_numpy(np.ascontiguousarray(buf[:, 1:])))


class Batches:
    """Infinite, deterministic, resumable stream of ``(x, y)`` training batches.

    ``x, y``: int64 tensors ``[batch_size, seq_len]``, ``y[:, t] == x[:, t + 1]`` within the
    underlying token window (``y`` is ``x`` shifted by one).

    Sampling: epoch ``e`` cuts the token stream into ``n_windows = (N - seq_len) // seq_len``
    non-overlapping windows of ``seq_len + 1`` tokens at a random offset in ``[0, seq_len)``
    and visits them in a random order, both drawn from ``PCG64([seed, e])``.  Global sample
    ``k`` is window ``k % n_windows`` of epoch ``k // n_windows``.  Global batch ``i`` holds
    samples ``[i*G, (i+1)*G)`` with ``G = batch_size * world_size``; rank ``r`` takes the
    slice ``[i*G + r*batch_size, i*G + (r+1)*batch_size)``, so ranks are disjoint and
    together cover the global batch.

    State: ``consumed`` = global samples consumed.  ``load_state_dict`` accepts a state saved
    with another ``batch_size`` / ``world_size`` (the stream continues at the same sample);
    ``seed``, ``seq_len`` and ``n_tokens`` must match.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be >= 1")
        self.tokens = tokens
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.n_tokens = int(len(tokens))
        self.n_windows = (self.n_tokens - self.seq_len) // self.seq_len
        if self.n_windows < 1:
            raise ValueError(f"{self.n_tokens} tokens are too few for seq_len {seq_len} "
                             f"(need >= {2 * seq_len})")
        self.consumed = 0
        self._cache: tuple[int, int, np.ndarray] | None = None

    def _epoch(self, e: int) -> tuple[int, np.ndarray]:
        if self._cache is None or self._cache[0] != e:
            rng = np.random.Generator(np.random.PCG64([self.seed, e]))
            offset = int(rng.integers(0, self.seq_len))
            self._cache = (e, offset, rng.permutation(self.n_windows))
        return self._cache[1], self._cache[2]

    def starts(self, samples: Iterable[int]) -> np.ndarray:
        """Token start offsets of global sample indices."""
        out = []
        for k in samples:
            offset, perm = self._epoch(k // self.n_windows)
            out.append(offset + int(perm[k % self.n_windows]) * self.seq_len)
        return np.asarray(out, dtype=np.int64)

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed (global)."""
        return self.consumed / self.n_windows

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.consumed + self.rank * self.batch_size
        starts = self.starts(range(first, first + self.batch_size))
        self.consumed += self.batch_size * self.world_size
        return _gather(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "n_tokens": self.n_tokens, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "seq_len", "n_tokens"):
            if int(state[k]) != getattr(self, k):
                raise ValueError(f"Batches state mismatch on {k}: saved {state[k]}, "
                                 f"now {getattr(self, k)}")
        self.consumed = int(state["consumed"])


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                 n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches: ``(x, y)`` int64 ``[<=batch_size, seq_len]``.

    Uses ``m = min(n_batches * batch_size, (N - 1) // seq_len)`` non-overlapping windows
    spread evenly over the whole token array, in order; the last batch may be smaller.
    Every call yields the same batches.
    """
    n_avail = (len(tokens) - 1) // seq_len
    if n_avail < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for seq_len {seq_len}")
    m = min(n_batches * batch_size, n_avail)
    if m <= 0:
        return
    starts = (np.arange(m, dtype=np.int64) * n_avail // m) * seq_len
    for i in range(0, m, batch_size):
        yield _gather(tokens, starts[i:i + batch_size], seq_len)


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("GROWTH_DS_CACHE") or "~/.cache/growth-ds").expanduser()


def _is_embedded(src) -> bool:
    return isinstance(src, str) and src.strip().lower() == "embedded"


def _offline(cfg: dict) -> bool:
    return bool(cfg.get("offline")) or os.environ.get("GROWTH_DS_OFFLINE", "") not in ("", "0")


def _embedded_documents(cfg: dict) -> tuple[list[str], list[str], dict]:
    """Documents of the embedded corpus: fetched sources, else the committed fixture."""
    fetch: dict = {"used": {}, "failed": {}}
    if not _offline(cfg):
        cache = Path(cfg.get("cache_dir") or default_cache_dir()).expanduser() / "corpus"
        # the cache is shared between configs: its document split never depends on cfg
        fetch = fetch_corpus(cache, cfg.get("embedded_sources") or SOURCES)
    if fetch["used"]:
        paths = [info["path"] for info in fetch["used"].values()]
        return load_documents(paths), list(fetch["used"]), fetch
    if not FIXTURE.exists():
        raise RuntimeError(f"no corpus source could be fetched ({fetch['failed']}) and the "
                           f"fixture {FIXTURE} is missing")
    return load_documents([FIXTURE], int(cfg["doc_chars"])), ["fixture:corpus_excerpt"], fetch


def prepare_data(cfg: dict | None, out_dir: PathLike) -> dict:
    """Build tokenizer + train/val token stores in ``out_dir`` from a data config.

    ``cfg`` keys (defaults in ``DEFAULT_DATA_CONFIG``): ``sources`` (paths, or "embedded",
    or empty = embedded; "embedded" may also be one list item), ``vocab_size``,
    ``val_fraction``, ``seed``, ``doc_chars`` (.txt sources only), ``embedded_sources``,
    ``cache_dir``, ``offline``.  Other keys (e.g. a trainer's ``seq_len``) are ignored.

    Returns ``{"tokenizer", "train", "val": str paths, "stats": {"n_docs": {train, val},
    "n_tokens": {train, val}, "sources": [...], "vocab_size", "dtype", "fetch_failed"},
    "built": {"tokenizer", "train", "val": bool}}``; also written to ``out_dir/data.json``
    (only when its content changes).  Unchanged inputs => nothing is rewritten.
    """
    cfg = {**DEFAULT_DATA_CONFIG, **(cfg or {})}
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    srcs = cfg["sources"]
    if srcs is None or srcs == "" or _is_embedded(srcs):
        srcs = ["embedded"]
    elif isinstance(srcs, (str, os.PathLike)):
        srcs = [srcs]
    docs: list[str] = []
    used: list[str] = []
    failed: dict = {}
    files = [s for s in srcs if not _is_embedded(s)]
    if len(files) < len(srcs) or not srcs:
        emb_docs, emb_used, fetch = _embedded_documents(cfg)
        docs += emb_docs
        used += emb_used
        failed = fetch["failed"]
    if files:
        docs += load_documents(files, int(cfg["doc_chars"]))
        used += [str(f) for f in files]

    train_docs, val_docs = split_documents(docs, float(cfg["val_fraction"]), int(cfg["seed"]))
    tok_meta_before = _read_json(out / "tokenizer.meta.json")
    tok = train_tokenizer(train_docs, int(cfg["vocab_size"]), out / "tokenizer")
    tok_built = _read_json(out / "tokenizer.meta.json") != tok_meta_before
    train_idx, train_built = TokenStore(out / "train.bin").ensure(train_docs, tok, "train")
    val_idx, val_built = TokenStore(out / "val.bin").ensure(val_docs, tok, "val")

    summary = {
        "tokenizer": str(tok), "train": str(out / "train.bin"), "val": str(out / "val.bin"),
        "stats": {
            "n_docs": {"train": len(train_docs), "val": len(val_docs)},
            "n_tokens": {"train": train_idx["n_tokens"], "val": val_idx["n_tokens"]},
            "n_chars": {"train": sum(map(len, train_docs)), "val": sum(map(len, val_docs))},
            "sources": used, "fetch_failed": failed,
            "vocab_size": train_idx["vocab_size"], "dtype": train_idx["dtype"],
        },
    }
    if _read_json(out / "data.json") != json.loads(json.dumps(summary)):
        _write_json_atomic(out / "data.json", summary)
    summary["built"] = {"tokenizer": tok_built, "train": train_built, "val": val_built}
    return summary


# --------------------------------------------------------------------------------------------
# growth-ds data prepare CONFIG.yaml [--out DIR] (the command itself: growth_ds.cli)
# --------------------------------------------------------------------------------------------

def _resolve_source(src, config_dir: Path):
    """Relative paths: the working directory first, then the config file's directory."""
    if _is_embedded(src) or Path(src).expanduser().is_absolute() or Path(src).exists():
        return src
    alt = config_dir / src
    return str(alt) if alt.exists() else src


def prepare_from_config(config: PathLike, out: PathLike | None = None) -> dict:
    """``prepare_data`` on a run config's ``data:`` section (what ``growth-ds data prepare`` runs).

    ``out`` (default: where ``growth-ds train`` looks: ``data.out_dir``, else ``run.out_dir/data``, else
    ``runs/<run.name or the config's stem>/data``) wins over the config. Relative sources are looked up in
    the working directory, then next to the config. Returns ``prepare_data``'s summary.
    """
    import yaml

    cfg_path = Path(config)
    full = yaml.safe_load(cfg_path.read_text()) or {}
    data_cfg = dict(full.get("data") or {})
    run = full.get("run") or {}
    run_root = run.get("out_dir") or f"runs/{run.get('name') or cfg_path.stem}"  # (train.config's rule)
    out = out or data_cfg.pop("out_dir", None) or str(Path(run_root) / "data")  # where `train` looks
    data_cfg.pop("out_dir", None)  # --out wins over the config
    srcs = data_cfg.get("sources")
    if isinstance(srcs, list):
        data_cfg["sources"] = [_resolve_source(s, cfg_path.parent) for s in srcs]
    elif isinstance(srcs, str):
        data_cfg["sources"] = _resolve_source(srcs, cfg_path.parent)
    return prepare_data(data_cfg, out)

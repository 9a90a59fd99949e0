"""Atomic, durable file writes: a reader (or a crash) sees the old file or the new one, never part of one.

Every growth-ds writer that replaces a single file goes through this module. One write is:

1. open a temporary sibling ``.<name>.<pid>.<random>.tmp`` in the target's directory (the same file
   system, so the rename below is atomic; hidden; unique per process and per call, so concurrent
   writers never share one; created with mode ``0o666`` less the umask, like ``open``);
2. write, ``flush``, ``fsync`` the file;
3. ``os.replace`` it onto the target;
4. ``fsync`` the directory, so the new entry survives a crash too (best effort: some file systems
   refuse ``fsync`` on a directory, and the rename is atomic either way).

On any failure before step 3 (``BaseException`` included: an error serialising, a full disk, an
interrupt) the temporary file is removed and the target is left as it was.

Replacing a whole *directory* (write a staging directory, then ``os.replace`` it) is not done here:
the callers that do it (``growth_ds.interop``, the universal-checkpoint conversion) own that logic.

Bottom layer: imports only the standard library.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["fsync_path", "fsync_tree", "replace_dir", "replace_on_success", "write_bytes", "write_json", "write_text"]

PathLike = str | os.PathLike


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_path(path: PathLike) -> None:
    """Flush one file or directory (its entries) to stable storage; raises ``OSError`` if that fails."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(d: PathLike) -> None:
    """Flush every file under ``d``, and every directory from ``d`` down, to stable storage.

    For trees written by code that does not fsync (e.g. DeepSpeed's ``torch.save`` calls), so that a
    pointer written afterwards never names files a crash could lose.
    """
    for root, _, files in os.walk(d):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def _fsync_dir(d: Path) -> None:
    try:
        fsync_path(d)
    except OSError:  # (a file system without directory fsync; see the module doc, step 4)
        pass


@contextlib.contextmanager
def replace_on_success(path: PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """Yield a file object open on a temporary sibling of ``path``; replace ``path`` with it on success.

    For streaming writes (``torch.save(obj, f)``, ``array.tofile(f)``, line by line). If the body
    raises, the temporary file is removed, ``path`` is untouched and the exception propagates.
    ``mode``: ``"wb"`` or ``"w"`` (text; ``encoding`` defaults to UTF-8). ``path``'s directory must exist.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"replace_on_success: mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    tmp = _tmp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module doc)."""
    with replace_on_success(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` (encoded with ``encoding``) atomically and durably."""
    write_bytes(path, text.encode(encoding))


def write_json(path: PathLike, obj: Any, *, end: str = "", **json_kw) -> None:
    """Replace ``path`` with ``json.dumps(obj, **json_kw) + end`` atomically and durably.

    ``obj`` is serialised before anything is opened, so an object ``json`` cannot encode raises
    (``TypeError``/``ValueError``) with ``path`` untouched and nothing written. ``end``: e.g. ``"\\n"``.
    """
    write_text(path, json.dumps(obj, **json_kw) + end)


def replace_dir(dest: PathLike, staging: PathLike) -> None:
    """Put the complete directory ``staging`` at ``dest`` (a sibling, so the renames stay on one filesystem). An
    existing ``dest`` goes only once ``staging`` is in place: a crash in between leaves the old copy aside under
    a hidden ``.NAME.replaced.*`` name, never deleted."""
    import shutil
    import tempfile

    dest, staging = Path(dest), Path(staging)
    if dest.exists() and not dest.is_dir():
        dest.unlink()
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.replaced."))
        os.replace(dest, old / dest.name)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dest)
    _fsync_dir(dest.parent)

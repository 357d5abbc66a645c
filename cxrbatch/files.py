"""File primitives used everywhere: content hashes, atomic writes, stale temporaries, the
output folder's lock."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from cxrbatch.errors import OutputError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write through a temporary file in the same folder, fsync, then rename into place.

    A reader, or a crash, never sees a half-written `path`. OS errors (a full disk) become
    OutputError naming the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"Cannot write {path.name}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_dir(folder: Path) -> None:
    """Make the renames into `folder` durable (its entry list on disk), as a file's own
    fsync does not."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def remove_stale_temporaries(folder: Path, min_age_s: float = 0.0) -> int:
    """Delete temporary files a killed writer left in `folder` (never finished outputs);
    with `min_age_s`, only those untouched that long (where a live writer may share it)."""
    removed = 0
    if folder.is_dir():
        now = time.time()
        for stale in folder.glob(".*.tmp"):
            try:
                if min_age_s and now - stale.stat().st_mtime < min_age_s:
                    continue
                stale.unlink()
            except FileNotFoundError:  # its writer finished or removed it meanwhile
                continue
            removed += 1
    return removed


LOCK_NAME = ".cxrbatch-process.lock"


@contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold the output folder for one `cxrbatch process` run: an exclusive `flock` on
    FOLDER/.cxrbatch-process.lock, released when the run ends or its process dies (the
    kernel drops the lock; a stale file never blocks). Another run holding it is an
    OutputError naming its pid and start time, instead of both doing every study twice."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "unknown"
            raise OutputError(
                f"another `cxrbatch process` run is using the output folder {folder} "
                f"({holder}); wait for it to finish, or use another --out"
            ) from None
        os.ftruncate(handle, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.pwrite(handle, f"pid {os.getpid()} since {started}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(handle, 0)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)

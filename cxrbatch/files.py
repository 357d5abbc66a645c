"""File primitives used everywhere: content hashes, atomic writes, stale temporaries."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
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

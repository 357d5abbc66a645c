"""Writing a study's outputs atomically under OUT/<StudyInstanceUID>/.

Every file is written to a temporary name in the same folder, fsynced and renamed, so a
reader (or a crash) never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pydicom.dataset import Dataset

from cxrbatch.errors import OutputError
from cxrbatch.paths import inside, uid_path_component


def study_dir(out_root: Path, study_instance_uid: str) -> Path:
    return inside(out_root, out_root / uid_path_component(study_instance_uid))


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files a killed writer left in `folder` (never finished outputs)."""
    removed = 0
    if folder.is_dir():
        for stale in folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
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


def write_dicom(path: Path, ds: Dataset) -> Path:
    return atomic_write(path, lambda handle: ds.save_as(handle, enforce_file_format=True))


def write_json(path: Path, document: dict[str, Any]) -> Path:
    text = json.dumps(document, indent=2, sort_keys=False).encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(text))

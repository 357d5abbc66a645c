"""Copying bad input aside with its reason. Files are copied, never moved or deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cxrbatch.db import Session, repository
from cxrbatch.domain import RejectedFile
from cxrbatch.files import atomic_write, sha256_file
from cxrbatch.paths import StorageRoots

if TYPE_CHECKING:
    from cxrbatch.site import Site


def quarantine(
    path: Path,
    reason: str,
    quarantine_dir: Path,
    sha256: str | None = None,
    keep_path: bool = False,
) -> Path | None:
    """Copy `path` to quarantine_dir/<sha256>.bin with a <sha256>.json reason file.

    The copy is named by content hash and the sidecar holds the original path only with
    `keep_path` (output.quarantine_original_paths): file and folder names from a PACS
    export may carry patient names. Returns the copy's path, or None if the source is
    gone or unreadable.
    """
    try:
        digest = sha256 or sha256_file(path)
    except OSError:
        return None
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / f"{digest}.bin"
    if not target.exists():
        tmp = quarantine_dir / f".{digest}.tmp"
        try:
            shutil.copyfile(path, tmp)
            tmp.replace(target)
        except OSError:
            tmp.unlink(missing_ok=True)
            return None
    record = {"reason": reason, "sha256": digest}
    if keep_path:
        record["original_path"] = str(path)
    atomic_write(
        quarantine_dir / f"{digest}.json",
        lambda handle: handle.write(json.dumps(record, indent=2).encode()),
    )
    return target


def record_rejected_at(
    session: Session, site: Site, rejected: list[RejectedFile]
) -> tuple[int, int]:
    """`record_rejected_files` into the site's quarantine, with its settings and roots."""
    return record_rejected_files(
        session,
        rejected,
        site.quarantine_dir,
        site.settings.output.quarantine_original_paths,
        site.roots,
    )


def record_rejected_files(
    session: Session,
    rejected: list[RejectedFile],
    quarantine_dir: Path,
    keep_paths: bool = False,
    roots: StorageRoots | None = None,
) -> tuple[int, int]:
    """Quarantine (copy) bad input and record every rejected file with its reason.

    Returns (recorded, quarantined). The caller commits.
    """
    quarantined = 0
    for item in rejected:
        copy = (
            quarantine(item.path, item.reason, quarantine_dir, item.sha256, keep_paths)
            if item.quarantine
            else None
        )
        quarantined += copy is not None
        repository.record_rejected(session, item, copy, roots)
    return len(rejected), quarantined

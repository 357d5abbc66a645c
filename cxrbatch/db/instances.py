"""The `instances` table: what `cxrbatch watch` received, or `cxrbatch process` was given,
one row per SOPInstanceUID.

The spool (cxrbatch/ingest/spool.py), the folder watcher and the workers reach these rows
only through the functions here. `path` (where the file is now) is stored relative to the
site's roots when given (`paths.StorageRoots`); `source_path` (where it was taken from)
stays absolute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from cxrbatch.db.models import Instance, RejectedFile
from cxrbatch.domain import InstanceHeader, StudyInput
from cxrbatch.paths import StorageRoots, resolve_stored, store_path


@dataclass(frozen=True)
class Known:
    """A received instance: where its file is and the file's SHA-256."""

    path: Path
    sha256: str
    purged: bool = False  # the retention policy removed the file; only its hash is left


def known(
    session: Session, sop_instance_uid: str, roots: StorageRoots | None = None
) -> Known | None:
    row = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))
    if row is None:
        return None
    return Known(resolve_stored(row.path, roots), row.sha256, row.purged_at is not None)


def forget(session: Session, sop_instance_uid: str) -> None:
    """Drop a purged instance's row, before the instance is taken in again (it came back
    with other bytes: its old file is gone, so nothing is left to compare). The caller
    commits."""
    row = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))
    if row is not None:
        session.delete(row)
        session.flush()


def count_duplicate(session: Session, sop_instance_uid: str) -> None:
    """One more copy of a received instance was dropped. The caller commits."""
    session.execute(
        update(Instance)
        .where(Instance.sop_instance_uid == sop_instance_uid)
        .values(duplicates=Instance.duplicates + 1)
    )


def add(
    session: Session,
    header: InstanceHeader,
    stored: Path,
    source: Path,
    roots: StorageRoots | None = None,
) -> None:
    """Record a received instance (flushes: a concurrent twin raises IntegrityError)."""
    session.add(
        Instance(
            sop_instance_uid=header.sop_instance_uid,
            study_instance_uid=header.study_instance_uid,
            sha256=header.sha256,
            path=store_path(stored, roots),
            source_path=str(source),
            size=stored.stat().st_size,
            duplicates=0,
        )
    )
    session.flush()


def replace(
    session: Session,
    header: InstanceHeader,
    stored: Path,
    source: Path,
    roots: StorageRoots | None = None,
) -> None:
    """A received instance replaced by its correction (same SOPInstanceUID, new content).
    The caller commits."""
    session.execute(
        update(Instance)
        .where(Instance.sop_instance_uid == header.sop_instance_uid)
        .values(
            sha256=header.sha256,
            path=store_path(stored, roots),
            source_path=str(source),
            size=stored.stat().st_size,
            purged_at=None,
        )
    )


def declare_study(session: Session, study: StudyInput, roots: StorageRoots | None = None) -> None:
    """`cxrbatch process`: the study's instances are the files given, left where they are
    (its folder as it is now, as when a folder is watched in read-only mode). Rows of the
    study that are not among them are dropped; rows of these instances point at these
    files. The caller commits."""
    uid = study.study_instance_uid
    given = {header.sop_instance_uid: header for header in study.instances}
    rows = session.scalars(
        select(Instance).where(
            or_(Instance.study_instance_uid == uid, Instance.sop_instance_uid.in_(list(given)))
        )
    ).all()
    for row in rows:
        header = given.pop(row.sop_instance_uid, None)
        if header is None:
            session.delete(row)
            continue
        row.study_instance_uid = uid
        row.sha256 = header.sha256
        row.path = store_path(header.path, roots)
        row.source_path = str(header.path)
        row.size = header.path.stat().st_size
        row.purged_at = None
    session.flush()  # the deletions before the inserts: a unique SOPInstanceUID
    for header in given.values():
        add(session, header, header.path, header.path, roots)


def tally(session: Session) -> tuple[int, int, int]:
    """Instances received, duplicates dropped, files rejected: so far, in all."""
    received = session.scalar(select(func.count()).select_from(Instance))
    duplicates = session.scalar(select(func.coalesce(func.sum(Instance.duplicates), 0)))
    rejected = session.scalar(select(func.count()).select_from(RejectedFile))
    return int(received or 0), int(duplicates or 0), int(rejected or 0)


def stored_paths(session: Session, roots: StorageRoots | None = None) -> set[str]:
    """Where every received instance's file is now (on this host)."""
    rows = session.scalars(select(Instance.path).where(Instance.purged_at.is_(None)))
    return {str(resolve_stored(p, roots)) for p in rows}


def taken_source_paths(session: Session) -> list[str]:
    """Every path the folder watcher took in: received instances and rejected files."""
    paths = list(session.scalars(select(Instance.source_path)))
    return paths + list(session.scalars(select(RejectedFile.path)))


def study_files(
    session: Session, study_instance_uid: str, roots: StorageRoots | None = None
) -> list[Path]:
    """The files of a study's received instances, in the order received (on this host);
    instances whose file the retention policy removed are left out."""
    return [
        resolve_stored(p, roots)
        for p in session.scalars(
            select(Instance.path)
            .where(Instance.study_instance_uid == study_instance_uid, Instance.purged_at.is_(None))
            .order_by(Instance.id)
        )
    ]

"""Taking a complete file in: dedupe, spool, record the instance, queue its study.

Every way in (the folder watcher, the C-STORE receiver) ends in `Spool.take`:

    read the header (unreadable -> quarantine copy + rejected_files row)
    same SOPInstanceUID and the same data set as a received instance (the file's SHA-256,
    or cxrbatch/dicom/identity.py: another transfer syntax or writer) -> duplicate,
                                                              dropped, counted
    same SOPInstanceUID, other content                     -> conflict, quarantined, recorded
      (unless the retention policy removed the first copy: then it is new input again;
      or ingest.accept_corrections: a correction, which replaces the received instance,
      whose old copy goes to the quarantine with that reason, and requeues the study)
    else: into the spool (rename, or copy + fsync + rename across file systems), or left in
          place in read-only mode; then one transaction records the instance and (re)queues
          its study's job to run after the study's quiet period.

The file is in the spool before its row exists; `recover` re-takes spool files without
a row after a crash, so nothing received is lost.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from cxrbatch.db import IntegrityError, Sessions, instances, jobs
from cxrbatch.dicom.discover import iter_files, read_header
from cxrbatch.dicom.identity import same_instance
from cxrbatch.domain import InstanceHeader, RejectedFile
from cxrbatch.files import atomic_write, fsync_dir
from cxrbatch.paths import StorageRoots, is_inside, uid_path_component
from cxrbatch.quarantine import record_rejected_files
from cxrbatch.site import Site

log = logging.getLogger(__name__)


class Taken(enum.StrEnum):
    """What became of one offered file."""

    RECEIVED = "received"  # a new instance, recorded; its study queued
    DUPLICATE = "duplicate"  # identical to a received instance; dropped and counted
    CONFLICT = "conflict"  # same SOPInstanceUID, other content; quarantined and recorded
    CORRECTED = "corrected"  # same SOPInstanceUID, new content, accepted as a correction
    REJECTED = "rejected"  # not usable DICOM; quarantined and recorded
    NOT_REQUESTED = "not-requested"  # not what a pull asked for; quarantined and recorded
    CHANGED = "changed"  # the file changed while it was taken; offered again later
    GONE = "gone"  # the file disappeared before it could be taken


# Why an instance is not what was asked for (the reason it is quarantined), or None.
Expectation = Callable[[InstanceHeader], str | None]


class Spool:
    def __init__(
        self,
        root: Path,
        sessions: Sessions,
        quarantine_dir: Path,
        *,
        mode: str = "move",
        study_stable_seconds: float = 60.0,
        keep_paths: bool = False,
        roots: StorageRoots | None = None,
        accept_corrections: bool = False,
    ) -> None:
        """`roots`: the site's storage roots, to record paths relative to them (a worker
        on another host finds the spool wherever it mounts it); None keeps them absolute."""
        self.root = root
        self.roots = roots
        self.sessions = sessions
        self.quarantine_dir = quarantine_dir
        self.mode = mode
        self.study_stable_seconds = study_stable_seconds
        self.keep_paths = keep_paths  # original paths in quarantine sidecars
        self.accept_corrections = accept_corrections
        root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_site(cls, site: Site, sessions: Sessions, mode: str | None = None) -> Spool:
        """The site's spool, as its settings describe it (`mode`: the ingest mode, default
        ingest.mode; the receiver and pulls always move what they wrote)."""
        return cls(
            site.spool_dir,
            sessions,
            site.quarantine_dir,
            mode=mode or site.settings.ingest.mode,
            study_stable_seconds=site.settings.ingest.study_stable_seconds,
            keep_paths=site.settings.output.quarantine_original_paths,
            roots=site.roots,
            accept_corrections=site.settings.ingest.accept_corrections,
        )

    def take(self, path: Path, expect: Expectation | None = None) -> Taken:
        """Take one complete file in. Never raises on bad input; OS errors propagate.

        `expect`: for an instance a pull asked for, why this one is refused (another study
        or series than requested) or None; a refused one is quarantined with the reason."""
        if not path.exists():
            return Taken.GONE
        header = read_header(path)
        if isinstance(header, RejectedFile):
            if not path.exists():  # moved away while read (another ingest host took it)
                return Taken.GONE
            self._reject(header)
            return Taken.REJECTED
        refusal = expect(header) if expect is not None else None
        if refusal:
            self._reject(
                RejectedFile(
                    path,
                    refusal,
                    header.sha256,
                    study_instance_uid=header.study_instance_uid,
                    sop_instance_uid=header.sop_instance_uid,
                )
            )
            return Taken.NOT_REQUESTED
        with self.sessions() as session:
            known = instances.known(session, header.sop_instance_uid, self.roots)
        if known is not None and known.purged and known.sha256 != header.sha256:
            # Sent again after the retention policy removed the first copy, with other
            # bytes: nothing is left to compare, so it is taken in as new input.
            with self.sessions.begin() as session:
                instances.forget(session, header.sop_instance_uid)
            known = None
        known_path = None if known is None else known.path
        known_sha256 = None if known is None else known.sha256
        if known_path is not None and known_path == path:
            return Taken.DUPLICATE  # the spool file itself (recovery after a crash)
        # The same content is the same instance, whatever the transfer syntax or writer
        # (cxrbatch/dicom/identity.py); the file hash is only the quick path.
        duplicate = known_path is not None and (
            known_sha256 == header.sha256 or same_instance(known_path, path)
        )
        if duplicate:
            with self.sessions.begin() as session:
                instances.count_duplicate(session, header.sop_instance_uid)
            self._drop_source(path)
            log.info("duplicate instance %s dropped", header.sop_instance_uid)
            return Taken.DUPLICATE
        if known_path is not None and self.accept_corrections:
            return self._correct(path, header, known_path)
        if known_path is not None:
            self._reject(
                RejectedFile(
                    path,
                    "conflict: same SOPInstanceUID as a received instance with different content",
                    header.sha256,
                    study_instance_uid=header.study_instance_uid,
                    sop_instance_uid=header.sop_instance_uid,
                )
            )
            return Taken.CONFLICT
        stored = self._store(path, header)
        if stored is None:  # changed while read, or taken by another host meanwhile
            return Taken.CHANGED if path.exists() else Taken.GONE
        try:
            with self.sessions.begin() as session:
                instances.add(session, header, stored, path, self.roots)
                jobs.enqueue_study(session, header.study_instance_uid, self.study_stable_seconds)
        except IntegrityError:
            # Taken at the same moment by another ingest: the same instance, already recorded.
            return Taken.DUPLICATE
        log.info(
            "received instance %s of study %s", header.sop_instance_uid, header.study_instance_uid
        )
        return Taken.RECEIVED

    def _correct(self, path: Path, header: InstanceHeader, known_path: Path) -> Taken:
        """A corrected instance: the received copy is quarantined (recorded with the reason),
        the new one takes its place and its row, and the study is queued again (its new
        outcome supersedes the old one, whose delivered results are withdrawn)."""
        if known_path.exists():
            with self.sessions() as session:
                record_rejected_files(
                    session,
                    [
                        RejectedFile(
                            known_path,
                            "superseded: a corrected instance with the same SOPInstanceUID "
                            "replaced it (ingest.accept_corrections)",
                            "",
                            study_instance_uid=header.study_instance_uid,
                            sop_instance_uid=header.sop_instance_uid,
                        )
                    ],
                    self.quarantine_dir,
                    self.keep_paths,
                    self.roots,
                )
                session.commit()
        stored = self._store(path, header)
        if stored is None:  # changed while read, or taken by another host meanwhile
            return Taken.CHANGED if path.exists() else Taken.GONE
        with self.sessions.begin() as session:
            instances.replace(session, header, stored, path, self.roots)
            jobs.enqueue_study(session, header.study_instance_uid, self.study_stable_seconds)
        log.warning(
            "corrected instance %s of study %s replaced the one received before",
            header.sop_instance_uid,
            header.study_instance_uid,
        )
        return Taken.CORRECTED

    def recover(self) -> int:
        """Record spool files that a crash left without a row; returns how many."""
        with self.sessions() as session:
            known = instances.stored_paths(session, self.roots)
        recovered = 0
        for path in iter_files(self.root):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a copy a crash interrupted; its source remains
                continue
            if str(path) not in known and self.take(path) is Taken.RECEIVED:
                recovered += 1
        if recovered:
            log.warning("recovered %d spooled instance(s) left unrecorded by a crash", recovered)
        return recovered

    # -- helpers --------------------------------------------------------------------------

    def _reject(self, rejected: RejectedFile) -> None:
        with self.sessions() as session:
            _, quarantined = record_rejected_files(
                session, [rejected], self.quarantine_dir, self.keep_paths, self.roots
            )
            session.commit()
        log.info("rejected input file: %s", rejected.reason)
        if quarantined:
            self._drop_source(rejected.path)  # its copy is in the quarantine

    def _drop_source(self, path: Path) -> None:
        if self.mode == "move" and not is_inside(self.root, path):
            path.unlink(missing_ok=True)

    def _store(self, path: Path, header: InstanceHeader) -> Path | None:
        if self.mode == "read-only" or is_inside(self.root, path):
            return path
        target = (
            self.root
            / uid_path_component(header.study_instance_uid)
            / f"{uid_path_component(header.sop_instance_uid)}.dcm"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, target)
        except OSError as exc:
            if exc.errno == errno.ENOENT and not path.exists():
                return None  # another ingest host on the same share moved it first
            if exc.errno != errno.EXDEV:
                raise
            if not _copy_verified(path, target, header.sha256):
                return None
            path.unlink(missing_ok=True)
        fsync_dir(target.parent)
        return target


class _SourceChanged(Exception):
    """The file differs from the one whose header was read: the copy is abandoned."""


def _copy_verified(source: Path, target: Path, sha256: str) -> bool:
    """Copy across file systems through `atomic_write` (temporary file, fsync, rename),
    checking the hash before the rename. False if the source changed since its header was
    read (it is then offered again later)."""

    def copy(writer: IO[bytes]) -> None:
        digest = hashlib.sha256()
        with source.open("rb") as reader:
            for block in iter(lambda: reader.read(1 << 20), b""):
                digest.update(block)
                writer.write(block)
        if digest.hexdigest() != sha256:
            raise _SourceChanged

    try:
        atomic_write(target, copy)
    except _SourceChanged:
        log.info("file changed while it was copied; it will be offered again")
        return False
    return True

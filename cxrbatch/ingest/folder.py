"""The watched export folder: events and scans -> complete files -> `Spool.take`.

watchdog's native observer (inotify) by default, its polling observer by config (network
shares deliver no inotify events), and a periodic reconciliation scan for whatever the
events missed (queue overflow, files that arrived while cxrbatch was down).

A file is taken only when it is complete:
  - renamed into the folder (the writer's atomic rename): at once;
  - closed by its writer (inotify CLOSE_WRITE), when `trust_close_events`: at once, if its
    size and mtime are still those seen at the close;
  - otherwise: when its size and mtime have not changed for `quiet_seconds`.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirMovedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from cxrbatch.config import IngestSettings
from cxrbatch.db import DatabaseError, instances
from cxrbatch.dicom.discover import iter_files
from cxrbatch.errors import CxrBatchError
from cxrbatch.ingest.spool import Spool, Taken

log = logging.getLogger(__name__)


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    changed_at: float  # monotonic time of the last size/mtime change seen
    ready: bool = False  # closed by its writer or renamed into place


class _Events(FileSystemEventHandler):
    """Collects paths from the observer thread; the ingest loop drains them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, bool] = {}  # path -> ready

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory and not isinstance(event, DirMovedEvent):
            return
        if isinstance(event, DirMovedEvent):
            # A folder renamed into place: its files are complete.
            for path in iter_files(Path(str(event.dest_path))):
                self._add(str(path), True)
            return
        if isinstance(event, FileMovedEvent):
            self._add(str(event.dest_path), True)
        elif isinstance(event, FileClosedEvent):
            self._add(str(event.src_path), True)
        elif event.event_type in ("created", "modified"):
            self._add(str(event.src_path), False)

    def _add(self, path: str, ready: bool) -> None:
        with self._lock:
            self._paths[path] = self._paths.get(path, False) or ready

    def drain(self) -> dict[str, bool]:
        with self._lock:
            paths, self._paths = self._paths, {}
        return paths


class FolderIngest:
    def __init__(self, input_dir: Path, spool: Spool, settings: IngestSettings) -> None:
        self.input_dir = input_dir
        self.spool = spool
        self.settings = settings
        self._events = _Events()
        self._observer: BaseObserver | None = None
        self._candidates: dict[str, _Candidate] = {}
        self._taken: dict[str, tuple[int, int]] = {}  # read-only mode: path -> (size, mtime)
        self._last_scan = float("-inf")
        self.counts: dict[str, int] = {t.value: 0 for t in Taken} | {"error": 0}

    def start(self) -> None:
        if self.settings.mode == "read-only":
            self._taken = self._known_sources()
        observer: BaseObserver = (
            PollingObserver(timeout=self.settings.polling_interval_seconds)
            if self.settings.observer == "polling"
            else Observer()
        )
        observer.schedule(self._events, str(self.input_dir), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        log.info(
            "watching %s (%s observer, %s mode)",
            self.input_dir,
            self.settings.observer,
            self.settings.mode,
        )

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None

    def step(self, now: float | None = None) -> int:
        """Collect events, scan when due, take every complete file; returns files taken."""
        now = time.monotonic() if now is None else now
        for key, ready in self._events.drain().items():
            self._offer(Path(key), ready, now)
        if now - self._last_scan >= self.settings.reconcile_interval_seconds:
            self._last_scan = now
            for path in iter_files(self.input_dir):
                if str(path) not in self._candidates:
                    self._offer(path, False, now)
        return self._take_complete(now)

    def pending(self) -> int:
        return len(self._candidates)

    # -- internals ------------------------------------------------------------------------

    def _ignored(self, path: Path) -> bool:
        return any(fnmatch.fnmatch(path.name, pattern) for pattern in self.settings.ignore_patterns)

    def _offer(self, path: Path, ready: bool, now: float) -> None:
        if self._ignored(path):
            return
        try:
            stat = path.stat()
        except OSError:
            self._candidates.pop(str(path), None)
            return
        if path.is_symlink() or not path.is_file():
            return
        key = str(path)
        if self._taken.get(key) == (stat.st_size, stat.st_mtime_ns):
            return  # read-only mode: already taken in this form
        ready = ready and self.settings.trust_close_events
        seen = self._candidates.get(key)
        if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            self._candidates[key] = _Candidate(stat.st_size, stat.st_mtime_ns, now, ready)
        elif ready:
            seen.ready = True

    def _take_complete(self, now: float) -> int:
        taken = 0
        quiet = self.settings.quiet_seconds
        for key, candidate in list(self._candidates.items()):
            path = Path(key)
            try:
                stat = path.stat()
            except OSError:
                del self._candidates[key]
                continue
            if (stat.st_size, stat.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
                # Still being written: start the quiet period again.
                self._candidates[key] = _Candidate(stat.st_size, stat.st_mtime_ns, now)
                continue
            if not candidate.ready and now - candidate.changed_at < quiet:
                continue
            try:
                outcome = self.spool.take(path)
            except (OSError, CxrBatchError, DatabaseError) as exc:
                # One file must not stop the ingest (a permission, a full disk, the database
                # briefly away): it stays where it is and is tried again after the quiet time.
                # The reason is logged without the path, which may carry a patient's name.
                self.counts["error"] += 1
                log.error("a file could not be taken in, retried later: %s", _reason(exc))
                self._candidates[key] = _Candidate(stat.st_size, stat.st_mtime_ns, now)
                continue
            self.counts[outcome.value] += 1
            if outcome is Taken.CHANGED:
                self._candidates[key] = _Candidate(stat.st_size, stat.st_mtime_ns, now)
                continue
            del self._candidates[key]
            taken += 1
            if self.settings.mode == "read-only" or (outcome is Taken.REJECTED and path.exists()):
                # Left in place (read-only mode, or recorded as skipped: a DICOMDIR): not
                # taken again in this form.
                self._taken[key] = (stat.st_size, stat.st_mtime_ns)
        return taken

    def _known_sources(self) -> dict[str, tuple[int, int]]:
        """Read-only mode after a restart: files already taken are not taken again."""
        known: dict[str, tuple[int, int]] = {}
        with self.spool.sessions() as session:
            paths = instances.taken_source_paths(session)
        for text in paths:
            try:
                stat = Path(text).stat()
            except OSError:
                continue
            known[text] = (stat.st_size, stat.st_mtime_ns)
        return known


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, DatabaseError):
        return f"results database error ({type(exc).__name__})"
    return str(exc)

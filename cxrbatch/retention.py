"""The retention policy: what cxrbatch deletes, and when (`[retention]`, docs in
deploy/OPERATIONS.md). `cxrbatch cleanup` runs it once; `cxrbatch watch` every
`retention.interval_hours`.

    spool_days       spooled copies of instances whose study finished (done or ineligible)
                     that long ago; their rows stay (marked purged), so a PACS that sends
                     the same instance again is still recognised
    quarantine_days  quarantine copies (and their .json sidecars) whose file was last seen
                     that long ago; the rejected_files rows keep the reason
    superseded_days  output files that only outcomes superseded that long ago reference

0 keeps that kind forever. A file a current outcome or an unsent delivery references is
never deleted, whatever the settings (`db.retention.needed_paths`), and only files inside
the site's roots are touched: an export folder read in place is the PACS's, never ours.
The rows are updated in the same transaction as the deletions are decided; a crash between
the two leaves a row pointing at a file already gone, which the next pass records again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cxrbatch.db import retention
from cxrbatch.db.models import utcnow
from cxrbatch.paths import StorageRoots, is_inside, resolve_stored
from cxrbatch.site import Site

log = logging.getLogger(__name__)


@dataclass
class CleanupReport:
    """What one pass removed (or, with dry_run, would remove)."""

    dry_run: bool = False
    spool_files: int = 0
    quarantine_files: int = 0
    superseded_files: int = 0
    bytes_freed: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _cutoff(now: dt.datetime, days: float) -> dt.datetime | None:
    return None if days <= 0 else now - dt.timedelta(days=days)


def _remove(path: Path, root: Path, report: CleanupReport) -> bool:
    """Delete `path` if it lies under `root`; True when it is gone (or already was)."""
    if not is_inside(root, path):
        return False
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return True
    except OSError as exc:
        report.errors.append(f"{type(exc).__name__}: {exc.strerror}")
        return False
    if report.dry_run:
        report.bytes_freed += size
        return True
    try:
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError as exc:
        report.errors.append(f"{type(exc).__name__}: {exc.strerror}")
        return False
    report.bytes_freed += size
    return True


def _file(stored: str, roots: StorageRoots) -> Path:
    """A stored path as the file it names on this host (absolute, links resolved)."""
    return resolve_stored(stored, roots).resolve()


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # only when empty: other instances may still be there
        folder.rmdir()


def cleanup(site: Site, *, dry_run: bool = False, now: dt.datetime | None = None) -> CleanupReport:
    """One pass of the retention policy over `site`."""
    policy = site.settings.retention
    now = now or utcnow()
    report = CleanupReport(dry_run=dry_run)
    roots = site.roots
    with site.database(existing=True) as database, database.sessions.begin() as session:
        # Compared as files on this host, not as stored text: an older row may name a file
        # by its absolute path and a newer one by `output:` (migration 0005 without roots).
        needed = {_file(stored, roots) for stored in retention.needed_paths(session)}
        before = _cutoff(now, policy.spool_days)
        if before is not None:
            purged: list[int] = []
            for item in retention.released_spool(session, before):
                path = resolve_stored(item.path, roots)
                if _file(item.path, roots) in needed:
                    continue
                if _remove(path, site.spool_dir, report):
                    purged.append(item.instance_id)
                    report.spool_files += 1
                    if not dry_run and path.parent != site.spool_dir:
                        _remove_if_empty(path.parent)
            if not dry_run:
                retention.mark_purged(session, purged)
        before = _cutoff(now, policy.quarantine_days)
        if before is not None:
            gone: list[str] = []
            for stored in retention.expired_quarantine(session, before):
                copy = resolve_stored(stored, roots)
                if _remove(copy, site.quarantine_dir, report):
                    _remove(copy.with_suffix(".json"), site.quarantine_dir, report)
                    gone.append(stored)
                    report.quarantine_files += 1
            if not dry_run:
                retention.forget_quarantine_copies(session, gone)
        before = _cutoff(now, policy.superseded_days)
        if before is not None:
            for stored in sorted(retention.superseded_output_paths(session, before)):
                path = resolve_stored(stored, roots)
                if _file(stored, roots) in needed:
                    continue
                if path.exists() and _remove(path, site.out_dir, report):
                    report.superseded_files += 1
    log.info(
        "retention%s: %d spooled, %d quarantined, %d superseded file(s), %.1f MiB",
        " (dry run)" if dry_run else "",
        report.spool_files,
        report.quarantine_files,
        report.superseded_files,
        report.bytes_freed / 2**20,
        extra={"fields": {"event": "retention", **report.as_dict()}},
    )
    return report

"""Re-running a backlog with a new model version (`cxrbatch reprocess`): a backfill.

The daemon, restarted on the new configuration, is what processes; this re-queues the
studies it received (in a time window) whose current outcome was not made by every
classifier bundle the new configuration names (weights SHA-256 and version). The new
outcomes supersede the old ones as any re-run does.

- Throttled: it keeps at most `max_queued` jobs waiting or running in the queue, so the
  night's new studies are never stuck behind the whole backlog.
- Resumable: a study already re-run is no longer a candidate, so a backfill stopped at
  any point (Ctrl-C, a reboot) and started again continues with what is left.
- A queue that does not move for `stall_seconds` (no daemon running, or all of them
  stopped) ends the backfill with an error that says so; running it again resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cxrbatch.config import Settings
from cxrbatch.db.jobs import enqueue_study
from cxrbatch.db.lifecycle import backfill_candidates, queued_jobs
from cxrbatch.errors import CxrBatchError
from cxrbatch.files import sha256_file
from cxrbatch.models.preflight import bundle_files
from cxrbatch.site import Site


def configured_models(settings: Settings) -> list[tuple[str, str]]:
    """(weights SHA-256, version) of each live classifier bundle the settings name."""
    wanted = []
    for path in (settings.classifier.bundle, settings.classifier.screening_bundle):
        if path:
            _, model_path, metadata = bundle_files(path)
            wanted.append((sha256_file(model_path), str(metadata.get("version", "0"))))
    return wanted


@dataclass(frozen=True)
class Backfill:
    candidates: int
    queued: int


def backfill(
    site: Site,
    since: datetime | None,
    until: datetime | None,
    *,
    max_queued: int = 20,
    poll_seconds: float = 5.0,
    stall_seconds: float = 600.0,
    progress: Callable[[int, int], None] | None = None,
) -> Backfill:
    """Queue the backlog (module docstring); `progress(done, total)` after each study."""
    wanted = configured_models(site.settings)
    if not wanted:
        raise CxrBatchError(
            "the configuration names no classifier bundle: there is no model version to "
            "re-run the studies for (give the new configuration with --config)"
        )
    with site.database(existing=True) as database:
        with database.sessions() as session:
            uids = backfill_candidates(session, since, until, wanted)
        queued = 0
        for uid in uids:
            waiting, lowest = time.monotonic(), None
            while True:
                with database.sessions() as session:
                    waiting_jobs = queued_jobs(session)
                if waiting_jobs < max_queued:
                    break
                if lowest is None or waiting_jobs < lowest:
                    waiting, lowest = time.monotonic(), waiting_jobs
                elif time.monotonic() - waiting > stall_seconds:
                    raise CxrBatchError(
                        f"the queue has held {waiting_jobs} jobs for {stall_seconds:.0f} s "
                        f"without moving ({queued} of {len(uids)} studies re-queued): is a "
                        "daemon running on the new configuration? Run reprocess again to go on."
                    )
                time.sleep(poll_seconds)
            with database.sessions.begin() as session:
                enqueue_study(session, uid, 0.0)
            queued += 1
            if progress is not None:
                progress(queued, len(uids))
    return Backfill(len(uids), queued)

"""Campaigns on a Ray cluster: re-processing an archive (`cxrbatch campaign`).

A campaign is the daemon's queue run by a Ray cluster instead of `watch`/`worker`
processes, so that everything the queue guarantees holds as it is (one outcome per study,
leases timed by the database, fencing, recovery of lost work) and its outcomes are the
ones `process` and `watch` record (the same pipeline, models and fingerprints):

    manifest (a folder, or a file listing paths)
      -> Ray tasks, one per chunk of files: `Spool.take` in read-only mode (the archive is
         never moved or copied), which records each instance once and queues its study
      -> Ray actors, each a `QueueWorker` with its models loaded once (on a GPU where the
         actor was given one), claiming studies until the queue is idle
      -> the results database and OUT, shared by every node

Ray places the actors over the nodes (`ray start --head` on one host, `ray start
--address HEAD:6379` on the others). A node lost mid-study loses its actor; the study's
lease runs out and another actor takes it (`queue.lease_seconds`). A campaign killed or
stopped is resumed by running it again: files already taken are duplicates and add
nothing, unfinished studies are still queued. Ray is an optional dependency
(`pip install 'cxrbatch[ray]'`).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrbatch.db import jobs
from cxrbatch.dicom.discover import iter_files
from cxrbatch.errors import ConfigError, CxrBatchError
from cxrbatch.site import Site

log = logging.getLogger(__name__)

CHUNK = 200  # files per ingest task
MISSING = "missing"  # a file the manifest lists that is not there (or not a file)


@dataclass(frozen=True)
class CampaignSummary:
    files: int
    # Spool.take's answers (received, duplicate, rejected, ...), and `missing`: listed in
    # the manifest, not found.
    taken: dict[str, int]
    jobs: dict[str, int]  # the queue at the end, by status
    actors: int
    actors_lost: int
    seconds: float


def manifest_files(source: Path) -> Iterator[Path]:
    """The files of a manifest: every file under a folder, or the paths listed in a file
    (one per line, or a CSV with a `path` column; relative paths are relative to it)."""
    if source.is_dir():
        yield from iter_files(source)
        return
    if not source.is_file():
        raise ConfigError(f"campaign manifest not found: {source}")
    with source.open(newline="", encoding="utf-8") as handle:
        first = handle.readline()
        handle.seek(0)
        if first.lower().split(",")[0].strip() == "path" or ",path" in first.lower():
            rows = (row.get("path") or "" for row in csv.DictReader(handle))
        else:
            rows = (line.strip() for line in handle)
        for text in rows:
            if text and not text.startswith("#"):
                path = Path(text)
                yield path if path.is_absolute() else source.parent / path


def _ray() -> Any:
    # Ray >= 2.59 starts clusters with token authentication (the token in ~/.ray/auth_token,
    # or RAY_AUTH_TOKEN, the same on every node); a driver that connects to one must say
    # so, or it is refused. Ray reads the mode when it is imported. A site that runs Ray
    # without authentication sets RAY_AUTH_MODE=disabled.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "campaigns run on Ray, which is not installed: pip install 'cxrbatch[ray]'"
        ) from exc
    return ray


def _take_chunk(site: Site, paths: list[str]) -> dict[str, int]:
    """Ray task: take a chunk of the manifest's files in, in place."""
    from cxrbatch.db.session import Database
    from cxrbatch.ingest.spool import Spool

    database = Database(site.database_url)
    try:
        spool = Spool.for_site(site, database.sessions, mode="read-only")
        answers: Counter[str] = Counter()
        for text in paths:
            path = Path(text)
            if path.is_file():
                answers[str(spool.take(path).value)] += 1
            else:  # listed in the manifest, not there: not "gone" (nothing took it)
                answers[MISSING] += 1
                log.debug("campaign: listed file not found: %s", path)
        return dict(answers)
    finally:
        database.close()


class _Worker:
    """Ray actor: one queue worker with its models, run until the queue is idle."""

    def __init__(self, site: Site, threads: int) -> None:
        from cxrbatch import logs
        from cxrbatch.models.device import limit_cpu_threads

        logs.configure(site.settings.logging.level, site.settings.logging.format)
        limit_cpu_threads(threads)
        self.site = site

    def run(self) -> int:
        from cxrbatch.worker import QueueWorker

        return QueueWorker(self.site).run(until_idle=True)


def run_campaign(
    site: Site,
    source: Path,
    *,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> CampaignSummary:
    """Run a campaign over `source` on the Ray cluster at `address` (None: a cluster this
    process starts on this host); `actors` queue workers (default: one per
    `cpus_per_actor` CPUs of the cluster)."""
    from cxrbatch.db.session import ensure_local_sqlite, upgrade

    ray = _ray()
    started = time.monotonic()
    if address is not None and site.database_url.startswith("sqlite"):
        raise ConfigError(
            "a campaign on a Ray cluster needs a results database every node reaches: "
            "give --db postgresql+psycopg://... (SQLite serves one host)"
        )
    site.out_dir.mkdir(parents=True, exist_ok=True)
    ensure_local_sqlite(site.database_url)
    upgrade(site.database_url, roots=site.roots)
    # The archive is complete: its studies are due at once, not after a quiet period.
    settings = site.settings.model_copy(
        update={"ingest": site.settings.ingest.model_copy(update={"study_stable_seconds": 0.0})}
    )
    site = site.with_settings(settings)
    ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    try:
        files = [str(p) for p in manifest_files(source)]
        take = ray.remote(num_cpus=1, max_retries=3)(_take_chunk)
        chunks = [files[i : i + CHUNK] for i in range(0, len(files), CHUNK)]
        taken: Counter[str] = Counter()
        for answer in ray.get([take.remote(site, chunk) for chunk in chunks]):
            taken.update(answer)
        log.info("campaign: %d file(s) offered: %s", len(files), dict(taken))

        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        count = actors or max(1, int(cpus // cpus_per_actor))
        worker = ray.remote(_Worker).options(
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=0
        )
        threads = max(1, int(cpus_per_actor))
        pool = [worker.remote(site, threads) for _ in range(count)]
        pending = {actor.run.remote(): actor for actor in pool}
        lost = 0
        stopped: list[str] = []
        database = site.database()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), timeout=2.0)
                for ref in ready:
                    pending.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        # A node lost (or an actor killed): its study's lease runs out and
                        # the other actors take it again.
                        lost += 1
                        log.warning("campaign: a worker actor was lost: %s", str(exc)[:200])
                    except CxrBatchError as exc:
                        # Its worker stopped on purpose (the disk under the watermark, the
                        # database full): Ray's wrapper carries our error as its cause.
                        stopped.append(str(getattr(exc, "cause", exc)))
                if on_progress is not None:
                    with database.sessions() as session:
                        counted = jobs.counts(session)
                    finished = sum(counted[s] for s in ("done", "ineligible", "dead"))
                    on_progress(finished, sum(counted.values()))
            if stopped:
                raise CxrBatchError(
                    f"campaign: a worker stopped: {stopped[0]}; run the campaign again to resume"
                )
            if lost == len(pool):
                raise CxrBatchError(
                    "campaign: every worker actor was lost; run the campaign again to resume"
                )
            with database.sessions() as session:
                final = jobs.counts(session)
        finally:
            database.close()
    finally:
        ray.shutdown()
    return CampaignSummary(
        files=len(files),
        taken=dict(taken),
        jobs=final,
        actors=len(pool),
        actors_lost=lost,
        seconds=time.monotonic() - started,
    )

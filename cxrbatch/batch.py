"""`cxrbatch process`: one batch over an input folder, on the study queue.

discover files -> quarantine/record rejected ones -> each study's instances recorded as
the files in the folder (left in place) and its job queued, due now -> the same
`QueueWorker`s as `cxrbatch watch` run until the queue is idle: in this process, or in
`workers` processes that each load the models once; each has `processing.study_threads`
studies in flight on threads sharing its models. So `process` and `watch` share one
failure model: a study that fails is recorded as failed (retried after the queue's
backoff, or at the next run); a worker process that dies (killed, out of memory, a
crash in native code) is replaced, and the studies it held go back to the front of the
queue, each death counted as a failed attempt, each then tried alone in its worker
(worker.Turns); a study that kills its worker
`queue.max_attempts` times is recorded as failed with that reason, and no other study
loses its outcome.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import SimpleQueue
from pathlib import Path

from cxrbatch import pipeline
from cxrbatch.cpus import threads_per_worker
from cxrbatch.db import Sessions, instances, jobs
from cxrbatch.db.session import ensure_local_sqlite, upgrade
from cxrbatch.dicom.discover import discover
from cxrbatch.domain import StudyInput, StudyRunStatus
from cxrbatch.errors import CxrBatchError
from cxrbatch.files import output_lock
from cxrbatch.models.preflight import check_model_files
from cxrbatch.paths import check_outside_input
from cxrbatch.quarantine import record_rejected_at
from cxrbatch.site import Site
from cxrbatch.worker import (
    QueueWorker,
    Started,
    StudyReport,
    failed_result,
    record_result,
    recording,
    start_worker,
)
from cxrbatch.worker_entry import EXIT_CANNOT_START

log = logging.getLogger(__name__)

_TICK_SECONDS = 0.5


@dataclass
class BatchSummary:
    studies: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    rejected_files: int = 0
    quarantined_files: int = 0
    seconds: float = 0.0
    reports: list[StudyReport] = field(default_factory=list)

    @property
    def synthetic_model(self) -> bool:
        return any(r.synthetic_model for r in self.reports)

    def add(self, report: StudyReport) -> None:
        self.reports.append(report)
        self.studies[report.status] += 1
        self.quarantined_files += report.quarantined
        for reason in report.image_reasons:
            self.reasons[reason] += 1


def run_batch(
    input_dir: Path,
    site: Site,
    *,
    force: bool = False,
    workers: int = 1,
    models: pipeline.Models | None = None,
    on_study: Callable[[StudyReport, int, int], None] | None = None,
) -> BatchSummary:
    """Process every study under `input_dir` into `site`; raises only when the batch itself
    cannot run.

    `workers` > 1 spreads studies over that many processes, each with its own models and
    an equal share of the CPU threads; `models` (already loaded) serve the one worker
    of this process otherwise. Studies the queue held already (a batch a crash
    interrupted, a retry that came due) are run too. Reports come in completion order.
    The output folder is locked for the run (`files.output_lock`): a second run on it
    stops with an OutputError at once.
    """
    check_outside_input(site.settings, input_dir, site.out_dir)
    # The model files first, in a second: a missing or corrupt bundle is one line, not an
    # error after the networks of the other models have loaded.
    check_model_files(site.settings)
    with output_lock(site.out_dir):
        return _run_batch(input_dir, site, force, workers, models, on_study)


def _run_batch(
    input_dir: Path,
    site: Site,
    force: bool,
    workers: int,
    models: pipeline.Models | None,
    on_study: Callable[[StudyReport, int, int], None] | None,
) -> BatchSummary:
    started = time.perf_counter()
    ensure_local_sqlite(site.database_url)
    upgrade(site.database_url, roots=site.roots)
    summary = BatchSummary()
    studies, rejected = discover(input_dir)
    lock = threading.Lock()

    def tell(report: StudyReport) -> None:
        with lock:  # from the worker's study threads
            summary.add(report)
            if on_study:
                on_study(report, len(summary.reports), max(len(studies), len(summary.reports)))

    with site.database() as database:
        with database.sessions.begin() as session:
            recorded, quarantined = record_rejected_at(session, site, rejected)
        summary.rejected_files += recorded
        summary.quarantined_files += quarantined
        summary.reasons.update(item.reason for item in rejected)
        enqueue(database.sessions, studies, site)
        if workers <= 1 or len(studies) <= 1:
            _run_here(site, force, models, tell)
        else:
            _run_in_processes(site, force, workers, database.sessions, tell)
    summary.seconds = time.perf_counter() - started
    return summary


def enqueue(sessions: Sessions, studies: list[StudyInput], site: Site) -> None:
    """Each study's instances recorded as the files found (left in place) and its job
    queued, due now, one transaction a study."""
    for study in studies:
        with sessions.begin() as session:
            instances.declare_study(session, study, site.roots)
            jobs.enqueue_study(session, study.study_instance_uid, 0.0)


def _run_here(
    site: Site,
    force: bool,
    models: pipeline.Models | None,
    tell: Callable[[StudyReport], None],
) -> None:
    def told(event: Started | StudyReport) -> None:
        if isinstance(event, StudyReport):
            tell(event)

    QueueWorker(site, models, force=force, tell=told).run(until_idle=True)


# ---- worker processes -------------------------------------------------------------------
#
# Each worker process is a QueueWorker run until the queue is idle. It tells the parent
# on a pipe when it starts a study (`Started`) and when it has recorded one (its
# `StudyReport`); a message is in the pipe once `put` returns, so it outlives the worker.
# When a worker dies, the parent puts the jobs it held back in the queue at once (the
# queue's recovery: a dead process of this host) and starts another worker.


@dataclass(frozen=True)
class _Stopped:
    """A worker cannot go on (e.g. outcomes cannot be recorded: the database is full):
    the batch stops with this reason instead of replacing the worker."""

    reason: str


Event = Started | StudyReport | _Stopped


def _batch_worker_main(
    site: Site,
    threads: int,
    force: bool,
    events: SimpleQueue[Event],
    parent_pid: int,
) -> None:
    worker = start_worker(site, threads, force=force, tell=events.put)
    try:
        worker.run(parent_pid=parent_pid, until_idle=True)
    except CxrBatchError as exc:
        events.put(_Stopped(str(exc)[:2000]))
        raise SystemExit(EXIT_CANNOT_START) from exc


def _run_in_processes(
    site: Site,
    force: bool,
    workers: int,
    sessions: Sessions,
    tell: Callable[[StudyReport], None],
) -> None:
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    events: SimpleQueue[Event] = context.SimpleQueue()
    policy = jobs.RetryPolicy.from_settings(site.settings.queue)
    started: dict[str, Started] = {}
    reported: set[str] = set()
    children: list[BaseProcess] = []
    # Deaths with no study recorded in between: bounded, so that workers that die for
    # another reason than a study (the machine out of memory at start) end the batch.
    deaths_in_a_row = 0
    stopped: list[str] = []

    def drain() -> None:
        nonlocal deaths_in_a_row
        while not events.empty():
            event = events.get()
            if isinstance(event, _Stopped):
                stopped.append(event.reason)
            elif isinstance(event, Started):
                started[event.study_instance_uid] = event
            else:
                reported.add(event.study_instance_uid)
                deaths_in_a_row = 0
                tell(event)

    def spawn() -> None:
        child = context.Process(
            target=_batch_worker_main,
            args=(site, threads_per_worker(workers), force, events, os.getpid()),
            name="cxrbatch-worker",
            daemon=True,
        )
        child.start()
        children.append(child)

    try:
        while True:
            drain()
            died = False
            for child in [c for c in children if not c.is_alive()]:
                children.remove(child)
                drain()  # what it told before it went
                if child.exitcode == 0:
                    continue
                if stopped:  # it said why: the batch stops, as it would in this process
                    raise CxrBatchError(stopped[0])
                if not started:
                    raise CxrBatchError(
                        "the worker processes stopped before processing any study (see the "
                        "log above for why: e.g. the models could not be loaded)"
                    )
                if child.exitcode == EXIT_CANNOT_START:
                    raise CxrBatchError("a worker process could not start (see the log above)")
                died = True
                deaths_in_a_row += 1
                log.warning("worker process %d died (exit code %s)", child.pid, child.exitcode)
            if deaths_in_a_row > workers * (policy.max_attempts + 1):
                raise CxrBatchError(
                    f"worker processes died {deaths_in_a_row} times in a row without "
                    "recording a study (see the log above)"
                )
            if died:
                jobs.recover_stalled(sessions, policy)  # its jobs: due again, at the front
            with sessions() as session:
                pending = jobs.pending(session)
            if not pending and not children:
                break
            while pending and len(children) < workers:
                spawn()
            time.sleep(_TICK_SECONDS)
    finally:
        for child in children:  # an error above: the workers stop with the batch
            child.kill()
            child.join(5)
    drain()
    for report in _record_deaths(started, reported, site, sessions):
        tell(report)


def _record_deaths(
    started: dict[str, Started], reported: set[str], site: Site, sessions: Sessions
) -> list[StudyReport]:
    """Studies started in this batch whose job died with its workers (every attempt
    killed the worker that held it): recorded as failed, with the reason."""
    uids = [uid for uid in started if uid not in reported]
    if not uids:
        return []
    with sessions() as session:
        dead = jobs.dead_attempts(session, uids)
    reports: list[StudyReport] = []
    for uid, attempts in dead.items():
        start = started[uid]
        reason = (
            f"the worker process died each time it processed this study ({attempts} "
            "attempts: killed, out of memory, or a crash in native code); the study is "
            "retried at the next run"
        )
        log.error("study %s failed: %s", uid, reason)
        result = failed_result(uid, reason, start.fingerprint, start.models)
        with recording(uid), sessions.begin() as session:
            record_result(session, site, result)
        reports.append(
            StudyReport(
                uid,
                StudyRunStatus.FAILED,
                reason,
                image_reasons=(reason,),
                synthetic_model=any(m.synthetic_training_data for m in start.models),
            )
        )
    return reports

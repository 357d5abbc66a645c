"""`cxrbatch process`: one batch over an input folder.

discover files -> quarantine/record rejected ones -> for each study (in this process, or
spread over worker processes that each load the models once; in each process
`processing.study_threads` studies in flight on threads sharing its models): skip if
already processed with the same fingerprint, else pipeline.run -> record the outcome. A
study that fails for any reason is recorded as failed and the batch goes on, also when it
kills its worker process (see "worker processes" below).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.queues import SimpleQueue
from pathlib import Path

from cxrbatch import logs, pipeline
from cxrbatch.cpus import threads_per_worker
from cxrbatch.db.session import ensure_local_sqlite, upgrade
from cxrbatch.dicom.discover import discover
from cxrbatch.domain import ModelRef, StudyInput, StudyRunStatus
from cxrbatch.errors import CxrBatchError, RecordingError, one_line
from cxrbatch.files import output_lock
from cxrbatch.models.device import limit_cpu_threads
from cxrbatch.models.preflight import check_model_files
from cxrbatch.paths import check_outside_input
from cxrbatch.quarantine import record_rejected_at
from cxrbatch.site import Site
from cxrbatch.worker import StudyProcessor, StudyReport, failed_result, record_result

log = logging.getLogger(__name__)


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
    an equal share of the CPU threads; each records its outcomes itself. Each process has
    `settings.processing.study_threads` studies in flight. Reports come in completion order.
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
    with site.database() as database, database.sessions.begin() as session:
        recorded, quarantined = record_rejected_at(session, site, rejected)
    summary.rejected_files += recorded
    summary.quarantined_files += quarantined
    summary.reasons.update(item.reason for item in rejected)
    if workers <= 1 or len(studies) <= 1:
        reports = _run_here(studies, site, force, models)
    else:
        reports = _run_in_pool(studies, site, force, workers)
    for index, report in enumerate(reports, start=1):
        summary.add(report)
        if on_study:
            on_study(report, index, len(studies))
    summary.seconds = time.perf_counter() - started
    return summary


def _run_here(
    studies: list[StudyInput],
    site: Site,
    force: bool,
    models: pipeline.Models | None,
) -> Iterator[StudyReport]:
    threads = site.settings.processing.study_threads
    worker = StudyProcessor(site, models, in_flight=threads)
    try:
        yield from process_concurrently(worker.process, studies, force, threads)
    finally:
        worker.close()


def process_concurrently(
    process: Callable[[StudyInput, bool], StudyReport],
    studies: list[StudyInput],
    force: bool,
    threads: int,
) -> Iterator[StudyReport]:
    """Process `studies` with up to `threads` of them in flight at once (`process` is a
    worker's, sharing its models); reports in completion order. The networks release the
    GIL, so one study's decoding and DICOM writing run while another's networks compute."""
    if threads <= 1 or len(studies) <= 1:
        for study in studies:
            yield process(study, force)
        return
    # An error `process` lets out means outcomes cannot be recorded (it records every
    # study's own failure): from then on no study starts, and the first error is raised.
    errors: list[BaseException] = []

    def guarded(study: StudyInput, force: bool) -> StudyReport | None:
        if errors:
            return None
        try:
            return process(study, force)
        except BaseException as exc:
            errors.append(exc)
            raise

    with ThreadPoolExecutor(threads, thread_name_prefix="study") as pool:
        futures = [pool.submit(guarded, study, force) for study in studies]
        try:
            for future in as_completed(futures):
                report = future.result()
                if report is not None:
                    yield report
        except BaseException as exc:
            pool.shutdown(wait=True, cancel_futures=True)
            if errors and not isinstance(exc, GeneratorExit):
                raise errors[0] from None
            raise


# ---- worker processes -------------------------------------------------------------------
#
# Each worker process tells the parent on an events pipe when it starts a study (`_Started`)
# and when it has recorded one (its `StudyReport`); a message is in the pipe once `put`
# returns, so it outlives the worker. When a worker dies (killed, out of memory, a crash in
# native code) the pool breaks and takes every worker with it: the studies that had not
# started go on in a new pool, and those in flight in any worker are suspects, run
# afterwards one at a time in a single worker process. A study that kills that worker is
# the cause: it is recorded as failed with the reason, and no other study loses its outcome.

_WORKER: StudyProcessor | None = None
_EVENTS: SimpleQueue[_Started | StudyReport] | None = None


@dataclass(frozen=True)
class _Started:
    """Small (below PIPE_BUF), so that a worker killed while telling cannot leave half a
    message in the pipe."""

    study_instance_uid: str
    fingerprint: str
    models: tuple[ModelRef, ...]


def _init_worker(site: Site, threads: int, events: SimpleQueue[_Started | StudyReport]) -> None:
    global _WORKER, _EVENTS
    settings = site.settings
    logs.configure(settings.logging.level, settings.logging.format)
    limit_cpu_threads(threads)
    _EVENTS = events
    _WORKER = StudyProcessor(site, in_flight=settings.processing.study_threads)


def _process_and_tell(study: StudyInput, force: bool) -> StudyReport:
    assert _WORKER is not None and _EVENTS is not None, "worker process not initialised"
    uid = study.study_instance_uid
    fingerprint = _WORKER.fingerprint(study)
    _EVENTS.put(_Started(uid, fingerprint, _WORKER.models.refs))
    report = _WORKER.process(study, force, fingerprint=fingerprint)
    _EVENTS.put(report)
    return report


def _work(studies: list[StudyInput], force: bool) -> None:
    assert _WORKER is not None, "worker process not initialised"
    threads = _WORKER.settings.processing.study_threads
    for _ in process_concurrently(_process_and_tell, studies, force, threads):
        pass


def _run_in_pool(
    studies: list[StudyInput], site: Site, force: bool, workers: int
) -> Iterator[StudyReport]:
    pending, suspects = studies, []
    while pending:
        in_flight, pending = yield from _pool_round(pending, site, force, workers)
        suspects += [study for study in studies if study.study_instance_uid in in_flight]
    settings = site.settings
    alone = site.with_settings(
        settings.model_copy(
            update={"processing": settings.processing.model_copy(update={"study_threads": 1})}
        )
    )
    while suspects:
        in_flight, suspects = yield from _pool_round(suspects, alone, force, 1)
        for started in in_flight.values():  # one study in one worker: it killed it
            yield _record_worker_death(started, site)


def _pool_round(
    studies: list[StudyInput],
    site: Site,
    force: bool,
    workers: int,
) -> Generator[StudyReport, None, tuple[dict[str, _Started], list[StudyInput]]]:
    """Run `studies` in one pool of `workers` processes, yielding reports as the workers
    record studies. Returns, if a worker died, the studies in flight then and those not
    started; ({}, []) when none did. Raises if the workers died before starting any study
    (they could not load the models: their log says why)."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    events: SimpleQueue[_Started | StudyReport] = context.SimpleQueue()
    started: dict[str, _Started] = {}
    reported: set[str] = set()

    def drain() -> Iterator[StudyReport]:
        while not events.empty():
            event = events.get()
            if isinstance(event, _Started):
                started[event.study_instance_uid] = event
            else:
                reported.add(event.study_instance_uid)
                yield event

    broken = False
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(site, threads_per_worker(workers), events),
    ) as pool:
        # A process takes one task at a time: a task is as many studies as it has in flight.
        size = site.settings.processing.study_threads
        chunks = [studies[i : i + size] for i in range(0, len(studies), size)]
        futures = {pool.submit(_work, chunk, force): chunk for chunk in chunks}
        waiting = set(futures)
        while waiting:
            done, waiting = wait(waiting, timeout=0.5, return_when=FIRST_COMPLETED)
            yield from drain()
            for future in done:
                error = future.exception()
                if isinstance(error, BrokenProcessPool):
                    broken = True
                elif error is not None:
                    # Not a death: the worker could not record outcomes (the database is
                    # full or gone), or the task could not run. No new study is started.
                    pool.shutdown(wait=True, cancel_futures=True)
                    yield from drain()
                    if isinstance(error, CxrBatchError):
                        raise error
                    raise RecordingError(f"a worker task failed: {one_line(error)}") from error
    yield from drain()  # the workers are gone: everything they told is in the pipe
    if not broken:
        return {}, []
    if not started:
        raise CxrBatchError(
            "the worker processes stopped before processing any study (see the log above "
            "for why: e.g. the models could not be loaded)"
        )
    in_flight = {uid: s for uid, s in started.items() if uid not in reported}
    not_started = [s for s in studies if s.study_instance_uid not in started]
    log.warning(
        "a worker process died: %d study(ies) in flight will be retried one at a time, "
        "%d not started go on in new worker processes",
        len(in_flight),
        len(not_started),
    )
    return in_flight, not_started


def _record_worker_death(started: _Started, site: Site) -> StudyReport:
    uid = started.study_instance_uid
    reason = (
        "the worker process died while processing this study alone (killed: out of "
        "memory, or a crash in native code); the study is retried at the next run"
    )
    log.error("study %s failed: %s", uid, reason)
    result = failed_result(uid, reason, started.fingerprint, started.models)
    with site.database() as database, database.sessions.begin() as session:
        record_result(session, site, result)
    return StudyReport(
        uid,
        StudyRunStatus.FAILED,
        reason,
        image_reasons=(reason,),
        synthetic_model=any(m.synthetic_training_data for m in started.models),
    )

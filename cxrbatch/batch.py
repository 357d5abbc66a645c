"""`cxrbatch process`: one batch over an input folder.

discover files -> quarantine/record rejected ones -> for each study (in this process, or
spread over worker processes that each load the models once; in each process
`processing.study_threads` studies in flight on threads sharing its models): skip if
already processed with the same fingerprint, else pipeline.run -> record the outcome. A
study that fails for any reason is recorded as failed and the batch goes on.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from cxrbatch import logs, pipeline
from cxrbatch.config import Settings
from cxrbatch.cpus import threads_per_worker
from cxrbatch.db.session import ensure_local_sqlite, make_engine, session_factory, upgrade
from cxrbatch.dicom.discover import discover
from cxrbatch.domain import OutcomeStatus, StudyInput
from cxrbatch.models.device import limit_cpu_threads
from cxrbatch.paths import database_url, quarantine_dir
from cxrbatch.quarantine import record_rejected_files
from cxrbatch.worker import StudyProcessor, StudyReport

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
    out_dir: Path,
    settings: Settings,
    *,
    force: bool = False,
    workers: int = 1,
    models: pipeline.Models | None = None,
    on_study: Callable[[StudyReport, int, int], None] | None = None,
) -> BatchSummary:
    """Process every study under `input_dir`; raises only when the batch itself cannot run.

    `workers` > 1 spreads studies over that many processes, each with its own models and
    an equal share of the CPU threads; each records its outcomes itself. Each process has
    `settings.processing.study_threads` studies in flight. Reports come in completion order.
    """
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    url = database_url(settings, out_dir)
    ensure_local_sqlite(url)
    upgrade(url)
    summary = BatchSummary()
    studies, rejected = discover(input_dir)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            recorded, quarantined = record_rejected_files(
                session, rejected, quarantine_dir(settings, out_dir)
            )
            session.commit()
    finally:
        engine.dispose()
    summary.rejected_files += recorded
    summary.quarantined_files += quarantined
    summary.reasons.update(item.reason for item in rejected)
    if workers <= 1 or len(studies) <= 1:
        reports = _run_here(studies, settings, out_dir, url, force, models)
    else:
        reports = _run_in_pool(studies, settings, out_dir, url, force, workers)
    for index, report in enumerate(reports, start=1):
        summary.add(report)
        if on_study:
            on_study(report, index, len(studies))
    summary.seconds = time.perf_counter() - started
    return summary


def _run_here(
    studies: list[StudyInput],
    settings: Settings,
    out_dir: Path,
    url: str,
    force: bool,
    models: pipeline.Models | None,
) -> Iterator[StudyReport]:
    threads = settings.processing.study_threads
    worker = StudyProcessor(settings, out_dir, url, models, in_flight=threads)
    try:
        yield from process_concurrently(worker, studies, force, threads)
    finally:
        worker.close()


def process_concurrently(
    worker: StudyProcessor, studies: list[StudyInput], force: bool, threads: int
) -> Iterator[StudyReport]:
    """Process `studies` with up to `threads` of them in flight at once, sharing the
    worker's models; reports in completion order. The networks release the GIL, so one
    study's decoding and DICOM writing run while another's networks compute."""
    if threads <= 1 or len(studies) <= 1:
        for study in studies:
            yield worker.process(study, force)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="study") as pool:
        futures = [pool.submit(worker.process, study, force) for study in studies]
        for future in as_completed(futures):
            yield future.result()


# ---- worker processes -------------------------------------------------------------------

_WORKER: StudyProcessor | None = None


def _init_worker(settings: Settings, out_dir: Path, url: str, threads: int) -> None:
    global _WORKER
    logs.configure(settings.logging.level, settings.logging.format)
    limit_cpu_threads(threads)
    _WORKER = StudyProcessor(settings, out_dir, url, in_flight=settings.processing.study_threads)


def _work(studies: list[StudyInput], force: bool) -> list[StudyReport]:
    assert _WORKER is not None, "worker process not initialised"
    threads = _WORKER.settings.processing.study_threads
    return list(process_concurrently(_WORKER, studies, force, threads))


def _run_in_pool(
    studies: list[StudyInput],
    settings: Settings,
    out_dir: Path,
    url: str,
    force: bool,
    workers: int,
) -> Iterator[StudyReport]:
    threads = threads_per_worker(workers)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(settings, out_dir, url, threads),
    ) as pool:
        # A process takes one task at a time: a task is as many studies as it has in flight.
        size = settings.processing.study_threads
        chunks = [studies[i : i + size] for i in range(0, len(studies), size)]
        futures = {pool.submit(_work, chunk, force): chunk for chunk in chunks}
        for future in as_completed(futures):
            try:
                yield from future.result()
            except Exception as exc:  # a worker died (killed, out of memory): record, go on
                for study in futures[future]:
                    log.error("worker failed on study %s: %s", study.study_instance_uid, exc)
                    yield StudyReport(
                        study.study_instance_uid,
                        OutcomeStatus.FAILED.value,
                        f"worker process failed: {type(exc).__name__}",
                    )

"""`cxrbatch process`: one batch over an input folder.

discover files -> quarantine/record rejected ones -> for each study (in this process, or
spread over worker processes that each load the models once): skip if already processed
with the same fingerprint, else pipeline.run -> record the outcome. A study that fails for
any reason is recorded as failed and the batch goes on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from cxrbatch import logs, pipeline
from cxrbatch.config import Settings
from cxrbatch.db import repository
from cxrbatch.db.session import default_url, make_engine, session_factory, upgrade
from cxrbatch.dicom.discover import discover
from cxrbatch.domain import OutcomeStatus, RejectedFile, StudyInput, StudyResult
from cxrbatch.errors import CxrBatchError
from cxrbatch.quarantine import quarantine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyReport:
    """What processing one study reports back (small enough to cross processes)."""

    study_instance_uid: str
    status: str  # an OutcomeStatus value, or "unchanged"
    reason: str | None = None
    image_reasons: tuple[str, ...] = ()
    quarantined: int = 0
    images: int = 0
    synthetic_model: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    worker_pid: int = 0


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


def database_url(settings: Settings, out_dir: Path) -> str:
    return settings.database.url or default_url(out_dir)


def quarantine_dir(settings: Settings, out_dir: Path) -> Path:
    if settings.output.quarantine_dir:
        return Path(settings.output.quarantine_dir)
    return out_dir / "_quarantine"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_gpu_bytes() -> int:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_initialized() else 0


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
    an equal share of the CPU threads; each records its outcomes itself.
    """
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    url = database_url(settings, out_dir)
    upgrade(url)
    summary = BatchSummary()
    studies, rejected = discover(input_dir)
    engine = make_engine(url)
    try:
        _record_rejected(
            rejected, session_factory(engine), quarantine_dir(settings, out_dir), summary
        )
    finally:
        engine.dispose()
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
    worker = _Worker(settings, out_dir, url, models)
    try:
        for study in studies:
            yield worker.process(study, force)
    finally:
        worker.close()


# ---- worker processes -------------------------------------------------------------------

_WORKER: _Worker | None = None


def _init_worker(settings: Settings, out_dir: Path, url: str, threads: int) -> None:
    global _WORKER
    logs.configure(settings.logging.level, settings.logging.format)
    torch.set_num_threads(threads)
    _WORKER = _Worker(settings, out_dir, url, None)


def _work(study: StudyInput, force: bool) -> StudyReport:
    assert _WORKER is not None, "worker process not initialised"
    return _WORKER.process(study, force)


def _run_in_pool(
    studies: list[StudyInput],
    settings: Settings,
    out_dir: Path,
    url: str,
    force: bool,
    workers: int,
) -> Iterator[StudyReport]:
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(settings, out_dir, url, threads),
    ) as pool:
        futures = {pool.submit(_work, study, force): study for study in studies}
        for future in as_completed(futures):
            study = futures[future]
            try:
                yield future.result()
            except Exception as exc:  # a worker died (killed, out of memory): record, go on
                log.error("worker failed on study %s: %s", study.study_instance_uid, exc)
                yield StudyReport(
                    study.study_instance_uid,
                    OutcomeStatus.FAILED.value,
                    f"worker process failed: {type(exc).__name__}",
                )


class _Worker:
    """Models loaded once, a database session factory; processes and records studies."""

    def __init__(
        self, settings: Settings, out_dir: Path, url: str, models: pipeline.Models | None
    ) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.engine = make_engine(url)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        self.models = models if models is not None else pipeline.load_models(settings)
        self.synthetic = any(m.synthetic_training_data for m in self.models.refs)

    def close(self) -> None:
        self.engine.dispose()

    def process(self, study: StudyInput, force: bool) -> StudyReport:
        settings, models = self.settings, self.models
        fingerprint = pipeline.input_fingerprint(study, models, settings)
        with self.sessions() as session:
            current = repository.current_outcome(session, study.study_instance_uid)
            # Unchanged input, same models, outputs in place: nothing to do. Failed studies
            # are always retried (the cause may have been transient: a full disk, a kill).
            if (
                not force
                and current is not None
                and current.status != OutcomeStatus.FAILED.value
                and current.input_fingerprint == fingerprint
                and _outputs_exist(current.outputs)
            ):
                log.info(
                    "study %s unchanged since its last outcome; skipped", study.study_instance_uid
                )
                return StudyReport(
                    study.study_instance_uid, "unchanged", synthetic_model=self.synthetic
                )
        try:
            result = pipeline.run(study, models, settings, self.out_dir)
        except CxrBatchError as exc:  # e.g. an output that cannot be written (disk full)
            log.error("study %s failed: %s", study.study_instance_uid, exc)
            result = _failed_result(study, str(exc), fingerprint, models)
        except Exception as exc:  # one study must never stop the batch
            log.exception("study %s failed", study.study_instance_uid)
            reason = f"internal error: {type(exc).__name__}: {exc}"
            result = _failed_result(study, reason, fingerprint, models)
        quarantined = self._record(study, result)
        log.info(
            "study %s %s in %.2fs (%d image(s) processed, %d skipped, %d failed)",
            study.study_instance_uid,
            result.status.value,
            sum(result.timings.values()),
            len(result.images),
            len(result.skipped),
            len(result.failures),
        )
        reasons = [s.reason for s in result.skipped] + [f.reason for f in result.failures]
        if result.status is OutcomeStatus.FAILED and not result.failures and result.reason:
            reasons.append(result.reason)  # a failure of the study as a whole
        return StudyReport(
            study_instance_uid=study.study_instance_uid,
            status=result.status.value,
            reason=result.reason,
            image_reasons=tuple(reasons),
            quarantined=quarantined,
            images=len(result.images),
            synthetic_model=self.synthetic,
            timings=dict(result.timings),
            peak_rss_bytes=peak_rss_bytes(),
            peak_gpu_bytes=peak_gpu_bytes(),
            worker_pid=os.getpid(),
        )

    def _record(self, study: StudyInput, result: StudyResult) -> int:
        qdir = quarantine_dir(self.settings, self.out_dir)
        quarantined = 0
        with self.sessions() as session:
            for failure in result.failures:
                header = failure.instance
                copy = quarantine(header.path, failure.reason, qdir, header.sha256)
                quarantined += copy is not None
                repository.record_rejected(
                    session,
                    RejectedFile(
                        header.path,
                        failure.reason,
                        header.sha256,
                        study_instance_uid=study.study_instance_uid,
                        sop_instance_uid=header.sop_instance_uid,
                    ),
                    copy,
                )
            repository.record_study(session, result)
            session.commit()
        return quarantined


def _failed_result(
    study: StudyInput, reason: str, fingerprint: str, models: pipeline.Models
) -> StudyResult:
    return StudyResult(
        study_instance_uid=study.study_instance_uid,
        status=OutcomeStatus.FAILED,
        reason=reason,
        images=(),
        skipped=(),
        failures=(),
        triage=None,
        no_finding_score=None,
        models=models.refs,
        input_fingerprint=fingerprint,
    )


def _record_rejected(
    rejected: list[RejectedFile], sessions: sessionmaker[Session], qdir: Path, summary: BatchSummary
) -> None:
    with sessions() as session:
        for item in rejected:
            copy = (
                quarantine(item.path, item.reason, qdir, item.sha256) if item.quarantine else None
            )
            summary.rejected_files += 1
            summary.quarantined_files += copy is not None
            summary.reasons[item.reason] += 1
            repository.record_rejected(session, item, copy)
        session.commit()


def _outputs_exist(outputs: dict[str, object]) -> bool:
    paths: list[str] = []
    seg = outputs.get("seg") or {}
    if isinstance(seg, dict):
        paths.extend(str(p) for p in seg.values())
    for key in ("sr", "json"):
        value = outputs.get(key)
        if value:
            paths.append(str(value))
    return all(Path(p).is_file() for p in paths)

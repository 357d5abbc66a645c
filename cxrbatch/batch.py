"""`cxrbatch process`: one batch over an input folder.

discover files -> quarantine/record rejected ones -> load models once -> for each study:
skip if already processed with the same fingerprint, else pipeline.run -> record outcome.
A study that fails for any reason is recorded as failed and the batch goes on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from cxrbatch import pipeline
from cxrbatch.config import Settings
from cxrbatch.db import repository
from cxrbatch.db.session import default_url, make_engine, session_factory, upgrade
from cxrbatch.dicom.discover import discover
from cxrbatch.domain import OutcomeStatus, RejectedFile, StudyInput, StudyResult
from cxrbatch.errors import CxrBatchError
from cxrbatch.quarantine import quarantine

log = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    studies: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    rejected_files: int = 0
    quarantined_files: int = 0
    unchanged: int = 0
    seconds: float = 0.0
    results: list[StudyResult] = field(default_factory=list)


def database_url(settings: Settings, out_dir: Path) -> str:
    return settings.database.url or default_url(out_dir)


def quarantine_dir(settings: Settings, out_dir: Path) -> Path:
    return (
        Path(settings.output.quarantine_dir)
        if settings.output.quarantine_dir
        else out_dir / "_quarantine"
    )


def _failed_result(
    study: StudyInput, reason: str, models: pipeline.Models, settings: Settings
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
        input_fingerprint=pipeline.input_fingerprint(study, models, settings),
    )


def run_batch(
    input_dir: Path,
    out_dir: Path,
    settings: Settings,
    *,
    force: bool = False,
    models: pipeline.Models | None = None,
    on_study: Callable[[StudyResult | None, int, int], None] | None = None,
) -> BatchSummary:
    """Process every study under `input_dir`; raises only when the batch itself cannot run."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    url = database_url(settings, out_dir)
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    summary = BatchSummary()
    try:
        studies, rejected = discover(input_dir)
        _record_rejected(rejected, sessions, quarantine_dir(settings, out_dir), summary)
        if models is None:
            models = pipeline.load_models(settings)
        for index, study in enumerate(studies, start=1):
            result = _process_one(study, models, settings, out_dir, sessions, force, summary)
            if on_study:
                on_study(result, index, len(studies))
    finally:
        engine.dispose()
    summary.seconds = time.perf_counter() - started
    return summary


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


def _process_one(
    study: StudyInput,
    models: pipeline.Models,
    settings: Settings,
    out_dir: Path,
    sessions: sessionmaker[Session],
    force: bool,
    summary: BatchSummary,
) -> StudyResult | None:
    fingerprint = pipeline.input_fingerprint(study, models, settings)
    with sessions() as session:
        current = repository.current_outcome(session, study.study_instance_uid)
        # Unchanged input, same models, outputs in place: nothing to do. Failed studies are
        # always retried (the cause may have been transient: a full disk, a killed worker).
        if (
            not force
            and current is not None
            and current.status != OutcomeStatus.FAILED.value
            and current.input_fingerprint == fingerprint
            and _outputs_exist(current.outputs)
        ):
            summary.unchanged += 1
            summary.studies["unchanged"] += 1
            log.info("study %s unchanged since its last outcome; skipped", study.study_instance_uid)
            return None
    try:
        result = pipeline.run(study, models, settings, out_dir)
    except CxrBatchError as exc:  # e.g. an output that cannot be written (disk full)
        log.error("study %s failed: %s", study.study_instance_uid, exc)
        result = _failed_result(study, str(exc), models, settings)
    except Exception as exc:  # one study must never stop the batch
        log.exception("study %s failed", study.study_instance_uid)
        result = _failed_result(
            study, f"internal error: {type(exc).__name__}: {exc}", models, settings
        )
    qdir = quarantine_dir(settings, out_dir)
    with sessions() as session:
        for failure in result.failures:
            copy = quarantine(failure.instance.path, failure.reason, qdir, failure.instance.sha256)
            summary.quarantined_files += copy is not None
            repository.record_rejected(
                session,
                RejectedFile(
                    failure.instance.path,
                    failure.reason,
                    failure.instance.sha256,
                    study_instance_uid=study.study_instance_uid,
                    sop_instance_uid=failure.instance.sop_instance_uid,
                ),
                copy,
            )
        repository.record_study(session, result)
        session.commit()
    summary.studies[result.status.value] += 1
    if result.status is OutcomeStatus.FAILED and not result.failures and result.reason:
        summary.reasons[result.reason] += 1  # a failure of the study as a whole
    for skipped in result.skipped:
        summary.reasons[skipped.reason] += 1
    for failure in result.failures:
        summary.reasons[failure.reason] += 1
    summary.results.append(result)
    log.info(
        "study %s %s in %.2fs (%d image(s) processed, %d skipped, %d failed)",
        study.study_instance_uid,
        result.status.value,
        sum(result.timings.values()),
        len(result.images),
        len(result.skipped),
        len(result.failures),
    )
    return result


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

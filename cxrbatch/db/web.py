"""The rows the web app shows (cxrbatch/web/): the worklist page by page, one study with
its history and deliveries, the operations figures, and the audit trail it writes.

The worklist is one indexed query per page: current outcomes (ix_outcomes_current_status)
filtered in SQL, ordered in SQL, counted once, with the findings of that page's studies
loaded in one more query.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, case, func, select
from sqlalchemy.orm import Session, selectinload

from cxrbatch.db import models
from cxrbatch.db.repository import OutcomeFilter, deciding_models, filter_outcomes, probabilities
from cxrbatch.domain import DeliveryStatus, JobStatus, Triage

SORTS = ("screening", "recorded", "study_date", "no_finding")


@dataclass(frozen=True)
class WorklistFilter:
    """The worklist's filters (all optional, combined with AND)."""

    recorded_from: dt.date | None = None
    recorded_to: dt.date | None = None  # inclusive
    triage: str | None = None
    status: str | None = None
    label: str | None = None
    min_probability: float | None = None


@dataclass(frozen=True)
class WorklistRow:
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: dt.date | None
    modality: str | None
    status: str
    triage: str | None
    reason: str | None
    no_finding_score: float | None
    screening_no_finding_score: float | None
    synthetic_model: bool
    recorded_at: dt.datetime
    probabilities: dict[str, float] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    # The classifier's per-label thresholds as recorded with the outcome (empty before
    # migration 0008), and the bundles that decided, "name version".
    thresholds: dict[str, float] = field(default_factory=dict)
    decided_by: str | None = None


def _score() -> Any:
    return func.coalesce(models.Outcome.screening_no_finding_score, models.Outcome.no_finding_score)


def _ordered(statement: Select[Any], sort: str) -> Select[Any]:
    if sort == "recorded":
        return statement.order_by(models.Outcome.created_at.desc(), models.Outcome.id.desc())
    if sort == "study_date":
        return statement.order_by(
            models.Study.study_date.desc().nulls_last(), models.Outcome.id.desc()
        )
    if sort == "no_finding":
        return statement.order_by(_score().asc().nulls_last(), models.Outcome.id)
    # Screening order: abnormal and needs-review first, then the unscreened (failed,
    # ineligible, segmentation only), then likely-normal; least normal first within each.
    rank = case(
        (models.Outcome.triage.in_([Triage.ABNORMAL, Triage.NEEDS_REVIEW]), 0),
        (models.Outcome.triage.is_(None), 1),
        else_=2,
    )
    return statement.order_by(
        rank, case((_score().is_(None), 1), else_=0), _score(), models.Outcome.id
    )


def _filtered(session: Session, statement: Select[Any], where: WorklistFilter) -> Select[Any]:
    """The worklist's filters as `repository.filter_outcomes` applies them (dates are whole
    UTC days, the end day included)."""
    utc = dt.UTC
    since = until = None
    if where.recorded_from is not None:
        since = dt.datetime.combine(where.recorded_from, dt.time(), utc)
    if where.recorded_to is not None:
        until = dt.datetime.combine(where.recorded_to + dt.timedelta(days=1), dt.time(), utc)
    outcome_filter = OutcomeFilter(
        since=since,
        until=until,
        status=where.status,
        triage=where.triage,
        label=where.label,
        min_probability=where.min_probability,
    )
    narrowed: Select[Any] = filter_outcomes(session, statement, outcome_filter)
    return narrowed


def worklist_page(
    session: Session, where: WorklistFilter, sort: str, page: int, size: int
) -> tuple[list[WorklistRow], int, int]:
    """One page (1-based; past the last: the last) of current outcomes, the number of all
    that match, and the page number served."""
    base = (
        select(models.Outcome)
        .join(models.Study, models.Study.id == models.Outcome.study_id)
        .where(models.Outcome.is_current)
    )
    base = _filtered(session, base, where)
    total = int(session.scalar(select(func.count()).select_from(base.subquery())) or 0)
    page = max(1, min(page, -(-total // size)))
    statement = (
        _ordered(base, sort if sort in SORTS else "screening")
        .options(
            selectinload(models.Outcome.study),
            selectinload(models.Outcome.images).selectinload(models.Image.findings),
        )
        .offset(max(0, page - 1) * size)
        .limit(size)
    )
    return [_row(o) for o in session.scalars(statement)], total, page


def _row(outcome: models.Outcome) -> WorklistRow:
    study = outcome.study
    return WorklistRow(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        study_date=study.study_date,
        modality=study.modality,
        status=outcome.status,
        triage=outcome.triage,
        reason=outcome.reason,
        no_finding_score=outcome.no_finding_score,
        screening_no_finding_score=outcome.screening_no_finding_score,
        synthetic_model=outcome.synthetic_model,
        recorded_at=outcome.created_at,
        probabilities=probabilities(outcome),
        models=list(outcome.models or []),
        thresholds={
            f.label: f.threshold
            for image in outcome.images
            for f in image.findings
            if f.role == "classifier" and f.threshold is not None
        },
        decided_by=deciding_models(outcome),
    )


@dataclass(frozen=True)
class StudyView:
    current: models.Outcome
    history: list[models.Outcome]  # superseded outcomes, newest first
    deliveries: list[models.Delivery]
    row: WorklistRow


def study_view(session: Session, study_instance_uid: str) -> StudyView | None:
    study = session.scalar(
        select(models.Study).where(models.Study.study_instance_uid == study_instance_uid)
    )
    if study is None:
        return None
    outcomes = list(
        session.scalars(
            select(models.Outcome)
            .where(models.Outcome.study_id == study.id)
            .options(
                selectinload(models.Outcome.study),
                selectinload(models.Outcome.images).selectinload(models.Image.findings),
            )
            .order_by(models.Outcome.created_at.desc(), models.Outcome.id.desc())
        )
    )
    current = next((o for o in outcomes if o.is_current), None)
    if current is None:
        return None
    deliveries = list(
        session.scalars(
            select(models.Delivery)
            .where(models.Delivery.study_instance_uid == study_instance_uid)
            .order_by(models.Delivery.created_at.desc())
        )
    )
    history = [o for o in outcomes if not o.is_current]
    return StudyView(current, history, deliveries, _row(current))


def operations(session: Session, now: dt.datetime) -> dict[str, Any]:
    """Queue depth, throughput by hour, failures, dead jobs, deliveries, quarantine, workers."""
    from cxrbatch.db import deliveries as delivery_rows
    from cxrbatch.db import jobs

    day_ago = now - dt.timedelta(hours=24)
    finished = session.scalars(
        select(models.Job.finished_at).where(
            models.Job.finished_at.is_not(None), models.Job.finished_at >= day_ago
        )
    )
    per_hour = [0] * 24
    for at in finished:
        if at is None:
            continue
        stamp = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
        index = int((now - stamp).total_seconds() // 3600)
        if 0 <= index < 24:
            per_hour[23 - index] += 1
    failures = list(
        session.scalars(
            select(models.Outcome)
            .where(models.Outcome.is_current, models.Outcome.status == "failed")
            .options(selectinload(models.Outcome.study))
            .order_by(models.Outcome.created_at.desc())
            .limit(20)
        )
    )
    dead = list(
        session.scalars(
            select(models.Job)
            .where(models.Job.status == JobStatus.DEAD)
            .order_by(models.Job.updated_at.desc())
            .limit(20)
        )
    )
    last_errors = dict(
        session.execute(
            select(models.Delivery.destination, models.Delivery.last_error)
            .where(models.Delivery.last_error.is_not(None))
            .order_by(models.Delivery.updated_at)
        ).all()
    )
    quarantine = dict(
        session.execute(
            select(models.RejectedFile.reason, func.count())
            .group_by(models.RejectedFile.reason)
            .order_by(func.count().desc())
            .limit(30)
        ).all()
    )
    workers = list(
        session.execute(
            select(models.Job.lease_owner, func.max(models.Job.heartbeat_at))
            .where(
                models.Job.status == JobStatus.RUNNING,
                models.Job.lease_expires_at.is_not(None),
                models.Job.lease_expires_at > now,
            )
            .group_by(models.Job.lease_owner)
        ).all()
    )
    return {
        "jobs": jobs.counts(session),
        "finished_per_hour": per_hour,
        "failures": failures,
        "dead_jobs": dead,
        "deliveries": delivery_rows.counts(session),
        "delivery_last_errors": last_errors,
        "quarantine_by_reason": quarantine,
        "workers": workers,
    }


def record_audit(
    session: Session, user: str, action: str, study_instance_uid: str | None, detail: str | None
) -> None:
    """One audit event (the caller commits)."""
    session.add(
        models.AuditEvent(
            user=user[:64],
            action=action,
            study_instance_uid=study_instance_uid,
            detail=detail,
        )
    )


def audit_events(
    session: Session,
    since: dt.datetime | None = None,
    user: str | None = None,
    study_instance_uid: str | None = None,
    limit: int = 1000,
) -> list[models.AuditEvent]:
    statement = select(models.AuditEvent).order_by(models.AuditEvent.at.desc()).limit(limit)
    if since is not None:
        statement = statement.where(models.AuditEvent.at >= since)
    if user:
        statement = statement.where(models.AuditEvent.user == user)
    if study_instance_uid:
        statement = statement.where(models.AuditEvent.study_instance_uid == study_instance_uid)
    return list(session.scalars(statement))


def metric_counts(session: Session) -> dict[str, dict[str, int]]:
    """Counts for /metrics: current outcomes by status and by triage, jobs by status,
    deliveries by status, rejected files."""
    by_status = dict(
        session.execute(
            select(models.Outcome.status, func.count())
            .where(models.Outcome.is_current)
            .group_by(models.Outcome.status)
        ).all()
    )
    by_triage = dict(
        session.execute(
            select(func.coalesce(models.Outcome.triage, "none"), func.count())
            .where(models.Outcome.is_current)
            .group_by(models.Outcome.triage)
        ).all()
    )
    deliveries = dict(
        session.execute(
            select(models.Delivery.status, func.count()).group_by(models.Delivery.status)
        ).all()
    )
    from cxrbatch.db import jobs

    return {
        "outcomes": {str(k): int(v) for k, v in by_status.items()},
        "triage": {str(k): int(v) for k, v in by_triage.items()},
        "jobs": jobs.counts(session),
        "deliveries": {s.value: int(deliveries.get(s.value, 0)) for s in DeliveryStatus},
        "rejected_files": {
            "all": int(session.scalar(select(func.count()).select_from(models.RejectedFile)) or 0)
        },
    }


def stage_timings(session: Session, limit: int = 2000) -> list[dict[str, float]]:
    """The per-stage seconds of the most recent outcomes (for the latency histograms)."""
    return [
        {str(k): float(v) for k, v in (t or {}).items()}
        for t in session.scalars(
            select(models.Outcome.timings).order_by(models.Outcome.id.desc()).limit(limit)
        )
    ]

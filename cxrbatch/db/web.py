"""The rows the web app shows (cxrbatch/web/): the worklist page by page, one study with
its history and deliveries, the operations figures, and the audit trail it writes.

The worklist is one indexed query per page: current outcomes filtered in SQL and read in
the order's index (ix_outcomes_screening, ...) from where the previous page ended (a
cursor of the last row's key, never an OFFSET), counted up to COUNT_CAP, with the
findings of that page's studies loaded in one more query.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.orm import Session, selectinload

from cxrbatch.db import models
from cxrbatch.db.repository import OutcomeFilter, deciding_models, filter_outcomes, probabilities
from cxrbatch.domain import DeliveryStatus, JobStatus


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
    study_number: int  # the study's row number in this database: stable, no patient data
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


# Each order's key: columns of the outcome, all ascending or all descending, ending with
# the id so that every row has its own place. Screening order: abnormal and needs-review
# first, then the unscreened (failed, ineligible, segmentation only), then likely-normal;
# least normal first within each, rows without a score last.
_O = models.Outcome
ORDERS: dict[str, tuple[tuple[Any, ...], bool]] = {
    "screening": ((_O.screening_rank, _O.score_missing, _O.sort_score, _O.id), False),
    "no_finding": ((_O.score_missing, _O.sort_score, _O.id), False),
    "recorded": ((_O.created_at, _O.id), True),
    "study_date": ((_O.sort_date, _O.id), True),
}
# Matches are counted exactly up to this many; past it the page says "more than".
COUNT_CAP = 10_000


class CursorError(ValueError):
    """A page cursor that this code did not write (edited, or from another sort)."""


def _cursor(outcome: models.Outcome, sort: str) -> str:
    values = []
    for column in ORDERS[sort][0]:
        value = getattr(outcome, column.key)
        values.append(value.isoformat() if isinstance(value, dt.date) else value)
    text = json.dumps([sort, *values], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _key(cursor: str, sort: str) -> list[Any]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(decoded, list) or decoded[0] != sort:
            raise CursorError("the page cursor belongs to another order")
        columns = ORDERS[sort][0]
        values = decoded[1:]
        if len(values) != len(columns):
            raise CursorError("the page cursor does not fit this order")
        key = []
        for column, value in zip(columns, values, strict=True):
            python = column.type.python_type
            if python is dt.datetime:
                value = dt.datetime.fromisoformat(value)
            elif python is dt.date:
                value = dt.date.fromisoformat(value)
            elif not isinstance(value, python) and not (python is float and isinstance(value, int)):
                raise CursorError("the page cursor does not fit this order")
            key.append(value)
        return key
    except CursorError:
        raise
    except (ValueError, TypeError, IndexError, binascii.Error) as exc:
        raise CursorError(f"not a page cursor of this worklist: {exc}") from exc


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


@dataclass(frozen=True)
class WorklistPage:
    """One page of the worklist and the cursors of its neighbours (None: none there)."""

    rows: list[WorklistRow]
    total: int  # matches, counted up to COUNT_CAP
    more: bool  # more than COUNT_CAP match
    next_cursor: str | None
    previous_cursor: str | None


def worklist_page(
    session: Session,
    where: WorklistFilter,
    sort: str,
    size: int,
    after: str | None = None,
    before: str | None = None,
) -> WorklistPage:
    """The page of current outcomes after the cursor `after` (or before `before`; the
    first page without either) in the order `sort`. Each page is read from the order's
    index where the cursor points, so the 1,000th page costs what the first does; the
    matches are counted up to COUNT_CAP (a count of every match is a scan)."""
    sort = sort if sort in ORDERS else "screening"
    columns, descending = ORDERS[sort]
    base = (
        select(models.Outcome)
        .join(models.Study, models.Study.id == models.Outcome.study_id)
        .where(models.Outcome.is_current)
    )
    base = _filtered(session, base, where)
    counted = session.scalar(
        select(func.count()).select_from(
            base.with_only_columns(_O.id).limit(COUNT_CAP + 1).subquery()
        )
    )
    total = int(counted or 0)
    backwards = before is not None and after is None
    cursor = before if backwards else after
    # Read the index downwards for a descending order, or to go back in an ascending one.
    reverse = descending != backwards
    statement = base
    if cursor is not None:
        here, there = tuple_(*columns), tuple_(*_key(cursor, sort))
        statement = statement.where(here < there if reverse else here > there)
    statement = statement.order_by(*(c.desc() if reverse else c.asc() for c in columns))
    statement = statement.options(
        selectinload(models.Outcome.study),
        selectinload(models.Outcome.images).selectinload(models.Image.findings),
    ).limit(size + 1)
    found = list(session.scalars(statement))
    beyond = len(found) > size
    found = found[:size]
    if backwards:
        found.reverse()
        has_previous, has_next = beyond, True
    else:
        has_previous, has_next = after is not None, beyond
    return WorklistPage(
        rows=[_row(o) for o in found],
        total=min(total, COUNT_CAP),
        more=total > COUNT_CAP,
        next_cursor=_cursor(found[-1], sort) if has_next and found else None,
        previous_cursor=_cursor(found[0], sort) if has_previous and found else None,
    )


def _row(outcome: models.Outcome) -> WorklistRow:
    study = outcome.study
    return WorklistRow(
        study_instance_uid=study.study_instance_uid,
        study_number=study.id,
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

    # Studies recorded per clock hour (UTC) over the last 24, by any way in (`process`,
    # the queue's workers, a campaign), oldest first, each labelled with its hour.
    this_hour = now.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    first_hour = this_hour - dt.timedelta(hours=23)
    recorded = session.scalars(
        select(models.Outcome.created_at).where(models.Outcome.created_at >= first_hour)
    )
    counts = [0] * 24
    for at in recorded:
        stamp = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
        index = int((stamp - first_hour).total_seconds() // 3600)
        if 0 <= index < 24:
            counts[index] += 1
    per_hour = [
        {"hour": (first_hour + dt.timedelta(hours=i)).strftime("%H:00"), "studies": n}
        for i, n in enumerate(counts)
    ]
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
    # One pass over the current outcomes' (status, triage) index (ix_outcomes_current_triage:
    # an index-only scan on PostgreSQL), both counts from it.
    by_status: dict[str, int] = {}
    by_triage: dict[str, int] = {}
    for status, triage, n in session.execute(
        select(models.Outcome.status, models.Outcome.triage, func.count())
        .where(models.Outcome.is_current)
        .group_by(models.Outcome.status, models.Outcome.triage)
    ):
        by_status[status] = by_status.get(status, 0) + int(n)
        by_triage[triage or "none"] = by_triage.get(triage or "none", 0) + int(n)
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

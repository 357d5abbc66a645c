"""The read model: what people and programs read about outcomes, studies, the queue,
deliveries and failures. The CLI (`results`, `worklist`, `status`), the web app's pages and
JSON API, /metrics and the report transports read through here: one projection of an
outcome (`OutcomeView`), one set of operations figures (`Operations`), one set of limits
and orderings. Nothing here writes (the record step is `cxrbatch.db.repository`).

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
from pathlib import Path
from typing import Any

from sqlalchemy import Select, case, func, or_, select, tuple_
from sqlalchemy.orm import Session, selectinload

from cxrbatch.db import models
from cxrbatch.domain import (
    FINDING_LABELS,
    DeliveryStatus,
    JobStatus,
    OutcomeStatus,
    Report,
    ReportedFinding,
    Triage,
)
from cxrbatch.errors import CxrBatchError
from cxrbatch.paths import StorageRoots, resolve_stored


@dataclass(frozen=True)
class OutcomeFilter:
    """Filters of `cxrbatch results` (all optional, combined with AND)."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    status: str | None = None
    triage: str | None = None
    label: str | None = None
    min_probability: float | None = None


def finding_labels(session: Session) -> list[str]:
    """The five study labels, then any other label a bundle has recorded."""
    recorded = session.scalars(select(models.Finding.label).distinct())
    return list(FINDING_LABELS) + sorted(set(recorded) - set(FINDING_LABELS))


def canonical_label(session: Session, label: str) -> str:
    """`label` as recorded (case-insensitive: `edema` is Edema); a label no bundle has is an
    error that lists the known ones."""
    known = finding_labels(session)
    for candidate in known:
        if candidate.casefold() == label.strip().casefold():
            return candidate
    raise CxrBatchError(f"unknown finding label {label!r}: expected one of {', '.join(known)}")


_WITH_FINDINGS = (
    selectinload(models.Outcome.study),
    selectinload(models.Outcome.images).selectinload(models.Image.findings),
)


def current_outcomes(session: Session, where: OutcomeFilter | None = None) -> list[models.Outcome]:
    """Current outcomes, oldest first, filtered by time range, status, triage, or a label's
    classifier probability on any image of the study (the label as `canonical_label`)."""
    where = where or OutcomeFilter()
    statement = (
        select(models.Outcome)
        .where(models.Outcome.is_current)
        .options(*_WITH_FINDINGS)
        .order_by(models.Outcome.created_at, models.Outcome.id)
    )
    return list(session.scalars(filter_outcomes(session, statement, where)))


def filter_outcomes(session: Session, statement: Any, where: OutcomeFilter) -> Any:
    """`statement` (a select over outcomes) narrowed by `where` (`results`, the web app)."""
    if where.since is not None:
        statement = statement.where(models.Outcome.created_at >= where.since)
    if where.until is not None:
        statement = statement.where(models.Outcome.created_at < where.until)
    if where.status:
        statement = statement.where(models.Outcome.status == where.status)
    if where.triage:
        statement = statement.where(models.Outcome.triage == where.triage)
    if where.label:
        matching = (
            select(models.Image.outcome_id)
            .join(models.Finding)
            .where(
                models.Finding.role == "classifier",
                models.Finding.label == canonical_label(session, where.label),
                models.Finding.probability >= (where.min_probability or 0.0),
            )
        )
        statement = statement.where(models.Outcome.id.in_(matching))
    return statement


def worklist(
    session: Session, since: dt.datetime | None = None, limit: int | None = None
) -> list[models.Outcome]:
    """Processed studies in screening order: abnormal and needs-review first, then
    unscreened, then likely-normal; within each, the least normal (lowest No Finding
    score) first, and needs-review studies without a score after those with one.
    `since`: outcomes recorded at or after it; `limit`: the first so many."""
    score = func.coalesce(
        models.Outcome.screening_no_finding_score, models.Outcome.no_finding_score
    )
    triage_rank = case(
        (models.Outcome.triage.in_([Triage.ABNORMAL, Triage.NEEDS_REVIEW]), 0),
        (models.Outcome.triage.is_(None), 1),
        else_=2,
    )
    statement = (
        select(models.Outcome)
        .where(models.Outcome.is_current, models.Outcome.status == OutcomeStatus.PROCESSED)
        .options(*_WITH_FINDINGS)
        .order_by(
            triage_rank,
            case((score.is_(None), 1), else_=0),
            score,
            models.Outcome.created_at,
        )
    )
    if since is not None:
        statement = statement.where(models.Outcome.created_at >= since)
    if limit is not None:
        statement = statement.limit(limit)
    return list(session.scalars(statement))


def probabilities(outcome: models.Outcome, role: str = "classifier") -> dict[str, float]:
    """Each label's highest probability over the study's images, for one model role; the
    five study labels first, in their order, then any other."""
    best: dict[str, float] = {}
    for image in outcome.images:
        for finding in image.findings:
            if finding.role == role:
                best[finding.label] = max(best.get(finding.label, 0.0), finding.probability)
    return dict(sorted(best.items(), key=_label_order))


def calls(outcome: models.Outcome, role: str = "classifier") -> dict[str, str]:
    """Each label's study-level call for one model role: positive when any image's
    probability reached the bundle's threshold; labels without a threshold are left out."""
    positive: dict[str, bool] = {}
    for image in outcome.images:
        for finding in image.findings:
            if finding.role == role and finding.positive is not None:
                positive[finding.label] = positive.get(finding.label, False) or finding.positive
    ordered = sorted(positive.items(), key=_label_order)
    return {label: "positive" if p else "negative" for label, p in ordered}


_LABEL_RANK = {label: rank for rank, label in enumerate(FINDING_LABELS)}


def _label_order(item: tuple[str, Any]) -> tuple[int, str]:
    """The five study labels first, in their order, then any other label by name."""
    return _LABEL_RANK.get(item[0], len(_LABEL_RANK)), item[0]


def deciding_models(outcome: models.Outcome) -> str | None:
    """The classifier bundles that decided, as "name version" (the segmenter left out);
    None for an ineligible or failed study, which no model scored."""
    if outcome.status != OutcomeStatus.PROCESSED:
        return None
    names = [
        f"{m.get('name')} {m.get('version')}"
        for m in outcome.models or []
        if isinstance(m, dict) and m.get("mask_mode") is not None
    ]
    # One bundle may serve two roles (classifier and screening): named once.
    return ", ".join(dict.fromkeys(names)) or None


@dataclass(frozen=True)
class OutcomeView:
    """One current outcome of a study as people and programs read it: the worklist's and
    the JSON API's row, the study page's header, `cxrbatch results` (`outcome_row`) and the
    report transports (`report`). The one projection of an outcome and its study."""

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
    calls: dict[str, str] = field(default_factory=dict)  # label -> positive / negative
    segmentation_only: bool = False
    needs_review: bool = False
    processed_by: str | None = None
    outcome_id: int = 0


def outcome_view(outcome: models.Outcome) -> OutcomeView:
    """The view of an outcome loaded with its study, images and findings."""
    study = outcome.study
    return OutcomeView(
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
        calls=calls(outcome),
        segmentation_only=outcome.segmentation_only,
        needs_review=outcome.triage == Triage.NEEDS_REVIEW
        or any(image.triage == Triage.NEEDS_REVIEW for image in outcome.images),
        processed_by=outcome.processed_by,
        outcome_id=outcome.id,
    )


def outcome_row(outcome: models.Outcome) -> dict[str, Any]:
    """One current outcome as the flat record `cxrbatch results` and `worklist` print."""
    view = outcome_view(outcome)
    return {
        "study_number": view.study_number,
        "study_instance_uid": view.study_instance_uid,
        "accession_number": view.accession_number,
        "patient_id": view.patient_id,
        "study_date": view.study_date.isoformat() if view.study_date else None,
        "modality": view.modality,
        "status": view.status,
        "triage": view.triage,
        "no_finding_score": view.no_finding_score,
        "screening_no_finding_score": view.screening_no_finding_score,
        "segmentation_only": view.segmentation_only,
        "synthetic_model": view.synthetic_model,
        "reason": view.reason,
        "created_at": view.recorded_at.isoformat() if view.recorded_at else None,
        "processed_by": view.processed_by,
        "models": view.decided_by,
        "probabilities": view.probabilities,
        "calls": view.calls,
    }


@dataclass(frozen=True)
class ExportedStudy:
    """A processed study as `cxrbatch export-deid` reads it: the view's identity and
    scores, per processed image its source file and classifier probabilities, and the SEG
    and SR files to de-identify."""

    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    triage: str | None
    no_finding_score: float | None
    screening_no_finding_score: float | None
    synthetic_model: bool
    images: tuple[tuple[str, Path | None, dict[str, float]], ...]  # sop uid, source, p
    objects: tuple[Path, ...]  # the SEGs and the SR


def exported_studies(
    session: Session, where: OutcomeFilter, roots: StorageRoots
) -> list[ExportedStudy]:
    """The current outcomes `where` selects, as `export-deid` exports them."""
    found = []
    for outcome in current_outcomes(session, where):
        view = outcome_view(outcome)
        outputs = outcome.outputs or {}
        objects = [resolve_stored(p, roots) for p in (outputs.get("seg") or {}).values()]
        if outputs.get("sr"):
            objects.append(resolve_stored(outputs["sr"], roots))
        images = tuple(
            (
                image.sop_instance_uid,
                resolve_stored(image.source_path, roots) if image.source_path else None,
                {f.label: f.probability for f in image.findings if f.role == "classifier"},
            )
            for image in outcome.images
            if image.status == OutcomeStatus.PROCESSED
        )
        found.append(
            ExportedStudy(
                view.study_instance_uid,
                view.accession_number,
                view.patient_id,
                view.triage,
                view.no_finding_score,
                view.screening_no_finding_score,
                view.synthetic_model,
                images,
                tuple(objects),
            )
        )
    return found


def report(session: Session, outcome_id: int, study_instance_uid: str, destination: str) -> Report:
    """What the report transports send a destination about one outcome: the study-level
    values `cxrbatch results` lists (each label's highest probability, its threshold and
    call), and whether an earlier report reached that destination (LookupError when the
    outcome is gone)."""
    outcome = session.scalar(
        select(models.Outcome).where(models.Outcome.id == outcome_id).options(*_WITH_FINDINGS)
    )
    if outcome is None:
        raise LookupError(f"outcome {outcome_id} of study {study_instance_uid} is gone")
    view = outcome_view(outcome)
    findings = tuple(
        ReportedFinding(
            label,
            probability,
            view.thresholds.get(label),
            view.calls[label] == "positive" if label in view.calls else None,
        )
        for label, probability in view.probabilities.items()
    )
    corrects = session.scalar(
        select(models.Delivery.id).where(
            models.Delivery.study_instance_uid == study_instance_uid,
            models.Delivery.destination == destination,
            models.Delivery.status == DeliveryStatus.SENT,
            # An earlier outcome's, or one deleted since (re-recorded in place).
            or_(models.Delivery.outcome_id != outcome.id, models.Delivery.outcome_id.is_(None)),
        )
    )
    return Report(
        outcome_id=view.outcome_id,
        study_instance_uid=view.study_instance_uid,
        accession_number=view.accession_number,
        patient_id=view.patient_id,
        patient_name=view.patient_name,
        study_date=view.study_date,
        created_at=view.recorded_at,
        triage=view.triage,
        no_finding_score=view.no_finding_score,
        screening_no_finding_score=view.screening_no_finding_score,
        findings=findings,
        models=tuple(view.models),
        synthetic_model=view.synthetic_model,
        segmentation_only=view.segmentation_only,
        needs_review=view.needs_review,
        corrects_earlier=corrects is not None,
    )


@dataclass(frozen=True)
class WorklistFilter:
    """The worklist's filters (all optional, combined with AND)."""

    recorded_from: dt.date | None = None
    recorded_to: dt.date | None = None  # inclusive
    triage: str | None = None
    status: str | None = None
    label: str | None = None
    min_probability: float | None = None


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

    rows: list[OutcomeView]
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
        rows=[outcome_view(o) for o in found],
        total=min(total, COUNT_CAP),
        more=total > COUNT_CAP,
        next_cursor=_cursor(found[-1], sort) if has_next and found else None,
        previous_cursor=_cursor(found[0], sort) if has_previous and found else None,
    )


@dataclass(frozen=True)
class StudyView:
    current: models.Outcome
    history: list[models.Outcome]  # superseded outcomes, newest first
    deliveries: list[models.Delivery]
    row: OutcomeView


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
    return StudyView(current, history, deliveries, outcome_view(current))


# How many failed studies, dead jobs and failed deliveries the operations views list
# (the page, `cxrbatch status`): the most recent first.
RECENT = 20


@dataclass(frozen=True)
class Operations:
    """The queue, throughput, failures, deliveries, quarantine and workers of a site now:
    the operations page and `cxrbatch status` show the same figures."""

    jobs: dict[str, int]
    finished_last_hour: int
    finished_last_24h: int
    # Studies recorded per clock hour (UTC) over the last 24, oldest first:
    # {"hour": "13:00", "studies": n}.
    finished_per_hour: list[dict[str, Any]]
    failures: list[models.Outcome]  # current failed outcomes, newest first (with .study)
    dead_jobs: list[models.Job]  # newest first
    deliveries: dict[str, dict[str, int]]  # destination -> status -> count
    undelivered: list[models.Delivery]  # failed and dead deliveries, newest first
    delivery_last_errors: dict[str, str]  # destination -> its latest error
    quarantine_by_reason: dict[str, int]
    workers: list[tuple[str, dt.datetime | None]]  # lease owner, last heartbeat


def operations(session: Session, now: dt.datetime, limit: int = RECENT) -> Operations:
    """The site's operations figures at `now` (studies recorded by any way in: `process`,
    the queue's workers, a campaign)."""
    from cxrbatch.db import deliveries, jobs

    this_hour = now.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    first_hour = this_hour - dt.timedelta(hours=23)
    # One scan of the last 24 hours (ix_outcomes_created_at) gives the three throughput
    # figures: the clock hours start within it (first_hour >= now - 24 h).
    day_start = now - dt.timedelta(hours=24)
    recorded = session.scalars(
        select(models.Outcome.created_at).where(models.Outcome.created_at >= day_start)
    )
    counts = [0] * 24
    day = last_hour = 0
    for at in recorded:
        stamp = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
        day += 1
        index = int((stamp - first_hour).total_seconds() // 3600)
        if 0 <= index < 24:
            counts[index] += 1
        last_hour += stamp >= now - dt.timedelta(hours=1)
    per_hour = [
        {"hour": (first_hour + dt.timedelta(hours=i)).strftime("%H:00"), "studies": n}
        for i, n in enumerate(counts)
    ]
    failures = session.scalars(
        select(models.Outcome)
        .where(models.Outcome.is_current, models.Outcome.status == OutcomeStatus.FAILED)
        .options(selectinload(models.Outcome.study))
        .order_by(models.Outcome.created_at.desc(), models.Outcome.id.desc())
        .limit(limit)
    )
    dead = session.scalars(
        select(models.Job)
        .where(models.Job.status == JobStatus.DEAD)
        .order_by(models.Job.updated_at.desc(), models.Job.id.desc())
        .limit(limit)
    )
    undelivered = session.scalars(
        select(models.Delivery)
        .where(models.Delivery.status.in_((DeliveryStatus.FAILED, DeliveryStatus.DEAD)))
        .order_by(models.Delivery.updated_at.desc(), models.Delivery.id.desc())
        .limit(limit)
    )
    last_errors = session.execute(
        select(models.Delivery.destination, models.Delivery.last_error)
        .where(models.Delivery.last_error.is_not(None))
        .order_by(models.Delivery.updated_at)
    ).all()
    quarantine = session.execute(
        select(models.RejectedFile.reason, func.count())
        .group_by(models.RejectedFile.reason)
        .order_by(func.count().desc())
        .limit(30)
    ).all()
    workers = session.execute(
        select(models.Job.lease_owner, func.max(models.Job.heartbeat_at))
        .where(
            models.Job.status == JobStatus.RUNNING,
            models.Job.lease_expires_at.is_not(None),
            models.Job.lease_expires_at > now,
        )
        .group_by(models.Job.lease_owner)
    ).all()
    return Operations(
        jobs=jobs.counts(session),
        finished_last_hour=last_hour,
        finished_last_24h=day,
        finished_per_hour=per_hour,
        failures=list(failures),
        dead_jobs=list(dead),
        deliveries=deliveries.counts(session),
        undelivered=list(undelivered),
        delivery_last_errors={str(d): str(e) for d, e in last_errors},
        quarantine_by_reason={str(r): int(n) for r, n in quarantine},
        workers=[(str(owner), beat) for owner, beat in workers],
    )


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

"""The only code that reads and writes rows of the results database."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session, selectinload

from cxrbatch.db import models
from cxrbatch.domain import (
    FINDING_LABELS,
    IMAGE_OUTPUTS,
    ImageResult,
    InstanceHeader,
    JobStatus,
    OutcomeStatus,
    RejectedFile,
    StudyResult,
    Triage,
)
from cxrbatch.errors import CxrBatchError
from cxrbatch.paths import StorageRoots, store_path


def current_outcome(session: Session, study_instance_uid: str) -> models.Outcome | None:
    return session.scalar(
        select(models.Outcome)
        .join(models.Study)
        .where(models.Study.study_instance_uid == study_instance_uid, models.Outcome.is_current)
    )


def _study(session: Session, study_instance_uid: str) -> models.Study:
    study = session.scalar(
        select(models.Study).where(models.Study.study_instance_uid == study_instance_uid)
    )
    if study is None:
        study = models.Study(study_instance_uid=study_instance_uid)
        session.add(study)
        session.flush()
    study.updated_at = models.utcnow()
    return study


def _set_identity(study: models.Study, result: StudyResult) -> None:
    """The study's accession number, patient, date and modality from its headers (the
    processed images' first, then the rest); values cut to the column widths."""
    headers = [i.instance for i in result.images]
    headers += [s.instance for s in result.skipped] + [f.instance for f in result.failures]
    if not headers:
        return

    def first(name: str, width: int) -> str | None:
        value = next((getattr(h, name) for h in headers if getattr(h, name)), None)
        return value[:width] if value else None

    study.accession_number = first("accession_number", 64)
    study.patient_id = first("patient_id", 64)
    study.patient_name = first("patient_name", 200)
    study.study_date = next((h.study_date for h in headers if h.study_date), None)
    study.modality = first("modality", 16)


def _unprocessed_row(header: InstanceHeader, status: OutcomeStatus, reason: str) -> models.Image:
    return models.Image(
        sop_instance_uid=header.sop_instance_uid,
        series_instance_uid=header.series_instance_uid,
        sop_class_uid=header.sop_class_uid,
        modality=header.modality,
        view_position=header.view_position,
        status=status.value,
        reason=reason,
    )


def _image_reason(item: ImageResult) -> str | None:
    reasons = [item.qc_reason] if item.qc_reason else []
    if item.instance.view_position is None:
        reasons.append("view position unknown")
    return "; ".join(reasons) or None


# The model roles of findings rows: the live classifier and screening bundles, and the
# candidates in their shadow.
ROLES = ("classifier", "screening", "shadow", "shadow-screening")


def _image_rows(result: StudyResult, roots: StorageRoots | None) -> list[models.Image]:
    rows: list[models.Image] = []
    seg_files = result.outputs.seg_files if result.outputs else {}
    for item in result.images:
        header = item.instance
        answers = (item.findings, item.screening, item.shadow, item.shadow_screening)
        findings = [
            models.Finding(
                role=role,
                label=label,
                probability=p,
                threshold=f.thresholds.get(label),
                positive=f.calls.get(label),
            )
            for role, f in zip(ROLES, answers, strict=True)
            if f is not None
            for label, p in f.probabilities.items()
        ]
        screening = item.screening
        rows.append(
            models.Image(
                sop_instance_uid=header.sop_instance_uid,
                series_instance_uid=header.series_instance_uid,
                sop_class_uid=header.sop_class_uid,
                modality=header.modality,
                view_position=header.view_position,
                status=OutcomeStatus.PROCESSED.value,
                reason=_image_reason(item),
                side_source=item.image.side_source,
                right_lung_fraction=item.segmentation.area_fraction("right"),
                left_lung_fraction=item.segmentation.area_fraction("left"),
                no_finding_score=item.findings.no_finding_score if item.findings else None,
                screening_no_finding_score=screening.no_finding_score if screening else None,
                triage=item.triage.value if item.triage else None,
                seg_path=store_path(seg_files[header.sop_instance_uid], roots)
                if header.sop_instance_uid in seg_files
                else None,
                source_path=store_path(header.path, roots),
                findings=findings,
            )
        )
    rows.extend(_unprocessed_row(s.instance, s.status, s.reason) for s in result.skipped)
    rows.extend(
        _unprocessed_row(f.instance, OutcomeStatus.FAILED, f.reason) for f in result.failures
    )
    return rows


def outcome_document(result: StudyResult, roots: StorageRoots | None = None) -> dict[str, Any]:
    """The `outcomes.outputs` document: every output file, as the database keeps paths."""
    outputs: dict[str, Any] = {}
    if result.outputs:
        made = result.outputs

        def stored(path: Path | None) -> str | None:
            return store_path(path, roots) if path else None

        outputs = {
            "sr": stored(made.sr_file),
            "json": stored(made.json_file),
        }
        if made.withdrawal is not None:
            outputs["rejection"] = stored(made.withdrawal.file)
        groups = (
            made.seg_files,
            made.key_image_files,
            made.presentation_state_files,
            made.finding_map_files,
        )
        for key, files in zip(IMAGE_OUTPUTS, groups, strict=True):
            outputs[key] = {k: store_path(v, roots) for k, v in files.items()}
    return outputs


def record_study(
    session: Session, result: StudyResult, roots: StorageRoots | None = None
) -> models.Outcome:
    """Record a study's outcome; the previous current outcome (if any) is superseded.
    Output paths are kept relative to `roots` when given (`paths.StorageRoots`).

    The caller commits. Re-recording the same input fingerprint replaces the current
    outcome in place instead of adding a row.
    """
    study = _study(session, result.study_instance_uid)
    _set_identity(study, result)
    previous = session.scalar(
        select(models.Outcome).where(models.Outcome.study_id == study.id, models.Outcome.is_current)
    )
    if previous is not None and previous.input_fingerprint == result.input_fingerprint:
        session.delete(previous)
        session.flush()
    elif previous is not None:
        session.execute(
            update(models.Outcome)
            .where(models.Outcome.id == previous.id)
            .values(is_current=False, superseded_at=models.utcnow())
        )
        session.flush()
    screened = [i.screening for i in result.images if i.screening is not None]
    outcome = models.Outcome(
        study_id=study.id,
        is_current=True,
        status=result.status.value,
        reason=result.reason,
        triage=result.triage.value if result.triage else None,
        no_finding_score=result.no_finding_score,
        screening_no_finding_score=min((s.no_finding_score for s in screened), default=None),
        segmentation_only=result.segmentation_only,
        # Only where a model scored something: an ineligible or failed study (a CT, a
        # file that would not decode) carries no synthetic score.
        synthetic_model=bool(result.images)
        and any(m.synthetic_training_data for m in result.models),
        input_fingerprint=result.input_fingerprint,
        models=[m.as_dict() for m in result.models],
        shadow=result.shadow,
        outputs=outcome_document(result, roots),
        timings={k: round(v, 4) for k, v in result.timings.items()},
        processed_by=result.processed_by,
        images=_image_rows(result, roots),
    )
    session.add(outcome)
    session.flush()
    return outcome


def record_rejected(
    session: Session,
    rejected: RejectedFile,
    quarantine_path: Path | None,
    roots: StorageRoots | None = None,
) -> None:
    """Record a rejected file (its original path stays absolute; the quarantine copy's is
    kept relative to `roots` when given)."""
    path = str(rejected.path)
    sha = rejected.sha256 or ""
    row = session.scalar(
        select(models.RejectedFile).where(
            models.RejectedFile.path == path, models.RejectedFile.sha256 == sha
        )
    )
    if row is None:
        session.add(
            models.RejectedFile(
                path=path,
                sha256=sha,
                reason=rejected.reason,
                study_instance_uid=(rejected.study_instance_uid or "")[:64] or None,
                sop_instance_uid=(rejected.sop_instance_uid or "")[:64] or None,
                quarantine_path=store_path(quarantine_path, roots) if quarantine_path else None,
            )
        )
    else:
        row.reason = rejected.reason
        row.last_seen_at = models.utcnow()
        if quarantine_path:
            row.quarantine_path = store_path(quarantine_path, roots)


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
    order = {label: rank for rank, label in enumerate(FINDING_LABELS)}
    return dict(sorted(best.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def calls(outcome: models.Outcome, role: str = "classifier") -> dict[str, str]:
    """Each label's study-level call for one model role: positive when any image's
    probability reached the bundle's threshold; labels without a threshold are left out."""
    positive: dict[str, bool] = {}
    for image in outcome.images:
        for finding in image.findings:
            if finding.role == role and finding.positive is not None:
                positive[finding.label] = positive.get(finding.label, False) or finding.positive
    order = {label: rank for rank, label in enumerate(FINDING_LABELS)}
    ordered = sorted(positive.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    return {label: "positive" if p else "negative" for label, p in ordered}


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
    return ", ".join(names) or None


def outcome_row(outcome: models.Outcome) -> dict[str, Any]:
    """One current outcome as the flat record `cxrbatch results` prints."""
    study = outcome.study
    return {
        "study_number": study.id,
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number,
        "patient_id": study.patient_id,
        "study_date": study.study_date.isoformat() if study.study_date else None,
        "modality": study.modality,
        "status": outcome.status,
        "triage": outcome.triage,
        "no_finding_score": outcome.no_finding_score,
        "screening_no_finding_score": outcome.screening_no_finding_score,
        "segmentation_only": outcome.segmentation_only,
        "synthetic_model": outcome.synthetic_model,
        "reason": outcome.reason,
        "created_at": outcome.created_at.isoformat() if outcome.created_at else None,
        "processed_by": outcome.processed_by,
        "models": deciding_models(outcome),
        "probabilities": probabilities(outcome),
        "calls": calls(outcome),
    }


def recent_failures(session: Session, limit: int = 10) -> list[models.Outcome]:
    return list(
        session.scalars(
            select(models.Outcome)
            .where(models.Outcome.is_current, models.Outcome.status == OutcomeStatus.FAILED)
            .options(selectinload(models.Outcome.study))
            .order_by(models.Outcome.created_at.desc())
            .limit(limit)
        )
    )


def finished_since(session: Session, since: dt.datetime) -> int:
    """Studies recorded since `since` (outcomes, by any way in: `process`, the queue's
    workers, a campaign): the throughput (ix_outcomes_created_at)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(models.Outcome)
            .where(models.Outcome.created_at >= since)
        )
        or 0
    )


def dead_jobs(session: Session) -> list[models.Job]:
    return list(
        session.scalars(
            select(models.Job)
            .where(models.Job.status == JobStatus.DEAD)
            .order_by(models.Job.updated_at)
        )
    )

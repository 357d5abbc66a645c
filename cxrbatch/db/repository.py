"""The record step's rows: studies, outcomes, images, findings and rejected files, written
in the caller's transaction (what people read about them is `cxrbatch.db.reads`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cxrbatch.db import models
from cxrbatch.domain import (
    IMAGE_OUTPUTS,
    ImageResult,
    InstanceHeader,
    OutcomeStatus,
    RejectedFile,
    StudyResult,
)
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

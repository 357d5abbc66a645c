"""Reads for the model lifecycle (calibrate, compare, reprocess): current outcomes as
per-role study scores, and the studies a new model version has not processed yet."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, selectinload

from cxrbatch.db import models
from cxrbatch.domain import JobStatus, OutcomeStatus


@dataclass(frozen=True)
class StudyScores:
    """One study's current outcome as each model role scored it: per label the highest
    probability over its images, and the lowest No Finding score (1 - max p per image)."""

    study_instance_uid: str
    accession_number: str | None
    created_at: dt.datetime
    triage: str | None
    models: list[dict[str, Any]]
    shadow: dict[str, Any] | None
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    no_finding: dict[str, float] = field(default_factory=dict)

    def role_of(self, sha256: str, has_screening: bool) -> str | None:
        """The role the model with these weights had in this outcome (live or shadow);
        outcomes recorded before roles were kept: screening when the bundle has a
        screening threshold and screening scores exist, else classifier."""
        shadow = (self.shadow or {}).get("models", [])
        for ref in [*self.models, *shadow]:
            if isinstance(ref, dict) and ref.get("sha256") == sha256:
                role = ref.get("role")
                if isinstance(role, str):
                    return role
                if has_screening and "screening" in self.no_finding:
                    return "screening"
                return "classifier"
        return None


def _scores(outcome: models.Outcome) -> StudyScores:
    probabilities: dict[str, dict[str, float]] = {}
    per_image: dict[tuple[str, int], float] = {}
    for image in outcome.images:
        for finding in image.findings:
            labels = probabilities.setdefault(finding.role, {})
            labels[finding.label] = max(labels.get(finding.label, 0.0), finding.probability)
            key = (finding.role, image.id)
            per_image[key] = max(per_image.get(key, 0.0), finding.probability)
    no_finding: dict[str, float] = {}
    for (role, _), top in per_image.items():
        no_finding[role] = min(no_finding.get(role, 1.0), 1.0 - top)
    return StudyScores(
        study_instance_uid=outcome.study.study_instance_uid,
        accession_number=outcome.study.accession_number,
        created_at=outcome.created_at,
        triage=outcome.triage,
        models=list(outcome.models or []),
        shadow=outcome.shadow,
        probabilities=probabilities,
        no_finding=no_finding,
    )


def _current_processed() -> Any:
    return (
        select(models.Outcome)
        .join(models.Study)
        .where(models.Outcome.is_current, models.Outcome.status == OutcomeStatus.PROCESSED)
        .options(
            selectinload(models.Outcome.study),
            selectinload(models.Outcome.images).selectinload(models.Image.findings),
        )
        .order_by(models.Outcome.created_at, models.Outcome.id)
    )


def scores_for(
    session: Session, study_uids: Collection[str], accession_numbers: Collection[str]
) -> list[StudyScores]:
    """Current processed outcomes of the studies named by UID or accession number."""
    statement = _current_processed().where(
        or_(
            models.Study.study_instance_uid.in_(list(study_uids)),
            models.Study.accession_number.in_(list(accession_numbers)),
        )
    )
    return [_scores(o) for o in session.scalars(statement)]


def scores_since(
    session: Session, since: dt.datetime | None, shadowed_only: bool = False
) -> list[StudyScores]:
    """Current processed outcomes recorded at or after `since` (all when None)."""
    statement = _current_processed()
    if since is not None:
        statement = statement.where(models.Outcome.created_at >= since)
    if shadowed_only:
        statement = statement.where(models.Outcome.shadow.is_not(None))
    return [_scores(o) for o in session.scalars(statement)]


def backfill_candidates(
    session: Session,
    since: dt.datetime | None,
    until: dt.datetime | None,
    wanted_models: Collection[tuple[str, str]],
) -> list[str]:
    """Studies with received instances (received in [since, until)) whose current outcome
    was not made with every model in `wanted_models` ((weights SHA-256, version) pairs: a
    calibrated version shares its weights with the one before): what a backfill re-queues.
    Studies
    already re-run are not candidates again, so a backfill interrupted at any point
    resumes where it stopped."""
    received = select(models.Instance.study_instance_uid).where(models.Instance.purged_at.is_(None))
    if since is not None:
        received = received.where(models.Instance.received_at >= since)
    if until is not None:
        received = received.where(models.Instance.received_at < until)
    uids = sorted(set(session.scalars(received)))
    wanted = set(wanted_models)
    current = {
        o.study.study_instance_uid: {
            (m.get("sha256"), m.get("version")) for m in o.models or [] if isinstance(m, dict)
        }
        for o in session.scalars(
            select(models.Outcome)
            .join(models.Study)
            .where(models.Outcome.is_current, models.Study.study_instance_uid.in_(uids))
            .options(selectinload(models.Outcome.study))
        )
    }
    return [uid for uid in uids if not wanted <= current.get(uid, set())]


def queued_jobs(session: Session) -> int:
    """Jobs waiting or running: what a throttled backfill keeps below its limit."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(models.Job)
            .where(models.Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        )
        or 0
    )

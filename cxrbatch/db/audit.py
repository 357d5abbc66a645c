"""The web app's audit trail: who viewed which study, who exported what (`audit_events`)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrbatch.db import models


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

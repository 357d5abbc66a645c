"""The rows the retention policy reads and updates (cxrbatch/retention.py deletes files).

What may go, each only once it is older than its setting (`[retention]`):

- spooled instances of studies whose job is finished (done or ineligible) — never those of
  studies queued, running, failed (to be retried) or dead (an operator may retry them);
- quarantine copies whose every rejected-file row was last seen before the cutoff;
- output files referenced only by superseded outcomes.

Nothing a current outcome or an unsent delivery (pending, sending, failed, dead) references
is ever offered: `needed_paths` is subtracted from every candidate list.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from cxrbatch.db.models import Delivery, Image, Instance, Job, Outcome, RejectedFile, utcnow
from cxrbatch.domain import IMAGE_OUTPUTS, DeliveryStatus, JobStatus

UNSENT = (
    DeliveryStatus.PENDING,
    DeliveryStatus.SENDING,
    DeliveryStatus.FAILED,
    DeliveryStatus.DEAD,
)
# Studies whose spooled instances are no longer needed to run them again.
SPOOL_RELEASED = (JobStatus.DONE, JobStatus.INELIGIBLE)


def _document_paths(outputs: dict[str, Any] | None) -> set[str]:
    if not outputs:
        return set()
    paths = {str(p) for key in IMAGE_OUTPUTS for p in (outputs.get(key) or {}).values()}
    paths |= {str(outputs[key]) for key in ("sr", "json", "rejection") if outputs.get(key)}
    return paths


def needed_paths(session: Session) -> set[str]:
    """Every stored path a current outcome or an unsent delivery references."""
    needed: set[str] = set()
    for outputs in session.scalars(select(Outcome.outputs).where(Outcome.is_current)):
        needed |= _document_paths(outputs)
    needed |= {
        p
        for p in session.scalars(
            select(Image.seg_path)
            .join(Outcome, Image.outcome_id == Outcome.id)
            .where(Outcome.is_current, Image.seg_path.is_not(None))
        )
        if p
    }
    for files in session.scalars(select(Delivery.files).where(Delivery.status.in_(UNSENT))):
        needed |= {str(f) for f in files or []}
    return needed


def superseded_output_paths(session: Session, before: dt.datetime) -> set[str]:
    """Stored paths of outcomes superseded before `before`, less those still needed."""
    paths: set[str] = set()
    for outputs in session.scalars(
        select(Outcome.outputs).where(
            Outcome.is_current.is_(False),
            Outcome.superseded_at.is_not(None),
            Outcome.superseded_at < before,
        )
    ):
        paths |= _document_paths(outputs)
    return paths - needed_paths(session)


@dataclass(frozen=True)
class SpooledInstance:
    instance_id: int
    path: str  # as stored
    size: int


def released_spool(session: Session, before: dt.datetime) -> list[SpooledInstance]:
    """Spooled instances (not yet purged) of studies whose job finished (done or
    ineligible) before `before`."""
    rows = session.execute(
        select(Instance.id, Instance.path, Instance.size)
        .join(Job, Job.study_instance_uid == Instance.study_instance_uid)
        .where(
            Instance.purged_at.is_(None),
            Job.status.in_(SPOOL_RELEASED),
            Job.finished_at.is_not(None),
            Job.finished_at < before,
        )
        .order_by(Instance.id)
    )
    return [SpooledInstance(i, p, s) for i, p, s in rows]


def mark_purged(session: Session, instance_ids: list[int]) -> None:
    """The files of these instances were removed (the rows stay: duplicates are still
    recognised by their SHA-256). The caller commits."""
    if instance_ids:
        session.execute(
            update(Instance).where(Instance.id.in_(instance_ids)).values(purged_at=utcnow())
        )


def expired_quarantine(session: Session, before: dt.datetime) -> list[str]:
    """Stored paths of quarantine copies whose every row was last seen before `before`."""
    return list(
        session.scalars(
            select(RejectedFile.quarantine_path)
            .where(RejectedFile.quarantine_path.is_not(None))
            .group_by(RejectedFile.quarantine_path)
            .having(func.max(RejectedFile.last_seen_at) < before)
        )
    )


def forget_quarantine_copies(session: Session, stored: list[str]) -> None:
    """The copies are gone: their rows keep the reason and lose the copy's path."""
    if stored:
        session.execute(
            update(RejectedFile)
            .where(RejectedFile.quarantine_path.in_(stored))
            .values(quarantine_path=None)
        )

"""Deliveries in SQL: one row per (outcome, destination), kept until acknowledged.

Recording a processed outcome adds a `pending` delivery per configured destination in the
same transaction, so a study whose outcome is recorded is never forgotten by the sender
(a crash between processing and sending loses nothing). A sender claims a due delivery
with a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL, IMMEDIATE transactions on SQLite),
sends every file, and finishes it `sent`, or `failed` with a backoff, or `dead` after
`send.max_attempts`. A delivery whose sender vanished (lease expired) is claimed again.
A newer outcome of the same study supersedes deliveries not yet sent.

The leasing, retries and dead letters are `cxrbatch.db.leased`'s, shared with the jobs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from cxrbatch.config import Destination, SendSettings
from cxrbatch.db.leased import LeasedWork, RetryPolicy
from cxrbatch.db.models import Delivery, Outcome, utcnow
from cxrbatch.domain import (
    DICOM_IMAGE_OUTPUTS,
    DeliveryStatus,
    NotAccepted,
    OutcomeStatus,
    Withdrawal,
)
from cxrbatch.paths import StorageRoots, resolve_stored

UNSENT = (DeliveryStatus.PENDING, DeliveryStatus.FAILED, DeliveryStatus.DEAD)
DELIVERIES = LeasedWork(
    Delivery,
    due=(DeliveryStatus.PENDING, DeliveryStatus.FAILED),
    leased=DeliveryStatus.SENDING,
    failed=DeliveryStatus.FAILED,
    dead=DeliveryStatus.DEAD,
    revived=DeliveryStatus.PENDING,
    claim_expired=True,  # a sender that vanished: its delivery is claimed again
)


@dataclass(frozen=True)
class DeliveryClaim:
    delivery_id: int
    study_instance_uid: str
    destination: str
    files: tuple[Path, ...]
    attempts: int
    owner: str
    outcome_id: int | None = None


# A destination's `objects` names -> the keys of an outcome's outputs document.
OBJECT_KINDS = {
    "seg": "seg",
    "key_image": "key_images",
    "presentation_state": "presentation_states",
    "sr": "sr",
}


def stored_files(outputs: dict[str, Any], kinds: Sequence[str] | None = None) -> list[str]:
    """The DICOM objects of an outcome's `outputs` document, as stored: SEGs, key images,
    presentation states, the SR (only those of `kinds`, a destination's `objects`)."""
    keys = {OBJECT_KINDS[k] for k in kinds} if kinds is not None else None
    files = [
        str(p)
        for key in DICOM_IMAGE_OUTPUTS
        if keys is None or key in keys
        for p in (outputs.get(key) or {}).values()
    ]
    if outputs.get("sr") and (keys is None or "sr" in keys):
        files.append(str(outputs["sr"]))
    return files


def outcome_files(outputs: dict[str, Any], roots: StorageRoots | None = None) -> list[Path]:
    """The DICOM objects of an outcome's `outputs` document, on this host."""
    return [resolve_stored(p, roots) for p in stored_files(outputs)]


def enqueue(
    session: Session,
    outcome: Outcome,
    destinations: Sequence[Destination],
    objects: Sequence[dict[str, str]] = (),
    withdrawal: Withdrawal | None = None,
) -> int:
    """Deliveries of a just-recorded outcome (in the caller's transaction); returns how many.

    Only processed outcomes are sent: their DICOM outputs (`objects`: their identities) to
    DICOM destinations, their report to report destinations. Unsent deliveries of the
    study's earlier outcomes are superseded: the newer results replace them. A destination
    that received objects now withdrawn gets the `withdrawal` note first, in the same
    delivery (one association or request, in order); the outputs document holds the
    note's stored path (`rejection`).
    """
    outputs = outcome.outputs or {}
    files = stored_files(outputs)
    note_file = outputs.get("rejection")
    if withdrawal is not None and not note_file:
        raise ValueError("a withdrawal whose rejection note is not among the outcome's outputs")
    if outcome.status != OutcomeStatus.PROCESSED or not destinations:
        return 0
    # `objects` lists the identities of `files`, in their order.
    identity = dict(zip(files, objects, strict=True)) if objects else {}
    chosen = {d.name: stored_files(outputs, d.objects) for d in destinations}
    # Report transports (HL7, FHIR) send what the outcome says, the others their files.
    destinations = [d for d in destinations if d.sends_report or chosen[d.name]]
    study_uid = outcome.study.study_instance_uid
    now = utcnow()
    session.execute(
        update(Delivery)
        .where(Delivery.study_instance_uid == study_uid, Delivery.status.in_(UNSENT))
        .values(status=DeliveryStatus.SUPERSEDED, updated_at=now)
    )
    for destination in destinations:
        sent = [] if destination.sends_report else chosen[destination.name]
        note = withdrawal if withdrawal and destination.name in withdrawal.destinations else None
        session.add(
            Delivery(
                study_instance_uid=study_uid,
                outcome_id=outcome.id,
                destination=destination.name,
                transport=destination.transport,
                status=DeliveryStatus.PENDING,
                attempts=0,
                run_after=now,
                files=[note_file, *sent] if note else sent,
                objects=None
                if destination.sends_report
                else [identity[f] for f in sent if f in identity],
                withdraws=list(note.objects) if note else None,
                created_at=now,
                updated_at=now,
            )
        )
    session.flush()
    return len(destinations)


def delivered_objects(session: Session, study_instance_uid: str) -> dict[str, list[dict[str, str]]]:
    """Per DICOM destination, the study's objects it acknowledged and that no rejection
    note it acknowledged has withdrawn yet: what a new outcome must withdraw there."""
    rows = session.scalars(
        select(Delivery)
        .where(
            Delivery.study_instance_uid == study_instance_uid,
            Delivery.status == DeliveryStatus.SENT,
        )
        .order_by(Delivery.id)
    )
    held: dict[str, dict[str, dict[str, str]]] = {}
    for row in rows:
        at = held.setdefault(row.destination, {})
        for uid in row.withdraws or ():
            at.pop(str(uid), None)
        for item in row.objects or ():
            at[str(item["sop_instance"])] = dict(item)
    return {name: list(objects.values()) for name, objects in held.items() if objects}


def claim(
    sessions: sessionmaker[Session],
    owner: str,
    lease_seconds: float,
    due_by: dt.datetime | None = None,
    roots: StorageRoots | None = None,
) -> DeliveryClaim | None:
    """The next delivery due by `due_by` (default now): pending, failed after its backoff,
    or a lost sender's; None when there is none. A sender pass passes its start time, so
    that it tries each delivery at most once."""
    with sessions.begin() as session:
        row = DELIVERIES.claim(session, owner, lease_seconds, due_by)
        if row is None:
            return None
        return DeliveryClaim(
            row.id,
            row.study_instance_uid,
            row.destination,
            tuple(resolve_stored(p, roots) for p in row.files),
            row.attempts,
            owner,
            row.outcome_id,
        )


def finish(
    sessions: sessionmaker[Session],
    claimed: DeliveryClaim,
    policy: RetryPolicy,
    error: str | None = None,
    not_accepted: Sequence[NotAccepted] = (),
) -> DeliveryStatus | None:
    """Sent (no error), failed with a backoff, or dead; None when the lease was lost.
    Objects the destination does not accept are left out of what the delivery records as
    delivered (no rejection note will withdraw them there), and named in last_error."""
    with sessions.begin() as session:
        row = DELIVERIES.held_row(session, claimed.delivery_id, claimed.owner)
        if row is None:
            return None
        done = DeliveryStatus.SENT if error is None else None
        status = DeliveryStatus(DELIVERIES.close(row, done, policy, error))
        if status is DeliveryStatus.SENT:
            row.sent_at = row.updated_at
            if not_accepted:
                skipped = {n.sop_instance_uid for n in not_accepted}
                row.objects = [o for o in row.objects or [] if o["sop_instance"] not in skipped]
                row.last_error = "not accepted by the destination: " + "; ".join(
                    sorted({n.reason for n in not_accepted})
                )
        return status


def retry_policy(settings: SendSettings) -> RetryPolicy:
    return RetryPolicy.from_settings(settings)


def retry_dead(sessions: sessionmaker[Session], destination: str | None = None) -> int:
    """Dead deliveries pending again with fresh attempts (all, or one destination's)."""
    where = [Delivery.destination == destination] if destination else []
    return DELIVERIES.revive(sessions, *where)


def counts(session: Session) -> dict[str, dict[str, int]]:
    """Deliveries per destination and status."""
    return DELIVERIES.counts(session, DeliveryStatus, by=Delivery.destination)

"""The `retrievals` table: series a running `cxrbatch pull` asked a PACS to send by C-MOVE.

The C-MOVE's sub-operations arrive as C-STOREs at a receiver that may be another process
(the running `watch --listen`). Each carries the Move Originator AE Title of the pull that
asked; the receiver checks the instance against that pull's open retrievals here, so a
PACS that sends another study than the one asked for gets it quarantined, not processed.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from cxrbatch.db.models import Retrieval, utcnow


def open_retrieval(
    session: Session, originator: str, source: str, study: str, series: str, seconds: float
) -> int:
    """Open one series' retrieval (by the pull calling as `originator`, from the PACS
    `source`) for `seconds` at most; its id."""
    now = utcnow()
    row = Retrieval(
        originator=originator.strip(),
        source_ae_title=source.strip(),
        study_instance_uid=study,
        series_instance_uid=series,
        opened_at=now,
        expires_at=now + dt.timedelta(seconds=seconds),
        refused=0,
    )
    session.add(row)
    session.flush()
    return row.id


def close_retrieval(session: Session, retrieval_id: int) -> int:
    """Close it; the number of instances refused while it was open."""
    refused = session.scalar(select(Retrieval.refused).where(Retrieval.id == retrieval_id))
    session.execute(delete(Retrieval).where(Retrieval.id == retrieval_id))
    return int(refused or 0)


def verdict(
    session: Session,
    sender: str,
    originator: str | None,
    study: str,
    series: str,
    *,
    strict: bool,
) -> str | None:
    """Why an instance of (`study`, `series`) is refused, or None when it is taken.

    `sender` is the calling AE title of the association that stores it, `originator` the
    C-STORE's Move Originator AE Title. Not strict (a shared receiver): only a C-STORE of a
    C-MOVE (with a Move Originator) from a PACS, or for a pull, with an open retrieval is
    checked, against those retrievals; a plain push is taken. Strict (the receiver a pull
    runs for itself): every C-STORE must belong to an open retrieval. A refusal is counted
    on the retrievals it was checked against."""
    if not originator and not strict:
        return None  # a plain push, not a sub-operation of a C-MOVE
    query = select(Retrieval).where(Retrieval.expires_at > utcnow())
    if not strict:
        query = query.where(
            or_(
                Retrieval.source_ae_title == sender.strip(),
                Retrieval.originator == (originator or "").strip(),
            )
        )
    rows = list(session.scalars(query))
    if not rows and not strict:
        return None  # a C-MOVE that no pull of this site started
    if any(r.study_instance_uid == study and r.series_instance_uid == series for r in rows):
        return None
    asked = "; ".join(f"{r.study_instance_uid} / {r.series_instance_uid}" for r in rows[:3])
    if rows:
        session.execute(
            update(Retrieval)
            .where(Retrieval.id.in_([r.id for r in rows]))
            .values(refused=Retrieval.refused + 1)
        )
    return (
        f"not requested: study {study} series {series} arrived from {sender or 'a peer'} "
        f"during a pull's retrieval of {asked or 'nothing'}"
    )

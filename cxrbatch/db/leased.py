"""One leased-work mechanism in SQL: claim, heartbeat, finish with retry, release,
recover, revive the dead, count. Jobs (`cxrbatch.db.jobs`) and deliveries
(`cxrbatch.db.deliveries`) are thin users of it; later kinds of work reuse it.

A kind of work is a table with the columns `id`, `status`, `attempts`, `run_after`,
`lease_owner`, `lease_expires_at`, `last_error` and `updated_at`, and a `LeasedWork`
naming its status values. Claimers take rows with `SELECT ... FOR UPDATE SKIP LOCKED` on
PostgreSQL, so any number of workers on any number of hosts share one table; on SQLite
the same statement runs inside an IMMEDIATE transaction (`db.session.make_engine`),
which serialises claimers on one host. A claim takes a lease; the holder's heartbeats
renew it; a lease that expires (holder killed, host lost) is recovered by anyone.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from cxrbatch.db.models import utcnow

# How `recover` begins a row's last_error: its holder vanished during the attempt.
WORKER_LOST = "worker lost"


class RetrySettings(Protocol):
    max_attempts: int
    backoff_base_seconds: float
    backoff_max_seconds: float


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        """From any settings section with the three fields ([queue], [send])."""
        return cls(
            settings.max_attempts, settings.backoff_base_seconds, settings.backoff_max_seconds
        )

    def backoff(self, attempts: int) -> dt.timedelta:
        """Delay before the next attempt after `attempts` failed ones: base * 2^(n-1)."""
        seconds = self.backoff_base_seconds * 2 ** max(0, attempts - 1)
        return dt.timedelta(seconds=min(seconds, self.backoff_max_seconds))


def process_space() -> str:
    """Where a process id means this process: the kernel's boot and the PID namespace.
    Containers started with the host's network share its hostname but not its process
    ids, so a hostname and a pid alone name another container's process as well."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return "unknown"
    return f"{boot}-{namespace}"


def new_owner() -> str:
    """A lease owner name: host, process id, a nonce (pids are reused) and the process
    space the pid belongs to (`process_space`)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{process_space()}"


def owner_is_dead_local_process(owner: str) -> bool:
    """True only when `owner` names a process of this host, boot and PID namespace that
    no longer runs: its lease can be recovered at once. Anything else (another host, a
    container sharing the hostname, an owner name without its process space) waits for
    the lease to expire."""
    host, pid_text, _, space = [*owner.split(":"), "", "", "", ""][:4]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    if space == "unknown" or space != process_space():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def db_now(session: Session) -> dt.datetime:
    """The time every lease is measured by: the database server's clock on PostgreSQL
    (`statement_timestamp()`), so that a host whose clock runs ahead cannot see live leases
    as expired, nor one running behind keep a dead one; on SQLite, which one host uses,
    that host's clock."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        value = session.scalar(select(func.statement_timestamp()))
        if value is not None:
            return as_utc(value)
    return utcnow()


def as_utc(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes (stored as UTC); PostgreSQL aware ones."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class LeasedWork:
    """A table of leased work and its status values (StrEnum members or strings)."""

    table: Any
    due: tuple[str, ...]  # claimable once run_after has passed
    leased: str  # held by a lease
    failed: str  # retried at run_after
    dead: str  # out of attempts; kept until revived
    revived: str  # what `revive` sets dead rows to
    # Also claim leased rows whose lease expired (deliveries); jobs use `recover` instead.
    claim_expired: bool = False

    def claim(
        self,
        session: Session,
        owner: str,
        lease_seconds: float,
        due_by: dt.datetime | None = None,
        order_by: Iterable[Any] = (),
    ) -> Any | None:
        """Take the next due row in the caller's transaction, or None: status leased,
        one more attempt, a lease of `lease_seconds`."""
        t = self.table
        now = db_now(session)
        due: ColumnElement[bool] = and_(t.status.in_(self.due), t.run_after <= (due_by or now))
        if self.claim_expired:
            due = or_(due, and_(t.status == self.leased, t.lease_expires_at < now))
        row = session.scalar(
            select(t)
            .where(due)
            .order_by(*(order_by or (t.run_after, t.id)))
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if row is None:
            return None
        row.status = self.leased
        row.attempts += 1
        row.lease_owner = owner
        row.lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
        row.updated_at = now
        return row

    def _held(self, row_id: int, owner: str) -> ColumnElement[bool]:
        t = self.table
        return and_(t.id == row_id, t.lease_owner == owner, t.status == self.leased)

    def renew(
        self, sessions: sessionmaker[Session], row_id: int, owner: str, lease_seconds: float
    ) -> bool:
        """Renew a lease; False when it was lost (recovered by someone else)."""
        with sessions.begin() as session:
            now = db_now(session)
            values: dict[str, Any] = {"lease_expires_at": now + dt.timedelta(seconds=lease_seconds)}
            if hasattr(self.table, "heartbeat_at"):
                values["heartbeat_at"] = now
            renewed = session.execute(
                update(self.table).where(self._held(row_id, owner)).values(**values)
            )
            return bool(renewed.rowcount)  # type: ignore[attr-defined]

    def held_row(
        self, session: Session, row_id: int, owner: str, attempt: int | None = None
    ) -> Any | None:
        """The row, locked to the end of the caller's transaction, if `owner` still holds
        its lease in attempt `attempt` (the fencing token: a lease lost and taken again
        by the same owner name is another attempt); None when it was lost."""
        row = session.scalar(select(self.table).where(self.table.id == row_id).with_for_update())
        if row is None or row.lease_owner != owner or row.status != self.leased:
            return None
        if attempt is not None and row.attempts != attempt:
            return None
        return row

    def close(
        self, row: Any, done: str | None, policy: RetryPolicy, error: str | None = None
    ) -> str:
        """End a held row's attempt: `done` (a final status), or None for a failure, which
        is retried after a backoff or `dead` after `policy.max_attempts`. Returns the
        status set (the caller may still change it, e.g. to re-queue)."""
        session = Session.object_session(row)
        now = db_now(session) if session is not None else utcnow()
        row.lease_owner = None
        row.lease_expires_at = None
        row.updated_at = now
        row.last_error = error
        if done is not None:
            status = done
        elif row.attempts >= policy.max_attempts:
            status = self.dead
        else:
            status = self.failed
            row.run_after = now + policy.backoff(row.attempts)
        row.status = status
        return status

    def release(self, sessions: sessionmaker[Session], row_id: int, owner: str, to: str) -> bool:
        """Give a held row back unfinished (shutdown): status `to`, the attempt uncounted."""
        t = self.table
        with sessions.begin() as session:
            now = db_now(session)
            released = session.execute(
                update(t)
                .where(self._held(row_id, owner))
                .values(
                    status=to,
                    attempts=t.attempts - 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    run_after=now,
                    updated_at=now,
                )
            )
            return bool(released.rowcount)  # type: ignore[attr-defined]

    def recover(
        self,
        sessions: sessionmaker[Session],
        policy: RetryPolicy,
        requeue: str,
        on_recovered: Callable[[Any, str], None] | None = None,
    ) -> int:
        """Leased rows whose holder vanished (lease expired, or a dead process on this
        host): each such attempt counts as failed; the row goes to `requeue` now, or
        `dead` after `policy.max_attempts`. Returns how many."""
        recovered = 0
        with sessions.begin() as session:
            now = db_now(session)
            leased = session.scalars(
                select(self.table)
                .where(self.table.status == self.leased)
                .with_for_update(skip_locked=True)
            ).all()
            for row in leased:
                expired = row.lease_expires_at is not None and as_utc(row.lease_expires_at) < now
                if not expired and not owner_is_dead_local_process(row.lease_owner or ""):
                    continue
                reason = f"{WORKER_LOST} during attempt {row.attempts} (lease of {row.lease_owner})"
                row.lease_owner = None
                row.lease_expires_at = None
                row.updated_at = now
                row.last_error = reason
                if row.attempts >= policy.max_attempts:
                    row.status = self.dead
                    if hasattr(row, "finished_at"):
                        row.finished_at = now
                else:
                    # Back at the front: its place in the queue is the time it was due
                    # (or, where new instances came in while it ran, their quiet period).
                    row.status = requeue
                    row.run_after = min(as_utc(row.run_after), now)
                recovered += 1
                if on_recovered is not None:
                    on_recovered(row, reason)
        return recovered

    def revive(self, sessions: sessionmaker[Session], *where: ColumnElement[bool]) -> int:
        """Dead rows (all, or those matching `where`) due again with fresh attempts."""
        t = self.table
        with sessions.begin() as session:
            now = db_now(session)
            values: dict[str, Any] = {
                "status": self.revived,
                "attempts": 0,
                "run_after": now,
                "updated_at": now,
            }
            if hasattr(t, "finished_at"):
                values["finished_at"] = None
            result = session.execute(
                update(t).where(t.status == self.dead, *where).values(**values)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def counts(
        self, session: Session, statuses: Iterable[str], by: Any | None = None
    ) -> dict[str, Any]:
        """Rows per status (every status listed, 0 included); per `by` column too."""
        names = [str(s) for s in statuses]
        t = self.table
        if by is None:
            rows = session.execute(select(t.status, func.count()).group_by(t.status)).all()
            found = {str(status): int(n) for status, n in rows}
            return {name: found.get(name, 0) for name in names}
        grouped = session.execute(select(by, t.status, func.count()).group_by(by, t.status)).all()
        per: dict[str, dict[str, int]] = {}
        for key, status, n in grouped:
            per.setdefault(str(key), dict.fromkeys(names, 0))[str(status)] = int(n)
        return per

"""The work queue in SQL: enqueue, claim, heartbeat, finish, retry, recover.

One job per study (`jobs` table, status values in `cxrbatch.domain.JobStatus`). Workers
claim with `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so any number of workers
on any number of hosts share one queue; on SQLite the same statement runs inside an
IMMEDIATE transaction (see `db.session.make_engine`), which serialises claimers on one
host. A claim takes a lease that the worker's heartbeats renew; a lease that expires
(worker killed, host lost) is recovered by anyone, and the job runs again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from cxrbatch.db.models import Job, utcnow
from cxrbatch.domain import JobStatus

if TYPE_CHECKING:
    from cxrbatch.config import QueueSettings

log = logging.getLogger(__name__)

CLAIMABLE = (JobStatus.QUEUED.value, JobStatus.FAILED.value)
FINISHED = (JobStatus.DONE.value, JobStatus.INELIGIBLE.value, JobStatus.DEAD.value)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0

    @classmethod
    def from_settings(cls, settings: QueueSettings) -> RetryPolicy:
        return cls(
            settings.max_attempts, settings.backoff_base_seconds, settings.backoff_max_seconds
        )

    def backoff(self, attempts: int) -> dt.timedelta:
        """Delay before the next attempt after `attempts` failed ones: base * 2^(n-1)."""
        seconds = self.backoff_base_seconds * 2 ** max(0, attempts - 1)
        return dt.timedelta(seconds=min(seconds, self.backoff_max_seconds))


@dataclass(frozen=True)
class Claim:
    """A job a worker holds: what it needs to process the study and to finish the job."""

    job_id: int
    study_instance_uid: str
    attempts: int
    generation: int
    owner: str


def new_owner() -> str:
    """A lease owner name: host, process id and a nonce (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead_local_process(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def enqueue_study(session: Session, study_instance_uid: str, stable_seconds: float) -> Job:
    """Note new input for a study: (re-)queue its job to run after the quiet period.

    A job of a finished study is queued again with fresh attempts (a late arrival); a
    running job keeps running and re-queues itself when it finishes (its generation is
    then older than the job's). The caller commits.
    """
    now = utcnow()
    run_after = now + dt.timedelta(seconds=stable_seconds)
    job = session.scalar(
        select(Job).where(Job.study_instance_uid == study_instance_uid).with_for_update()
    )
    if job is None:
        job = Job(
            study_instance_uid=study_instance_uid,
            status=JobStatus.QUEUED.value,
            attempts=0,
            run_after=run_after,
            generation=1,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        return job
    job.generation += 1
    job.run_after = run_after
    job.updated_at = now
    if job.status != JobStatus.RUNNING.value:
        if job.status in FINISHED:
            job.attempts = 0
        job.status = JobStatus.QUEUED.value
    return job


def claim(sessions: sessionmaker[Session], owner: str, lease_seconds: float) -> Claim | None:
    """Take the next due job, or None. Each job is given to exactly one claimer."""
    with sessions.begin() as session:
        now = utcnow()
        job = session.scalar(
            select(Job)
            .where(Job.status.in_(CLAIMABLE), Job.run_after <= now)
            .order_by(Job.run_after, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if job is None:
            return None
        job.status = JobStatus.RUNNING.value
        job.attempts += 1
        job.claimed_generation = job.generation
        job.lease_owner = owner
        job.lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
        job.heartbeat_at = now
        job.updated_at = now
        return Claim(job.id, job.study_instance_uid, job.attempts, job.generation, owner)


def heartbeat(sessions: sessionmaker[Session], claimed: Claim, lease_seconds: float) -> bool:
    """Renew the lease; False when it was lost (recovered by someone else)."""
    with sessions.begin() as session:
        now = utcnow()
        renewed = session.execute(
            update(Job)
            .where(
                Job.id == claimed.job_id,
                Job.lease_owner == claimed.owner,
                Job.status == JobStatus.RUNNING.value,
            )
            .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds), heartbeat_at=now)
        )
        return bool(renewed.rowcount)  # type: ignore[attr-defined]


def finish(
    session: Session,
    claimed: Claim,
    status: JobStatus,
    policy: RetryPolicy,
    *,
    error: str | None = None,
    outcome_id: int | None = None,
) -> JobStatus | None:
    """Close a claimed job in the caller's transaction (with the outcome it recorded).

    `status` is DONE, INELIGIBLE or FAILED. A failure is retried after a backoff, or kept
    as DEAD after `policy.max_attempts`. A job that received new instances while it ran is
    queued again. Returns the status set, or None when the lease was lost: the caller
    must then roll back, since another worker owns the job.
    """
    job = session.scalar(select(Job).where(Job.id == claimed.job_id).with_for_update())
    if job is None or job.lease_owner != claimed.owner or job.status != JobStatus.RUNNING.value:
        return None
    now = utcnow()
    job.lease_owner = None
    job.lease_expires_at = None
    job.updated_at = now
    job.outcome_id = outcome_id if outcome_id is not None else job.outcome_id
    job.last_error = error
    if status is JobStatus.FAILED:
        if job.attempts >= policy.max_attempts:
            status = JobStatus.DEAD
            job.finished_at = now
        else:
            job.run_after = now + policy.backoff(job.attempts)
    else:
        job.finished_at = now
    if job.generation != claimed.generation:
        # New instances arrived during the run: run again after their quiet period.
        status = JobStatus.QUEUED
        job.attempts = 0
        job.finished_at = None
    job.status = status.value
    return status


def release(sessions: sessionmaker[Session], claimed: Claim) -> bool:
    """Give a claimed job back unfinished (shutdown): queued again, the attempt uncounted."""
    with sessions.begin() as session:
        released = session.execute(
            update(Job)
            .where(
                Job.id == claimed.job_id,
                Job.lease_owner == claimed.owner,
                Job.status == JobStatus.RUNNING.value,
            )
            .values(
                status=JobStatus.QUEUED.value,
                attempts=Job.attempts - 1,
                lease_owner=None,
                lease_expires_at=None,
                run_after=utcnow(),
                updated_at=utcnow(),
            )
        )
        return bool(released.rowcount)  # type: ignore[attr-defined]


def recover_stalled(sessions: sessionmaker[Session], policy: RetryPolicy) -> int:
    """Jobs whose worker vanished: lease expired, or owned by a dead process on this host.

    Each such run counts as a failed attempt (a study that kills its worker every time
    ends DEAD instead of looping). Returns the number of jobs recovered.
    """
    recovered = 0
    with sessions.begin() as session:
        now = utcnow()
        running = session.scalars(
            select(Job)
            .where(Job.status == JobStatus.RUNNING.value)
            .with_for_update(skip_locked=True)
        ).all()
        for job in running:
            expired = job.lease_expires_at is not None and _as_utc(job.lease_expires_at) < now
            if not expired and not _owner_is_dead_local_process(job.lease_owner or ""):
                continue
            reason = f"worker lost during attempt {job.attempts} (lease of {job.lease_owner})"
            job.lease_owner = None
            job.lease_expires_at = None
            job.updated_at = now
            job.last_error = reason
            if job.attempts >= policy.max_attempts:
                job.status = JobStatus.DEAD.value
                job.finished_at = now
            else:
                job.status = JobStatus.QUEUED.value
                job.run_after = now
            recovered += 1
            log.warning("recovered stalled job of study %s: %s", job.study_instance_uid, reason)
    return recovered


def retry_dead(sessions: sessionmaker[Session], study_instance_uids: list[str] | None) -> int:
    """Queue dead jobs again with fresh attempts (all of them, or the studies named)."""
    with sessions.begin() as session:
        statement = update(Job).where(Job.status == JobStatus.DEAD.value)
        if study_instance_uids:
            statement = statement.where(Job.study_instance_uid.in_(study_instance_uids))
        result = session.execute(
            statement.values(
                status=JobStatus.QUEUED.value,
                attempts=0,
                run_after=utcnow(),
                finished_at=None,
                updated_at=utcnow(),
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    found = {str(status): int(n) for status, n in rows}
    return {status.value: found.get(status.value, 0) for status in JobStatus}


def _as_utc(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes (stored as UTC); PostgreSQL aware ones."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)

"""The study queue: one job per study (`jobs` table, statuses `cxrbatch.domain.JobStatus`).

A thin user of the leased-work mechanism (`cxrbatch.db.leased`: claim with a lease,
heartbeats, retry with backoff, dead after max attempts, recovery of vanished workers).
What is particular to jobs: a study is (re-)queued after its quiet period when instances
arrive, and a job that received instances while it ran is queued again when it finishes
(its generation moved on).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from cxrbatch.db.leased import WORKER_LOST, LeasedWork, RetryPolicy, db_now, new_owner
from cxrbatch.db.models import Job
from cxrbatch.domain import JobStatus

__all__ = ["Claim", "RetryPolicy", "claim", "enqueue_study", "finish", "holds", "new_owner"]

log = logging.getLogger(__name__)

FINISHED = (JobStatus.DONE, JobStatus.INELIGIBLE, JobStatus.DEAD)
JOBS = LeasedWork(
    Job,
    due=(JobStatus.QUEUED, JobStatus.FAILED),
    leased=JobStatus.RUNNING,
    failed=JobStatus.FAILED,
    dead=JobStatus.DEAD,
    revived=JobStatus.QUEUED,
)


@dataclass(frozen=True)
class Claim:
    """A job a worker holds: what it needs to process the study and to finish the job."""

    job_id: int
    study_instance_uid: str
    attempts: int
    generation: int
    owner: str
    # Its last attempt ended with its worker process (killed, out of memory, a crash in
    # native code): the worker runs it alone (worker.Turns).
    lost: bool = False


def enqueue_study(session: Session, study_instance_uid: str, stable_seconds: float) -> Job:
    """Note new input for a study: (re-)queue its job to run after the quiet period.

    A job of a finished study is queued again with fresh attempts (a late arrival); a
    running job keeps running and re-queues itself when it finishes (its generation is
    then older than the job's). The caller commits.
    """
    now = db_now(session)
    run_after = now + dt.timedelta(seconds=stable_seconds)
    mine = select(Job).where(Job.study_instance_uid == study_instance_uid).with_for_update()
    job = session.scalar(mine)
    if job is None:
        # Two hosts (or receivers) taking the study's first instances at once: one inserts
        # its job, the other's insert waits for that and does nothing, then both go on
        # with the one row. A plain INSERT failed the second on the unique key and rolled
        # back the instance it was recording with it.
        insert = _insert(session)(Job).values(
            study_instance_uid=study_instance_uid,
            status=JobStatus.QUEUED,
            attempts=0,
            run_after=run_after,
            generation=1,
            created_at=now,
            updated_at=now,
        )
        created = session.scalar(
            insert.on_conflict_do_nothing(index_elements=["study_instance_uid"]).returning(Job.id)
        )
        job = session.scalar(mine.execution_options(populate_existing=True))
        if job is None:  # cannot happen: the row exists, inserted here or by the other
            raise RuntimeError(f"the job of study {study_instance_uid} vanished")
        if created is not None:
            return job
    job.generation += 1
    job.run_after = run_after
    job.updated_at = now
    if job.status != JobStatus.RUNNING:
        if job.status in FINISHED:
            job.attempts = 0
        job.status = JobStatus.QUEUED
    return job


def _insert(session: Session) -> Any:
    """The dialect's INSERT, which has ON CONFLICT DO NOTHING (PostgreSQL and SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert
    return sqlite.insert


def claim(sessions: sessionmaker[Session], owner: str, lease_seconds: float) -> Claim | None:
    """Take the next due job, or None. Each job is given to exactly one claimer."""
    with sessions.begin() as session:
        job = JOBS.claim(session, owner, lease_seconds)
        if job is None:
            return None
        job.claimed_generation = job.generation
        job.heartbeat_at = job.updated_at
        lost = (job.last_error or "").startswith(WORKER_LOST)
        return Claim(job.id, job.study_instance_uid, job.attempts, job.generation, owner, lost)


def heartbeat(sessions: sessionmaker[Session], claimed: Claim, lease_seconds: float) -> bool:
    """Renew the lease; False when it was lost (recovered by someone else)."""
    return JOBS.renew(sessions, claimed.job_id, claimed.owner, lease_seconds)


def holds(session: Session, claimed: Claim) -> bool:
    """Whether the claimer still holds the job in the attempt it claimed, locking the row
    to the end of the caller's transaction (nobody can take it over meanwhile): checked
    before its outputs are published and its outcome recorded."""
    return JOBS.held_row(session, claimed.job_id, claimed.owner, claimed.attempts) is not None


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
    job = JOBS.held_row(session, claimed.job_id, claimed.owner, claimed.attempts)
    if job is None:
        return None
    job.outcome_id = outcome_id if outcome_id is not None else job.outcome_id
    done = None if status is JobStatus.FAILED else status
    closed = JobStatus(JOBS.close(job, done, policy, error))
    job.finished_at = None if closed is JobStatus.FAILED else job.updated_at
    if job.generation != claimed.generation:
        # New instances arrived during the run: run again after their quiet period.
        closed = JobStatus.QUEUED
        job.status = closed
        job.attempts = 0
        job.finished_at = None
    return closed


def release(sessions: sessionmaker[Session], claimed: Claim) -> bool:
    """Give a claimed job back unfinished (shutdown): queued again, the attempt uncounted."""
    return JOBS.release(sessions, claimed.job_id, claimed.owner, JobStatus.QUEUED)


def recover_stalled(sessions: sessionmaker[Session], policy: RetryPolicy) -> int:
    """Jobs whose worker vanished: lease expired, or owned by a dead process on this host.

    Each such run counts as a failed attempt (a study that kills its worker every time
    ends DEAD instead of looping). Returns the number of jobs recovered.
    """

    def tell(job: Any, reason: str) -> None:
        log.warning("recovered stalled job of study %s: %s", job.study_instance_uid, reason)

    return JOBS.recover(sessions, policy, JobStatus.QUEUED, tell)


def retry_dead(sessions: sessionmaker[Session], study_instance_uids: list[str] | None) -> int:
    """Queue dead jobs again with fresh attempts (all of them, or the studies named)."""
    where = [Job.study_instance_uid.in_(study_instance_uids)] if study_instance_uids else []
    return JOBS.revive(sessions, *where)


def pending(session: Session) -> bool:
    """Whether a job is queued (due or in its quiet period) or running: a worker run until
    the queue is idle waits for these; failed jobs waiting out their backoff do not count.
    One probe of the claim index, not a count of the whole table (polled every tick)."""
    waiting = Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING))
    return bool(session.scalar(select(exists().where(waiting))))


def dead_attempts(session: Session, study_instance_uids: list[str]) -> dict[str, int]:
    """Of these studies, those whose job is dead, with its attempts."""
    rows = session.execute(
        select(Job.study_instance_uid, Job.attempts).where(
            Job.study_instance_uid.in_(study_instance_uids), Job.status == JobStatus.DEAD
        )
    )
    return {uid: attempts for uid, attempts in rows}


def counts(session: Session) -> dict[str, int]:
    return JOBS.counts(session, JobStatus)

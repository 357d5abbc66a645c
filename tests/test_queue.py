"""The SQL job queue: claim, lease, heartbeat, finish, backoff, dead jobs, stalled-job
recovery, late arrivals; and 4 worker processes sharing one queue, each job run once."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import random
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from cxrbatch.db import jobs
from cxrbatch.db import models as tables
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.domain import JobStatus

POLICY = jobs.RetryPolicy(max_attempts=3, backoff_base_seconds=10, backoff_max_seconds=25)


@pytest.fixture()
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    upgrade(url)
    return session_factory(make_engine(url))


def _enqueue(sessions: sessionmaker[Session], uid: str, stable: float = 0.0) -> None:
    with sessions.begin() as session:
        jobs.enqueue_study(session, uid, stable)


def _job(sessions: sessionmaker[Session], uid: str) -> tables.Job:
    with sessions() as session:
        job = session.scalar(select(tables.Job).where(tables.Job.study_instance_uid == uid))
        assert job is not None
        return job


def _finish(
    sessions: sessionmaker[Session],
    claimed: jobs.Claim,
    status: JobStatus,
    error: str | None = None,
) -> JobStatus | None:
    with sessions.begin() as session:
        return jobs.finish(session, claimed, status, POLICY, error=error)


def _make_due(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.execute(update(tables.Job).values(run_after=tables.utcnow()))


def test_study_is_not_claimed_before_its_quiet_period(sessions: sessionmaker[Session]) -> None:
    _enqueue(sessions, "1.2.1", stable=60)
    assert jobs.claim(sessions, "w1", 30) is None
    _make_due(sessions)
    claimed = jobs.claim(sessions, "w1", 30)
    assert claimed is not None and claimed.attempts == 1
    assert jobs.claim(sessions, "w2", 30) is None  # one claimer only
    assert _finish(sessions, claimed, JobStatus.DONE) is JobStatus.DONE
    job = _job(sessions, "1.2.1")
    assert job.status == "done" and job.lease_owner is None and job.finished_at is not None


def test_failures_back_off_exponentially_then_the_job_is_dead(
    sessions: sessionmaker[Session],
) -> None:
    _enqueue(sessions, "1.2.2")
    delays = []
    for attempt in range(1, 4):
        _make_due(sessions)
        claimed = jobs.claim(sessions, "w", 30)
        assert claimed is not None and claimed.attempts == attempt
        before = tables.utcnow()
        status = _finish(sessions, claimed, JobStatus.FAILED, f"disk full ({attempt})")
        job = _job(sessions, "1.2.2")
        if attempt < 3:
            assert status is JobStatus.FAILED and job.status == "failed"
            run_after = job.run_after.replace(tzinfo=dt.UTC)
            delays.append((run_after - before).total_seconds())
            assert jobs.claim(sessions, "w", 30) is None  # not before its backoff
    assert delays[0] == pytest.approx(10, abs=1) and delays[1] == pytest.approx(20, abs=1)
    assert status is JobStatus.DEAD
    job = _job(sessions, "1.2.2")
    assert job.status == "dead" and job.last_error == "disk full (3)"
    _make_due(sessions)
    assert jobs.claim(sessions, "w", 30) is None  # dead jobs stay dead ...
    assert jobs.retry_dead(sessions, ["1.2.2"]) == 1  # ... until retried
    claimed = jobs.claim(sessions, "w", 30)
    assert claimed is not None and claimed.attempts == 1


def test_expired_lease_is_recovered_and_the_old_owner_cannot_finish(
    sessions: sessionmaker[Session],
) -> None:
    _enqueue(sessions, "1.2.3")
    first = jobs.claim(sessions, "host-a:1:x", lease_seconds=30)
    assert first is not None and not first.lost
    assert jobs.heartbeat(sessions, first, 30)
    assert jobs.recover_stalled(sessions, POLICY) == 0  # lease still valid
    with sessions.begin() as session:
        session.execute(
            update(tables.Job).values(lease_expires_at=tables.utcnow() - dt.timedelta(seconds=1))
        )
    assert jobs.recover_stalled(sessions, POLICY) == 1
    assert "worker lost" in (_job(sessions, "1.2.3").last_error or "")
    second = jobs.claim(sessions, "host-b:2:y", 30)
    # Its last attempt died with its worker: the worker that takes it runs it alone.
    assert second is not None and second.attempts == 2 and second.lost
    assert not jobs.heartbeat(sessions, first, 30)  # the first owner lost its lease
    assert _finish(sessions, first, JobStatus.DONE) is None
    assert _finish(sessions, second, JobStatus.DONE) is JobStatus.DONE


def test_the_attempt_is_the_fencing_token_and_a_recovered_job_keeps_its_place(
    sessions: sessionmaker[Session],
) -> None:
    for uid, due_since in (("1.2.5", 60), ("1.2.6", 30)):
        _enqueue(sessions, uid)
        with sessions.begin() as session:
            session.execute(
                update(tables.Job)
                .where(tables.Job.study_instance_uid == uid)
                .values(run_after=tables.utcnow() - dt.timedelta(seconds=due_since))
            )
    first = jobs.claim(sessions, "host-a:1:x", 30)
    assert first is not None and first.study_instance_uid == "1.2.5"
    with sessions.begin() as session:  # the lease ran out (a long pause), then ...
        session.execute(
            update(tables.Job)
            .where(tables.Job.id == first.job_id)
            .values(lease_expires_at=tables.utcnow() - dt.timedelta(seconds=1))
        )
    assert jobs.recover_stalled(sessions, POLICY) == 1
    # The recovered job goes first again (before, it went behind 1.2.6), and the same
    # owner name holding it again is a new attempt: the first attempt's claim can neither
    # record nor finish.
    again = jobs.claim(sessions, "host-a:1:x", 30)
    assert again is not None and again.study_instance_uid == "1.2.5" and again.attempts == 2
    with sessions() as session:
        assert not jobs.holds(session, first)
        assert jobs.holds(session, again)
    assert _finish(sessions, first, JobStatus.DONE) is None
    assert _finish(sessions, again, JobStatus.DONE) is JobStatus.DONE


def test_job_of_a_dead_local_process_is_recovered_at_once(
    sessions: sessionmaker[Session],
) -> None:
    import socket

    from cxrbatch.db.leased import process_space

    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    child.start()
    child.join()
    _enqueue(sessions, "1.2.4")
    # A process of this host, boot and PID namespace that has exited.
    owner = f"{socket.gethostname()}:{child.pid}:dead:{process_space()}"
    assert jobs.claim(sessions, owner, lease_seconds=3600) is not None
    assert jobs.recover_stalled(sessions, POLICY) == 1
    assert _job(sessions, "1.2.4").status == "queued"


def test_release_gives_the_job_back_without_counting_the_attempt(
    sessions: sessionmaker[Session],
) -> None:
    _enqueue(sessions, "1.2.5")
    claimed = jobs.claim(sessions, "w", 30)
    assert claimed is not None
    assert jobs.release(sessions, claimed)
    job = _job(sessions, "1.2.5")
    assert job.status == "queued" and job.attempts == 0 and job.lease_owner is None


def test_late_arrival_requeues_a_finished_and_a_running_study(
    sessions: sessionmaker[Session],
) -> None:
    _enqueue(sessions, "1.2.6")
    claimed = jobs.claim(sessions, "w", 30)
    assert claimed is not None
    assert _finish(sessions, claimed, JobStatus.DONE) is JobStatus.DONE
    _enqueue(sessions, "1.2.6", stable=0)  # late instance after processing
    job = _job(sessions, "1.2.6")
    assert job.status == "queued" and job.attempts == 0 and job.generation == 2
    claimed = jobs.claim(sessions, "w", 30)
    assert claimed is not None
    _enqueue(sessions, "1.2.6", stable=0)  # arrives while the study is being processed
    assert _job(sessions, "1.2.6").status == "running"
    assert _finish(sessions, claimed, JobStatus.DONE) is JobStatus.QUEUED
    again = jobs.claim(sessions, "w", 30)
    assert again is not None and again.generation == 3
    assert _finish(sessions, again, JobStatus.DONE) is JobStatus.DONE


# ---- many worker processes, one queue -----------------------------------------------------


def _drain_queue(url: str, seed: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """A worker process: claim until the queue is empty; report the job ids it ran."""
    rng = random.Random(seed)
    engine = make_engine(url)
    sessions = session_factory(engine)
    owner = jobs.new_owner()
    ran: list[int] = []
    idle_rounds = 0
    while idle_rounds < 3:
        claimed = jobs.claim(sessions, owner, lease_seconds=60)
        if claimed is None:
            idle_rounds += 1
            time.sleep(0.05)
            continue
        idle_rounds = 0
        time.sleep(rng.uniform(0, 0.004))  # "processing"
        with sessions.begin() as session:
            assert jobs.finish(session, claimed, JobStatus.DONE, jobs.RetryPolicy())
        ran.append(claimed.job_id)
    engine.dispose()
    results.put(ran)


def _four_workers_run_each_job_once(url: str, count: int) -> None:
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        for n in range(count):
            jobs.enqueue_study(session, f"1.2.840.99.{n}", 0)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_drain_queue, args=(url, n, results)) for n in range(4)]
    for process in workers:
        process.start()
    ran = [results.get(timeout=240) for _ in workers]
    for process in workers:
        process.join(30)
        assert process.exitcode == 0
    everything = [job for worker_jobs in ran for job in worker_jobs]
    assert len(everything) == count and len(set(everything)) == count  # each exactly once
    assert sum(1 for worker_jobs in ran if worker_jobs) >= 2  # the work was shared
    with sessions() as session:
        assert jobs.counts(session)["done"] == count
        attempts = session.scalars(select(tables.Job.attempts)).all()
        assert set(attempts) == {1}
    engine.dispose()


@pytest.mark.postgres
def test_four_worker_processes_on_postgres_run_each_of_200_jobs_once(postgres_url: str) -> None:
    _four_workers_run_each_job_once(postgres_url, 200)


def test_four_worker_processes_on_sqlite_run_each_of_200_jobs_once(tmp_path: Path) -> None:
    _four_workers_run_each_job_once(f"sqlite:///{tmp_path / 'shared.sqlite'}", 200)

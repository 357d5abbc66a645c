"""The claim at queue depth (issue 34): N due jobs in a fresh PostgreSQL database, then
the daemon's claim (`cxrbatch.db.jobs.claim`, rolled back each time so the depth stays)
timed R times, and PostgreSQL's plan for it.

    python -m bench.queue_depth [--jobs 1000000] [--rounds 50] [--db URL]

Prints one JSON line: jobs, median and p90 claim milliseconds, whether the plan uses the
partial index ix_jobs_due, and the plan's first lines; then the same without that index
(the schema before migration 0011), for the ratio in one run. The database is created and
dropped (default server: the PostgreSQL test server).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from bench.postgres import ADMIN, scratch_database


def measure(url: str, count: int, rounds: int) -> list[dict[str, object]]:
    from sqlalchemy import text

    from cxrbatch.db.session import make_engine, upgrade

    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as connection:
        # Due jobs over a day of arrivals, a few failed ones among them, as a backlog is.
        connection.execute(
            text(
                "INSERT INTO jobs (study_instance_uid, status, attempts, run_after, generation,"
                " created_at, updated_at) SELECT '1.2.826.0.1.' || g,"
                " CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'queued' END, 0,"
                " now() - interval '1 day' + g * interval '80 ms', 1, now(), now()"
                " FROM generate_series(1, :n) AS g"
            ),
            {"n": count},
        )
        connection.execute(text("ANALYZE jobs"))
    figures = [_claims(engine, count, rounds)]
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_jobs_due"))
        connection.execute(text("ANALYZE jobs"))
    figures.append(_claims(engine, count, max(3, rounds // 10)))
    engine.dispose()
    return figures


def _claims(engine: Any, count: int, rounds: int) -> dict[str, object]:
    from sqlalchemy import text

    from cxrbatch.db import jobs
    from cxrbatch.db.models import Job
    from cxrbatch.db.session import session_factory
    from cxrbatch.domain import JobStatus

    sessions = session_factory(engine)
    times: list[float] = []
    for _ in range(rounds):
        session = sessions()
        started = time.perf_counter()
        row = jobs.JOBS.claim(session, "bench:1:x:y", 60)
        session.flush()
        times.append((time.perf_counter() - started) * 1000)
        session.rollback()
        session.close()
        assert row is not None
    with sessions() as session:
        statement = (
            session.query(Job)
            .filter(Job.status.in_([JobStatus.QUEUED, JobStatus.FAILED]))
            .filter(Job.run_after <= text("now()"))
            .order_by(Job.run_after, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .statement.compile(engine, compile_kwargs={"literal_binds": True})
        )
        plan = [r[0] for r in session.execute(text(f"EXPLAIN {statement}"))]
    times.sort()
    return {
        "jobs": count,
        "rounds": rounds,
        "claim_ms_median": round(statistics.median(times), 2),
        "claim_ms_p90": round(times[int(0.9 * (len(times) - 1))], 2),
        "uses_ix_jobs_due": any("ix_jobs_due" in line for line in plan),
        "plan": plan[:3],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--db", default=ADMIN, help="an admin URL of the PostgreSQL server")
    args = parser.parse_args(argv)

    with scratch_database(args.db) as url:
        figures = measure(url, args.jobs, args.rounds)
    for line in figures:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

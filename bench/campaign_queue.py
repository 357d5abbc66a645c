"""Campaign: N worker processes drain one job queue of M studies; each job must run exactly
once (issue 20: 8 workers on PostgreSQL over >= 1,000 jobs).

    python -m bench.campaign_queue [--workers 8] [--jobs 1000] [--db URL] [--seed 0]

The workers are real processes claiming through `cxrbatch.db.jobs` (the daemon's claim,
lease, finish), with a random "processing" time each; the default database is the
PostgreSQL test server (a fresh database of its own, dropped afterwards). Prints one JSON
line: jobs, runs, distinct jobs run, jobs run twice, workers that did work, seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import time
from multiprocessing.queues import Queue
from typing import Any

from bench.postgres import ADMIN, scratch_database


def _drain(url: str, seed: int, results: Queue[list[int]]) -> None:
    from cxrbatch.db import jobs
    from cxrbatch.db.session import make_engine, session_factory
    from cxrbatch.domain import JobStatus

    rng = random.Random(seed)
    engine = make_engine(url)
    sessions = session_factory(engine)
    owner = jobs.new_owner()
    ran: list[int] = []
    idle = 0
    while idle < 5:
        claimed = jobs.claim(sessions, owner, lease_seconds=120)
        if claimed is None:
            idle += 1
            time.sleep(0.1)
            continue
        idle = 0
        time.sleep(rng.uniform(0.0, 0.01))  # "processing"
        with sessions.begin() as session:
            if jobs.finish(session, claimed, JobStatus.DONE, jobs.RetryPolicy()) is not None:
                ran.append(claimed.job_id)
    engine.dispose()
    results.put(ran)


def run(url: str, workers: int, count: int, seed: int) -> dict[str, Any]:
    from cxrbatch.db import jobs
    from cxrbatch.db.session import make_engine, session_factory, upgrade

    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        for n in range(count):
            jobs.enqueue_study(session, f"1.2.840.99.{seed}.{n}", 0)
    context = multiprocessing.get_context("spawn")
    results: Queue[list[int]] = context.Queue()
    started = time.perf_counter()
    processes = [
        context.Process(target=_drain, args=(url, seed * 1000 + n, results)) for n in range(workers)
    ]
    for process in processes:
        process.start()
    ran = [results.get(timeout=1800) for _ in processes]
    for process in processes:
        process.join(60)
    seconds = time.perf_counter() - started
    runs = [job for worker_runs in ran for job in worker_runs]
    with sessions() as session:
        done = jobs.counts(session)["done"]
    engine.dispose()
    return {
        "workers": workers,
        "jobs": count,
        "runs": len(runs),
        "distinct_jobs_run": len(set(runs)),
        "jobs_run_twice": len(runs) - len(set(runs)),
        "jobs_done": done,
        "workers_that_ran_jobs": sum(1 for worker_runs in ran if worker_runs),
        "worker_exit_codes": sorted({p.exitcode for p in processes}, key=str),
        "seconds": round(seconds, 1),
        "each_exactly_once": len(runs) == count == len(set(runs)) == done,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--db", default=ADMIN, help="PostgreSQL admin URL, or any URL")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.db.startswith("postgresql"):
        with scratch_database(args.db, "cxrbatch_campaign") as url:
            report = run(url, args.workers, args.jobs, args.seed)
    else:
        report = run(args.db, args.workers, args.jobs, args.seed)
    print(json.dumps(report))
    return 0 if report["each_exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""A worker host lost mid-study (issue 34): how long until another host takes its study.

Two `cxrbatch worker` processes share one PostgreSQL queue of phantom studies, with the
site's default lease and heartbeat. Host A runs in its own PID and UTS namespaces
(`unshare`, as root: a second machine, or a container, whose pids mean nothing here), so
its death can only be seen by its lease running out. Once A holds a study it is killed
(SIGKILL, the whole process group: a power cut), and the bench waits for host B to claim
that study again and record it.

    python -m bench.host_loss [--studies 24] [--db ADMIN_URL]

Prints one JSON line: the lease and heartbeat used, seconds from the kill to B's claim and
to its outcome, the study's attempts, outcomes per study (1 each when correct) and the
staging folders left behind (0 when correct).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.postgres import ADMIN, scratch_database


def _worker(
    out: Path, url: str, config: Path, log: Path, own_host: bool
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "cxrbatch", "worker", "--out", str(out), "--db", url]
    command += ["--config", str(config)]
    if own_host:
        unshare = shutil.which("unshare")
        if unshare is None:
            raise SystemExit("unshare (util-linux) is needed for the lost host")
        command = [unshare, "--pid", "--fork", "--mount-proc", "--uts", *command]
    handle = log.open("wb")
    return subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def run(url: str, studies: int, work: Path) -> dict[str, object]:
    from sqlalchemy import func, select

    from cxrbatch.config import load_settings
    from cxrbatch.db import models as tables
    from cxrbatch.db.leased import process_space
    from cxrbatch.db.session import make_engine, session_factory, upgrade
    from cxrbatch.ingest.spool import Spool
    from cxrbatch.site import Site
    from cxrbatch_training.synthetic import write_studies

    out = work / "out"
    out.mkdir()
    config = work / "site.toml"
    config.write_text('[segmentation]\ndevice = "cpu"\n\n[ingest]\nstudy_stable_seconds = 0.0\n')
    settings = load_settings(config)
    upgrade(url)
    sessions = session_factory(make_engine(url))
    site = Site(settings, out, url)
    spool = Spool.for_site(site, sessions)
    for study in write_studies(work / "in", studies, seed=7, size=(1024, 1024)):
        spool.take(study.path)

    lost = _worker(out, url, config, work / "a.log", own_host=True)
    survivor = _worker(out, url, config, work / "b.log", own_host=False)
    here = process_space()  # B's; A's namespace is another
    taken: tables.Job | None = None
    deadline = time.monotonic() + 600
    while taken is None and time.monotonic() < deadline:
        time.sleep(0.1)
        with sessions() as session:
            b_working = session.scalar(select(func.count()).select_from(tables.Outcome))
            held_by_a = session.scalar(
                select(tables.Job).where(
                    tables.Job.status == "running", ~tables.Job.lease_owner.endswith(here)
                )
            )
        if b_working and held_by_a is not None:  # both hosts up; A holds a study
            taken = held_by_a
    if taken is None:
        raise SystemExit(f"host A never held a study; see {work / 'a.log'}")
    os.killpg(lost.pid, signal.SIGKILL)
    killed = time.monotonic()
    lost.wait()
    reclaimed = recorded = None
    while recorded is None and time.monotonic() < killed + 600:
        time.sleep(0.2)
        with sessions() as session:
            job = session.get(tables.Job, taken.id)
            assert job is not None
            if reclaimed is None and job.attempts >= 2:
                reclaimed = time.monotonic() - killed
            if job.status == "done":
                recorded = time.monotonic() - killed
                attempts = job.attempts
    # Let B drain the rest, then count.
    while time.monotonic() < killed + 900:
        with sessions() as session:
            left = session.scalar(
                select(func.count()).select_from(tables.Job).where(tables.Job.status != "done")
            )
        if not left:
            break
        time.sleep(1)
    survivor.send_signal(signal.SIGTERM)
    survivor.wait(timeout=300)
    with sessions() as session:
        per_study = session.execute(
            select(tables.Outcome.study_id, func.count()).group_by(tables.Outcome.study_id)
        ).all()
        hosts = session.scalars(select(tables.Outcome.processed_by).distinct()).all()
    return {
        "studies": studies,
        "lease_seconds": settings.queue.lease_seconds,
        "heartbeat_seconds": settings.queue.heartbeat_seconds,
        "kill_to_reclaim_s": None if reclaimed is None else round(reclaimed, 1),
        "kill_to_outcome_s": None if recorded is None else round(recorded, 1),
        "attempts": attempts if recorded is not None else None,
        "outcomes_per_study": sorted({n for _, n in per_study}),
        "studies_recorded": len(per_study),
        "workers_on_outcomes": len(hosts),
        # A's staging folder of the lost attempt, removed when B published the study.
        "staging_folders_left": len(list(out.glob("*/.staging-*"))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--db", default=ADMIN, help="an admin URL of the PostgreSQL server")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cxrbatch-host-loss-"))
    with scratch_database(args.db) as url:
        figures = run(url, args.studies, work)
    shutil.rmtree(work, ignore_errors=True)  # kept when the run failed: its workers' logs
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

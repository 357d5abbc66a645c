"""The queue across hosts (issue 34): leases are timed by the database's clock, a worker
is not taken for dead because a process of the same hostname and pid is gone, hosts
started together migrate once, and a worker that lost its lease leaves nothing behind.

- A worker on a host whose clock runs 125 s ahead (libfaketime, as a real skewed host)
  recovers and claims nothing that another worker holds: before, both live jobs of the
  other hosts were taken.
- Containers that share the host's hostname (`--net=host`) but not its PID namespace
  (`unshare --pid`): a lease owner from the other namespace is never judged dead by a pid
  lookup here (before, a live job was re-queued at once).
- Three processes upgrading an empty PostgreSQL database at once all start (an advisory
  lock; before, two of three exited with UniqueViolation on alembic_version).
- A worker whose lease is taken over while it runs: it publishes no file and records no
  outcome (its staging folder is discarded); the new holder's outcome names its worker.
- Two ingest hosts taking the images of the same studies at once lose none (before, the
  second to create a study's job rolled back its instance), and two hosts on one export
  share take each file once, the other finding it gone (before: an OSError, or a file
  moved away mid-read quarantined as unreadable).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from cxrbatch import pipeline
from cxrbatch.config import Settings
from cxrbatch.db import jobs
from cxrbatch.db import models as tables
from cxrbatch.db.leased import RetryPolicy, new_owner, owner_is_dead_local_process, process_space
from cxrbatch.db.session import head_revision, make_engine, session_factory, upgrade
from cxrbatch.dicom import export
from cxrbatch.domain import StudyInput, StudyRunStatus
from cxrbatch.ingest.spool import Spool, Taken
from cxrbatch.site import Site
from cxrbatch.worker import QueueWorker
from cxrbatch_training.synthetic import make_phantom, save, to_dataset
from tests.conftest import tool, unavailable

ROOT = Path(__file__).resolve().parent.parent
POLICY = RetryPolicy(max_attempts=3, backoff_base_seconds=10.0, backoff_max_seconds=60.0)

SKEWED_WORKER = """
import json, sys
from cxrbatch.db import jobs
from cxrbatch.db.leased import RetryPolicy
from cxrbatch.db.session import make_engine, session_factory
sessions = session_factory(make_engine(sys.argv[1]))
recovered = jobs.recover_stalled(sessions, RetryPolicy(max_attempts=3))
claimed = jobs.claim(sessions, jobs.new_owner(), 60)
taken = None if claimed is None else claimed.study_instance_uid
print(json.dumps({"recovered": recovered, "claimed": taken}))
"""


def _faketime() -> str:
    return tool(
        "faketime",
        skip_reason="faketime is not installed (apt-get install faketime)",
        ci_reason="faketime (Debian package) is required in CI for the clock-skew test",
    )


@pytest.mark.postgres
def test_a_host_whose_clock_runs_ahead_takes_no_live_lease(postgres_url: str) -> None:
    faketime = _faketime()
    upgrade(postgres_url)
    sessions = session_factory(make_engine(postgres_url))
    with sessions.begin() as session:
        for uid in ("1.2.34.1", "1.2.34.2"):
            jobs.enqueue_study(session, uid, 0.0)
    held = [jobs.claim(sessions, new_owner(), 60) for _ in range(2)]
    assert all(h is not None for h in held)

    skewed = subprocess.run(
        [faketime, "-f", "+125s", sys.executable, "-c", SKEWED_WORKER, postgres_url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert skewed.returncode == 0, skewed.stderr[-2000:]
    # The subprocess did run 125 s ahead (libfaketime took effect).
    probe = subprocess.run(
        [faketime, "-f", "+125s", sys.executable, "-c", "import time; print(time.time())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert float(probe.stdout) - time.time() > 100
    assert json.loads(skewed.stdout.splitlines()[-1]) == {"recovered": 0, "claimed": None}
    with sessions() as session:
        rows = session.scalars(select(tables.Job)).all()
        assert {r.status for r in rows} == {"running"}
        assert {r.lease_owner for r in rows} == {h.owner for h in held if h is not None}


def test_an_owner_from_another_pid_namespace_is_never_judged_dead_here() -> None:
    ours = new_owner()
    host, _, nonce, space = ours.split(":")
    assert space == process_space() != "unknown"
    # A pid that no longer runs here.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert owner_is_dead_local_process(f"{host}:{gone.pid}:{nonce}:{space}")
    # The same hostname and pid in another PID namespace (a container sharing the
    # hostname), or an owner name that does not say its namespace: not ours to judge.
    assert not owner_is_dead_local_process(f"{host}:{gone.pid}:{nonce}:00000000-1")
    assert not owner_is_dead_local_process(f"{host}:{gone.pid}:{nonce}")

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    inside = subprocess.run(
        [
            unshare,
            "--pid",
            "--fork",
            "--mount-proc",
            "--uts",
            sys.executable,
            "-c",
            "from cxrbatch.db.leased import new_owner; print(new_owner())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if inside.returncode != 0:
        unavailable(
            f"unshare --pid is not allowed here: {inside.stderr[-300:]}",
            f"unshare --pid needs root in CI: {inside.stderr[-500:]}",
        )
    other = inside.stdout.strip().split(":")
    assert other[0] == host and other[3] != space  # same hostname, another PID namespace
    # Its pid means nothing here, even if no process of that number runs on this side.
    assert not owner_is_dead_local_process(f"{host}:{gone.pid}:{other[2]}:{other[3]}")


UPGRADE = """
import sys
from cxrbatch.db.session import current_revision, upgrade
upgrade(sys.argv[1])
print(current_revision(sys.argv[1]))
"""


@pytest.mark.postgres
def test_three_hosts_started_together_on_an_empty_database_all_start(postgres_url: str) -> None:
    # Each start runs the migrations; before the advisory lock, two of three exited with
    # UniqueViolation on alembic_version.
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", UPGRADE, postgres_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(3)
    ]
    answers = [start.communicate(timeout=180) for start in starts]
    assert [s.returncode for s in starts] == [0, 0, 0], [err[-1500:] for _, err in answers]
    assert {out.split()[-1] for out, _ in answers} == {head_revision()}


def test_a_worker_whose_lease_was_taken_records_nothing_and_leaves_no_files(
    tmp_path: Path, settings: Settings, models: pipeline.Models
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    upgrade(url)
    sessions = session_factory(make_engine(url))
    quiet = settings.ingest.model_copy(update={"study_stable_seconds": 0.0})
    site = Site(settings.model_copy(update={"ingest": quiet}), out, url)
    source = save(to_dataset(make_phantom(5, (256, 256)), "61/0"), tmp_path / "in" / "IM1")
    assert Spool.for_site(site, sessions).take(source) is Taken.RECEIVED

    slow, other = QueueWorker(site, models), QueueWorker(site, models)
    held = jobs.claim(sessions, slow.owner, 60)
    assert held is not None
    staged: list[Path] = []
    taken: list[jobs.Claim | None] = []
    run = slow.processor.run

    def run_and_lose_the_lease(study: StudyInput, **kwargs: Any) -> Any:
        ran = run(study, **kwargs)
        staged.extend(ran.outputs.dicom_files() if ran.outputs else [])
        # Its lease ran out while it worked (a long GC pause, a frozen VM): another worker
        # recovered the job and holds it now.
        with sessions.begin() as session:
            session.execute(
                update(tables.Job).values(
                    lease_expires_at=tables.utcnow() - dt.timedelta(seconds=1)
                )
            )
        assert jobs.recover_stalled(sessions, POLICY) == 1
        taken.append(jobs.claim(sessions, other.owner, 60))
        return ran

    slow.processor.run = run_and_lose_the_lease  # type: ignore[method-assign]
    report = slow.process_claim(held)

    assert report.status is StudyRunStatus.LOST
    assert staged and all(p.parent.name.startswith(export.STAGING_PREFIX) for p in staged)
    folder = export.study_dir(out, held.study_instance_uid)
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing left, staged or not
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(tables.Outcome)) == 0

    # The new holder publishes and records, and the outcome names it.
    (claimed,) = taken
    assert claimed is not None and claimed.attempts == 2
    assert other.process_claim(claimed).status is StudyRunStatus.PROCESSED
    names = sorted(p.name for p in folder.iterdir())
    assert "sr.dcm" in names and "result.json" in names
    assert not [n for n in names if n.startswith(export.STAGING_PREFIX)]
    with sessions() as session:
        (outcome,) = session.scalars(select(tables.Outcome)).all()
        assert outcome.processed_by == other.owner != slow.owner
        job = session.scalar(select(tables.Job))
        assert job is not None and job.status == "done"


INGEST_HOST = """
import json, sys, time
from pathlib import Path
from cxrbatch.config import load_settings
from cxrbatch.db.session import make_engine, session_factory
from cxrbatch.ingest.spool import Spool
from cxrbatch.site import Site
url, out, folder, start = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
site = Site(load_settings(None), out, url)
spool = Spool.for_site(site, session_factory(make_engine(url)))
files = sorted(folder.iterdir())
shared = sorted((folder.parent / "shared").iterdir())
time.sleep(max(0.0, start - time.time()))  # both hosts begin at the same moment
print(json.dumps([spool.take(f).value for f in files]))
print(json.dumps({f.name: spool.take(f).value for f in shared}))
"""


@pytest.mark.postgres
def test_two_ingest_hosts_taking_one_study_at_once_lose_no_instance(
    tmp_path: Path, postgres_url: str
) -> None:
    # Host A receives the first image of each study, host B the second, at the same time
    # (two C-STORE receivers, or two hosts on one export share). Before, the second host
    # to create a study's job hit the unique job row, and its instance's row was rolled
    # back with it: the study ran without that image.
    upgrade(postgres_url)
    out = tmp_path / "out"
    studies = 40
    for host, instance in (("a", 1), ("b", 2)):
        for index in range(studies):
            ds = to_dataset(make_phantom(index, (64, 64)), f"71/{index}", instance=instance)
            save(ds, tmp_path / host / f"IM{index:03d}")
    for index in range(30):  # one export share both hosts watch
        ds = to_dataset(make_phantom(index, (64, 64)), f"72/{index}")
        save(ds, tmp_path / "shared" / f"IM{index:03d}")
    start = time.time() + 4
    hosts = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                INGEST_HOST,
                postgres_url,
                str(out),
                str(tmp_path / host),
                str(start),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for host in ("a", "b")
    ]
    answers = [host.communicate(timeout=300) for host in hosts]
    assert [h.returncode for h in hosts] == [0, 0], [err[-2000:] for _, err in answers]
    taken = [json.loads(out_text.splitlines()[0]) for out_text, _ in answers]
    assert taken == [["received"] * studies, ["received"] * studies]
    # The shared folder: each file taken by exactly one host; the other found it gone (or,
    # once recorded, a duplicate), never an error.
    a, b = (json.loads(out_text.splitlines()[1]) for out_text, _ in answers)
    for name in a:
        assert sorted([a[name], b[name]]) in (["gone", "received"], ["duplicate", "received"])
    sessions = session_factory(make_engine(postgres_url))
    with sessions() as session:
        instances = session.scalar(select(func.count()).select_from(tables.Instance))
        assert instances == 2 * studies + 30
        assert session.scalar(select(func.count()).select_from(tables.Job)) == studies + 30
        assert session.scalar(select(func.count()).select_from(tables.RejectedFile)) == 0

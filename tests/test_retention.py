"""The retention policy (`cxrbatch cleanup`, and `watch` every retention.interval_hours):
old spooled instances of finished studies, old quarantine copies and outputs only
superseded outcomes name go; nothing a current outcome or an unsent delivery needs, and no
dead study's input, ever does."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cxrbatch import pipeline
from cxrbatch.cli import app
from cxrbatch.config import Settings
from cxrbatch.db import models as tables
from cxrbatch.db.session import upgrade
from cxrbatch.ingest.spool import Spool, Taken
from cxrbatch.retention import cleanup
from cxrbatch.site import Site
from cxrbatch.worker import QueueWorker
from cxrbatch_training.synthetic import write_studies

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)  # past every cutoff


def test_cleanup_removes_only_what_nothing_needs(
    tmp_path: Path, settings: Settings, models: pipeline.Models
) -> None:
    configured = settings.model_copy(
        update={
            "ingest": settings.ingest.model_copy(update={"study_stable_seconds": 0.0}),
            "queue": settings.queue.model_copy(
                update={"poll_interval_seconds": 0.05, "min_free_disk_mb": 0.0}
            ),
        }
    )
    site = Site.at(configured, tmp_path / "out")
    site.out_dir.mkdir()
    upgrade(site.database_url)
    finished, dead = write_studies(tmp_path / "in", 2, seed=81, size=(256, 256))
    junk = tmp_path / "in" / "junk.bin"
    junk.write_bytes(b"not dicom")
    kept = tmp_path / "resend.dcm"  # the spool moves its input: a copy to send again
    kept.write_bytes(finished.path.read_bytes())
    with site.database() as database:
        spool = Spool(
            site.spool_dir, database.sessions, site.quarantine_dir, roots=site.roots,
            study_stable_seconds=0.0,
        )  # fmt: skip
        for path in (finished.path, dead.path):
            assert spool.take(path) is Taken.RECEIVED
        assert spool.take(junk) is Taken.REJECTED
        assert QueueWorker(site, models).run(until_idle=True) == 2

        with database.sessions.begin() as session:
            job = session.scalar(
                select(tables.Job).where(tables.Job.study_instance_uid == dead.study_instance_uid)
            )
            assert job is not None
            job.status = "dead"  # an operator may still `jobs retry` it: its input stays
            current = session.scalar(
                select(tables.Outcome)
                .join(tables.Study)
                .where(
                    tables.Study.study_instance_uid == finished.study_instance_uid,
                    tables.Outcome.is_current,
                )
            )
            assert current is not None
            current_sr = current.outputs["sr"]
            study_folder = site.roots.resolve(current_sr).parent
            old_key = study_folder / "key_old.dcm"
            unsent = study_folder / "unsent.dcm"
            old_key.write_bytes(b"x" * 10)
            unsent.write_bytes(b"y" * 10)
            # An outcome superseded long ago that names the current SR (still needed), an
            # old key image (not needed) and a file a pending delivery still has to send.
            session.add(
                tables.Outcome(
                    study_id=current.study_id,
                    is_current=False,
                    status="processed",
                    input_fingerprint="old",
                    outputs={
                        "sr": current_sr,
                        # As an older version stored it: the current result.json by its
                        # absolute path (the same file as the current outcome's `output:`).
                        "json": str(site.roots.resolve(current.outputs["json"])),
                        "seg": {},
                        "key_images": {
                            "a": site.roots.store(old_key),
                            "b": site.roots.store(unsent),
                        },
                    },
                    superseded_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
                )
            )
            session.add(
                tables.Delivery(
                    study_instance_uid=finished.study_instance_uid,
                    destination="pacs",
                    transport="dimse",
                    status="pending",
                    attempts=0,
                    run_after=dt.datetime.now(dt.UTC),
                    files=[site.roots.store(unsent)],
                )
            )

    spooled = sorted(site.spool_dir.rglob("*.dcm"))
    copies = sorted(site.quarantine_dir.iterdir())
    assert len(spooled) == 2 and {p.suffix for p in copies} == {".bin", ".json"}

    young = cleanup(site)  # nothing is old enough yet
    assert (young.spool_files, young.quarantine_files, young.superseded_files) == (0, 0, 0)
    dry = cleanup(site, dry_run=True, now=LATER)
    assert (dry.spool_files, dry.quarantine_files, dry.superseded_files) == (1, 1, 1)
    assert sorted(site.spool_dir.rglob("*.dcm")) == spooled and old_key.exists()

    report = cleanup(site, now=LATER)
    assert (report.spool_files, report.quarantine_files, report.superseded_files) == (1, 1, 1)
    assert report.errors == [] and report.bytes_freed > 0
    left = sorted(site.spool_dir.rglob("*.dcm"))
    assert len(left) == 1 and dead.study_instance_uid in str(left[0])  # the dead study's
    assert list(site.quarantine_dir.iterdir()) == []
    assert not old_key.exists() and unsent.exists()  # the unsent delivery still needs it
    assert site.roots.resolve(current_sr).is_file()  # the current outcome's files stay
    assert (site.roots.resolve(current_sr).parent / "result.json").is_file()
    with site.database() as database, database.sessions() as session:
        rows = session.scalars(select(tables.Instance).order_by(tables.Instance.id)).all()
        assert [r.purged_at is not None for r in rows] == [True, False]
        rejected = session.scalars(select(tables.RejectedFile)).one()
        assert rejected.quarantine_path is None and rejected.reason  # the reason is kept
    with site.database() as database:
        # The PACS sends the purged instance again: still recognised, dropped.
        resend = Spool(
            site.spool_dir, database.sessions, site.quarantine_dir, roots=site.roots,
            mode="read-only",
        )  # fmt: skip
        assert resend.take(kept) is Taken.DUPLICATE

    again = cleanup(site, now=LATER)
    assert (again.spool_files, again.quarantine_files, again.superseded_files) == (0, 0, 0)
    listed = CliRunner().invoke(
        app, ["cleanup", "--out", str(site.out_dir), "--dry-run", "--format", "json"]
    )
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout)["dry_run"] is True


def test_watch_runs_the_policy_every_interval_and_survives_a_failed_pass(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrbatch import daemon

    every = settings.model_copy(
        update={"retention": settings.retention.model_copy(update={"interval_hours": 0.01})}
    )
    service = daemon.Service(Site.at(every, tmp_path / "out"), 1, None)
    passes: list[Site] = []

    def failing(site: Site) -> None:
        passes.append(site)
        raise OSError("disk gone")

    monkeypatch.setattr(daemon, "cleanup", failing)
    clock = [1000.0]
    monkeypatch.setattr(daemon.time, "monotonic", lambda: clock[0])
    service._retention_if_due()
    assert passes == []  # the first pass waits one interval (a restart loop deletes nothing)
    clock[0] += 37.0  # 0.01 h = 36 s
    service._retention_if_due()  # fails: logged, not raised
    service._retention_if_due()
    assert len(passes) == 1
    clock[0] += 37.0
    service._retention_if_due()
    assert len(passes) == 2 and passes[0].out_dir == tmp_path / "out"
    service.database.close()

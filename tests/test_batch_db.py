"""`cxrbatch process` as a batch: results DB rows, quarantine, re-runs, supersession,
alembic schema on SQLite and PostgreSQL, CLI exit codes, no patient data in logs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from typer.testing import CliRunner

from cxrbatch import pipeline
from cxrbatch.batch import run_batch
from cxrbatch.cli import app
from cxrbatch.config import Settings
from cxrbatch.db import models as tables
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.site import Site
from cxrbatch_training.synthetic import make_phantom, save, to_dataset, write_studies
from tests.conftest import real_file


def _mixed_folder(root: Path) -> Path:
    write_studies(root / "phantoms", 2, seed=11, size=(384, 384))
    (root / "mr").mkdir()
    shutil.copyfile(real_file("MR_small.dcm"), root / "mr" / "IM0001")
    (root / "empty").write_bytes(b"")
    (root / "notes.txt").write_text("not dicom")
    good = root / "phantoms" / "phantom_00000" / "image.dcm"
    (root / "truncated.dcm").write_bytes(good.read_bytes()[:300])
    ds = to_dataset(make_phantom(3, (256, 256)), "short-pixels")
    ds.PixelData = ds.PixelData[:1000]
    save(ds, root / "short_pixels.dcm")
    # Wrongly tagged files, each its own study.
    ds = to_dataset(make_phantom(4, (256, 256)), "wrong-photometric")
    ds.PhotometricInterpretation = "RGB"
    save(ds, root / "wrong_photometric.dcm")
    ds = to_dataset(make_phantom(5, (256, 256)), "no-pixels")
    del ds.PixelData
    save(ds, root / "no_pixels.dcm")
    ds = to_dataset(make_phantom(6, (256, 256)), "ct-class-cr-modality")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    save(ds, root / "ct_class.dcm")
    return root


def _counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    with session_factory(engine)() as session:
        counts = {
            "studies": session.scalar(select(func.count()).select_from(tables.Study)),
            "outcomes": session.scalar(select(func.count()).select_from(tables.Outcome)),
            "current": session.scalar(
                select(func.count()).select_from(tables.Outcome).where(tables.Outcome.is_current)
            ),
            "images": session.scalar(select(func.count()).select_from(tables.Image)),
            "rejected": session.scalar(select(func.count()).select_from(tables.RejectedFile)),
        }
    engine.dispose()
    return {k: int(v or 0) for k, v in counts.items()}


def test_batch_records_every_input_and_quarantines_bad_ones(
    tmp_path: Path, settings: Settings, models: pipeline.Models, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        summary = run_batch(folder, Site.at(settings, out), models=models)
    assert summary.studies["processed"] == 2
    assert summary.studies["ineligible"] == 2  # MR, CT SOP class tagged Modality CR
    assert summary.studies["failed"] == 3  # short pixel data, RGB-tagged grayscale, no pixels
    assert summary.rejected_files == 3  # empty, not DICOM, truncated header
    quarantine = out / "_quarantine"
    copies = sorted(quarantine.glob("*.bin"))
    assert len(copies) == 6  # the three rejected files + the three undecodable ones
    reasons = [json.loads(p.read_text())["reason"] for p in quarantine.glob("*.json")]
    assert any("cannot be decoded" in r for r in reasons)
    assert any("PhotometricInterpretation" in r for r in reasons)
    assert any("no Pixel Data" in r for r in reasons)
    assert (folder / "truncated.dcm").exists(), "quarantine copies, never moves"
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    counts = _counts(url)
    assert counts["studies"] == 7 and counts["current"] == 7 and counts["rejected"] == 6
    # No patient names or IDs in the log at the default level.
    text = caplog.text
    assert "PHANTOM^NUMBER" not in text and "SYN-011" not in text
    assert "1.2.826.0.1.3680043.10.1411." in text  # UIDs are logged instead

    # Re-running the same input adds no rows and reprocesses nothing.
    again = run_batch(folder, Site.at(settings, out), models=models)
    assert again.studies["unchanged"] == 4  # failed studies are retried, others unchanged
    assert _counts(url) == counts

    # A changed study supersedes: one current outcome, the old one kept as superseded.
    extra = to_dataset(make_phantom(99, (384, 384)), "11/0", instance=2)
    save(extra, folder / "phantoms" / "phantom_00000" / "late.dcm")
    run_batch(folder, Site.at(settings, out), models=models)
    after = _counts(url)
    assert after["studies"] == 7 and after["current"] == 7
    assert (
        after["outcomes"] == counts["outcomes"] + 1
    )  # the changed study; the retry replaced in place
    engine = create_engine(url)
    with session_factory(engine)() as session:
        superseded = session.scalars(
            select(tables.Outcome).where(tables.Outcome.superseded_at.is_not(None))
        ).all()
        assert len(superseded) >= 1 and not any(o.is_current for o in superseded)
    engine.dispose()


def _schema_diff(url: str) -> list[object]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), tables.Base.metadata)
    engine.dispose()
    return list(diff)


def test_alembic_upgrade_gives_the_models_schema_on_sqlite(tmp_path: Path) -> None:
    assert _schema_diff(f"sqlite:///{tmp_path / 'empty.sqlite'}") == []


@pytest.mark.postgres
def test_alembic_upgrade_gives_the_models_schema_on_postgres(postgres_url: str) -> None:
    assert _schema_diff(postgres_url) == []


@pytest.mark.postgres
def test_batch_on_postgres(
    tmp_path: Path, postgres_url: str, settings: Settings, models: pipeline.Models
) -> None:
    write_studies(tmp_path / "in", 1, seed=12, size=(256, 256))
    configured = settings.model_copy(
        update={"database": settings.database.model_copy(update={"url": postgres_url})}
    )
    summary = run_batch(tmp_path / "in", Site.at(configured, tmp_path / "out"), models=models)
    assert summary.studies["processed"] == 1
    assert _counts(postgres_url)["current"] == 1


def test_cli_process_results_and_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXRBATCH_SEGMENTATION__DEVICE", "cpu")
    write_studies(tmp_path / "in", 1, seed=13, size=(256, 256))
    (tmp_path / "in" / "junk.bin").write_bytes(b"\x00" * 10)
    runner = CliRunner()
    result = runner.invoke(app, ["process", str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "processed" in result.output and "quarantined files" in result.output
    listed = runner.invoke(app, ["results", "--out", str(tmp_path / "out"), "--format", "json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert len(rows) == 1 and rows[0]["status"] == "processed" and "triage" in rows[0]
    assert (
        runner.invoke(
            app, ["process", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]
        ).exit_code
        == 2
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[segmentation]\nbackend = 'nonexistent'\n")
    assert (
        runner.invoke(
            app,
            ["process", str(tmp_path / "in"), "--out", str(tmp_path / "o3"), "--config", str(bad)],
        ).exit_code
        == 2
    )
    missing = tmp_path / "vitb.toml"
    missing.write_text("[segmentation]\nbackend = 'medsam-vitb'\n")
    result = runner.invoke(
        app,
        ["process", str(tmp_path / "in"), "--out", str(tmp_path / "o4"), "--config", str(missing)],
    )
    assert result.exit_code == 2 and "medsam_checkpoint" in result.output


def test_studies_in_flight_share_the_models_and_match_one_at_a_time(
    tmp_path: Path, settings: Settings, models: pipeline.Models
) -> None:
    """processing.study_threads: several studies at once in one process give the same
    outcomes and scores as one study at a time."""
    write_studies(tmp_path / "in", 3, seed=21, size=(320, 320))
    results = {}
    for threads in (1, 3):
        configured = settings.model_copy(
            update={"processing": settings.processing.model_copy(update={"study_threads": threads})}
        )
        out = tmp_path / f"out{threads}"
        summary = run_batch(tmp_path / "in", Site.at(configured, out), models=models)
        assert summary.studies == {"processed": 3}
        results[threads] = {
            p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")
        }
        assert _counts(f"sqlite:///{out / 'cxrbatch.sqlite'}")["current"] == 3
    assert results[1].keys() == results[3].keys() and len(results[1]) == 3
    for uid, one in results[1].items():
        many = results[3][uid]
        assert many["no_finding_score"] == one["no_finding_score"]
        for a, b in zip(one["images"], many["images"], strict=True):
            assert a["lungs"] == b["lungs"] and a["findings"] == b["findings"]


def test_a_worker_keeps_study_threads_studies_in_flight(
    tmp_path: Path,
    settings: Settings,
    models: pipeline.Models,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two studies must be in the pipeline at the same moment: each waits for the other at
    a barrier, which one-at-a-time processing would break (the barrier times out, and
    the study fails with that error)."""
    import threading

    write_studies(tmp_path / "in", 2, seed=22, size=(256, 256))
    run = pipeline.run
    barrier = threading.Barrier(2)
    wait = {"seconds": 30.0}

    def meet(*args: Any, **kwargs: Any) -> Any:
        barrier.wait(wait["seconds"])
        return run(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run", meet)
    for threads, seconds, expected in ((2, 30.0, "processed"), (1, 0.5, "failed")):
        barrier.reset()
        wait["seconds"] = seconds
        configured = settings.model_copy(
            update={"processing": settings.processing.model_copy(update={"study_threads": threads})}
        )
        out = tmp_path / f"out{threads}"
        summary = run_batch(tmp_path / "in", Site.at(configured, out), models=models)
        assert summary.studies == {expected: 2}, threads
        if expected == "failed":
            assert all("BrokenBarrierError" in (r.reason or "") for r in summary.reports)


def test_force_runs_again_the_studies_whose_outcome_stands(
    tmp_path: Path, settings: Settings, models: pipeline.Models
) -> None:
    write_studies(tmp_path / "in", 2, seed=23, size=(256, 256))
    site = Site.at(settings, tmp_path / "out")
    assert run_batch(tmp_path / "in", site, models=models).studies == {"processed": 2}
    assert run_batch(tmp_path / "in", site, models=models).studies == {"unchanged": 2}
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/result.json")}
    forced = run_batch(tmp_path / "in", site, models=models, force=True)
    assert forced.studies == {"processed": 2}
    assert len(written) == 2 and all(p.stat().st_mtime_ns > t for p, t in written.items())
    counted = _counts(f"sqlite:///{tmp_path / 'out' / 'cxrbatch.sqlite'}")
    assert counted["current"] == 2


def test_a_batch_a_crash_interrupted_is_finished_by_the_next_run(
    tmp_path: Path, settings: Settings, models: pipeline.Models
) -> None:
    """`process` killed after queueing its studies, one of them in hand: the next run (here
    on an empty folder) takes the dead process's job back and finishes both."""
    import socket

    from cxrbatch.batch import enqueue
    from cxrbatch.db.leased import process_space
    from cxrbatch.dicom.discover import discover

    written = write_studies(tmp_path / "in", 2, seed=24, size=(256, 256))
    site = Site.at(settings, tmp_path / "out")
    site.out_dir.mkdir()
    upgrade(site.database_url)
    studies, _ = discover(tmp_path / "in")
    with site.database() as database:
        enqueue(database.sessions, studies, site)
        with database.sessions.begin() as session:
            job = session.scalar(
                select(tables.Job).where(
                    tables.Job.study_instance_uid == written[0].study_instance_uid
                )
            )
            assert job is not None
            # Held by a process of this host that no longer runs (pid 2^22 + 1 cannot be).
            job.status, job.attempts = "running", 1
            job.lease_owner = f"{socket.gethostname()}:4194305:deadbeef:{process_space()}"
    (tmp_path / "empty").mkdir()
    summary = run_batch(tmp_path / "empty", site, models=models)
    assert summary.studies == {"processed": 2}
    assert {r.study_instance_uid for r in summary.reports} == {
        s.study_instance_uid for s in written
    }

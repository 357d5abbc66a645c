"""Folder ingest and the daemon's worker, in process: complete files only, spool moves
(same and across file systems), read-only mode, duplicates and conflicts, crash recovery of
the spool, late arrivals superseding outcomes, the disk watermark, network-FS refusal and
structured outcome logs."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cxrbatch import logs, pipeline
from cxrbatch import worker as worker_module
from cxrbatch.config import Settings, load_settings
from cxrbatch.db import models as tables
from cxrbatch.db.session import ensure_local_sqlite, make_engine, session_factory, upgrade
from cxrbatch.errors import ConfigError
from cxrbatch.ingest import spool as spool_module
from cxrbatch.ingest.folder import FolderIngest
from cxrbatch.ingest.spool import Spool, Taken
from cxrbatch.site import Site
from cxrbatch.worker import QueueWorker
from cxrbatch_training.synthetic import make_phantom, save, to_dataset, write_study


def _settings(**ingest: Any) -> Settings:
    return load_settings(
        None,
        segmentation={"device": "cpu"},
        ingest={"study_stable_seconds": 0.0, **ingest},
        queue={"poll_interval_seconds": 0.1, "min_free_disk_mb": 0.0},
    )


class _Site:
    """An export folder, an output folder with its SQLite DB, a spool and an ingest."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.settings = settings
        self.input = root / "export"
        self.out = root / "out"
        self.input.mkdir(parents=True)
        self.out.mkdir(parents=True)
        self.url = f"sqlite:///{self.out / 'cxrbatch.sqlite'}"
        upgrade(self.url)
        self.engine = make_engine(self.url)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        self.spool = Spool(
            self.out / "_spool",
            self.sessions,
            self.out / "_quarantine",
            mode=settings.ingest.mode,
            study_stable_seconds=settings.ingest.study_stable_seconds,
        )
        self.ingest = FolderIngest(self.input, self.spool, settings.ingest)

    def count(self, table: type[tables.Base]) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(table)) or 0)

    def instances(self) -> list[tables.Instance]:
        with self.sessions() as session:
            return list(session.scalars(select(tables.Instance)))


@pytest.fixture()
def phantom_bytes(tmp_path: Path) -> bytes:
    path = write_study(tmp_path / "gen", 0, seed=21, size=(256, 256)).path
    return path.read_bytes()


def _run_ingest_until(site: _Site, done: threading.Event, tick: float = 0.05) -> threading.Thread:
    def loop() -> None:
        while not done.is_set():
            site.ingest.step()
            time.sleep(tick)
        site.ingest.step()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("observer", ["polling", "native"])
def test_slowly_written_file_is_taken_only_when_complete(
    tmp_path: Path, phantom_bytes: bytes, observer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Quiet time shorter than the pauses would be wrong; here it is longer than each pause,
    # and the native observer also gets the writer's close event.
    settings = _settings(
        observer=observer,
        polling_interval_seconds=0.1,
        quiet_seconds=1.0,
        trust_close_events=observer == "native",
        reconcile_interval_seconds=0.2,
    )
    site = _Site(tmp_path, settings)
    seen_sizes: list[int] = []
    take = Spool.take

    def spy(self: Spool, path: Path) -> Taken:
        seen_sizes.append(path.stat().st_size)
        return take(self, path)

    monkeypatch.setattr(Spool, "take", spy)
    site.ingest.start()
    done = threading.Event()
    thread = _run_ingest_until(site, done)
    target = site.input / "incoming" / "IM00001"  # no extension, nested folder
    target.parent.mkdir()
    chunks = [phantom_bytes[i : i + 20_000] for i in range(0, len(phantom_bytes), 20_000)]
    with target.open("wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
            handle.flush()
            time.sleep(0.3)
    deadline = time.monotonic() + 10
    while site.count(tables.Instance) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    thread.join()
    site.ingest.stop()
    assert len(chunks) >= 4
    assert seen_sizes == [len(phantom_bytes)]  # read once, and only when complete
    (instance,) = site.instances()
    stored = Path(instance.path)
    assert stored.read_bytes() == phantom_bytes and not target.exists()
    assert instance.sha256 == hashlib.sha256(phantom_bytes).hexdigest()
    with site.sessions() as session:
        job = session.scalar(select(tables.Job))
        assert job is not None and job.status == "queued"


def test_renamed_in_file_is_taken_at_once(tmp_path: Path, phantom_bytes: bytes) -> None:
    site = _Site(tmp_path, _settings(quiet_seconds=3600.0, reconcile_interval_seconds=3600.0))
    site.ingest.start()
    site.ingest.step()  # the first scan (empty folder)
    staging = site.input / ".IM1.partial"
    staging.write_bytes(phantom_bytes)
    os.rename(staging, site.input / "IM1")
    deadline = time.monotonic() + 10
    while site.count(tables.Instance) == 0 and time.monotonic() < deadline:
        site.ingest.step()
        time.sleep(0.05)
    site.ingest.stop()
    assert site.count(tables.Instance) == 1  # long before the hour of quiet time


def test_a_file_that_cannot_be_taken_does_not_stop_the_ingest(
    tmp_path: Path,
    phantom_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    site = _Site(tmp_path, _settings(quiet_seconds=0.0, reconcile_interval_seconds=3600.0))
    blocked = site.input / "PATIENT^NAME.dcm"
    blocked.write_bytes(phantom_bytes)
    other = write_study(tmp_path / "gen", 1, seed=24, size=(256, 256)).path
    shutil.copyfile(other, site.input / "IM2")
    take = Spool.take
    failures = iter([True])  # the first take of the blocked file fails, as on EACCES

    def flaky(self: Spool, path: Path) -> Taken:
        if path == blocked and next(failures, False):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return take(self, path)

    monkeypatch.setattr(Spool, "take", flaky)
    site.ingest.step()  # raises nothing; the other file is taken
    assert site.ingest.counts["error"] == 1 and site.ingest.counts["received"] == 1
    assert blocked.exists() and site.ingest.pending() == 1
    assert any("Permission denied" in r.getMessage() for r in caplog.records)
    assert not any("PATIENT" in r.getMessage() for r in caplog.records)
    site.ingest.step()  # tried again: taken
    assert site.ingest.counts["received"] == 2 and not blocked.exists()


def test_duplicates_are_dropped_and_conflicts_kept_in_quarantine(
    tmp_path: Path, phantom_bytes: bytes
) -> None:
    site = _Site(tmp_path, _settings())
    first, copy = site.input / "a.dcm", site.input / "b.dcm"
    first.write_bytes(phantom_bytes)
    copy.write_bytes(phantom_bytes)
    assert site.spool.take(first) is Taken.RECEIVED
    assert site.spool.take(copy) is Taken.DUPLICATE
    assert not copy.exists()
    (instance,) = site.instances()
    assert instance.duplicates == 1
    # Same SOPInstanceUID, different content (another pixel value).
    import pydicom

    ds = pydicom.dcmread(Path(instance.path))
    ds.WindowWidth = 1000
    conflicting = site.input / "c.dcm"
    ds.save_as(conflicting)
    assert site.spool.take(conflicting) is Taken.CONFLICT
    with site.sessions() as session:
        (rejected,) = session.scalars(select(tables.RejectedFile)).all()
    assert rejected.reason.startswith("conflict")
    assert rejected.quarantine_path and Path(rejected.quarantine_path).is_file()
    assert not conflicting.exists()  # moved into quarantine (copied, then removed)
    assert Path(instance.path).read_bytes() == phantom_bytes  # the first one is kept
    # Bad input: quarantined with its reason, never deleted without a copy.
    bad = site.input / "notes.txt"
    bad.write_text("not dicom")
    assert site.spool.take(bad) is Taken.REJECTED
    with site.sessions() as session:
        reasons = {r.reason for r in session.scalars(select(tables.RejectedFile))}
    assert any("not a DICOM file" in r for r in reasons)
    assert len(list((site.out / "_quarantine").glob("*.bin"))) == 2


def test_cross_filesystem_move_copies_fsyncs_and_verifies(
    tmp_path: Path, phantom_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = _Site(tmp_path, _settings())

    def no_rename(_src: object, _dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(spool_module.os, "rename", no_rename)
    source = site.input / "x.dcm"
    source.write_bytes(phantom_bytes)
    assert site.spool.take(source) is Taken.RECEIVED
    (instance,) = site.instances()
    assert Path(instance.path).read_bytes() == phantom_bytes and not source.exists()
    assert not list((site.out / "_spool").rglob("*.tmp"))


def test_read_only_mode_leaves_files_and_does_not_take_them_twice(
    tmp_path: Path, phantom_bytes: bytes
) -> None:
    settings = _settings(mode="read-only", quiet_seconds=0.0)
    site = _Site(tmp_path, settings)
    source = site.input / "IM1"
    source.write_bytes(phantom_bytes)
    site.ingest.step()
    assert source.exists() and site.count(tables.Instance) == 1
    assert site.instances()[0].path == str(source)
    restarted = FolderIngest(site.input, site.spool, settings.ingest)
    restarted._taken = restarted._known_sources()
    restarted.step()
    assert restarted.counts["received"] == 0 and restarted.counts["duplicate"] == 0
    assert site.instances()[0].duplicates == 0


def test_spool_file_without_a_row_is_recovered_after_a_crash(
    tmp_path: Path, phantom_bytes: bytes
) -> None:
    site = _Site(tmp_path, _settings())
    orphan = site.out / "_spool" / "1.2.3" / "1.2.3.4.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(phantom_bytes)  # moved in, then killed before the row was written
    (orphan.parent / ".half.dcm.tmp").write_bytes(b"partial copy")
    assert site.spool.recover() == 1
    (instance,) = site.instances()
    assert instance.path == str(orphan)
    assert not (orphan.parent / ".half.dcm.tmp").exists()
    assert site.spool.recover() == 0  # idempotent
    assert site.count(tables.Job) == 1


def _second_instance(tmp_path: Path, first: Path) -> Path:
    """Another frontal image of the same study (same study seed, instance 2)."""
    ds = to_dataset(make_phantom(99, (256, 256)), "21/0", instance=2)
    import pydicom

    assert ds.StudyInstanceUID == pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID
    return save(ds, tmp_path / "late" / "IM2")


def test_late_arrival_requeues_the_study_and_supersedes_its_outcome(
    tmp_path: Path, phantom_bytes: bytes, models: pipeline.Models
) -> None:
    site = _Site(tmp_path, _settings())
    first = site.input / "IM1"
    first.write_bytes(phantom_bytes)
    assert site.spool.take(first) is Taken.RECEIVED
    worker = QueueWorker(Site(site.settings, site.out, site.url), models)
    assert worker.run(until_idle=True) == 1
    late = _second_instance(tmp_path, site.instances()[0].path and Path(site.instances()[0].path))
    assert site.spool.take(late) is Taken.RECEIVED
    worker = QueueWorker(Site(site.settings, site.out, site.url), models)
    assert worker.run(until_idle=True) == 1
    with site.sessions() as session:
        outcomes = session.scalars(select(tables.Outcome).order_by(tables.Outcome.id)).all()
        assert [o.is_current for o in outcomes] == [False, True]
        assert outcomes[0].superseded_at is not None
        current = outcomes[1]
        assert current.status == "processed" and len(current.images) == 2
        job = session.scalar(select(tables.Job))
        assert job is not None and job.status == "done" and job.outcome_id == current.id
    roots = Site(site.settings, site.out, site.url).roots  # stored paths are relative to them
    study_dir = roots.resolve(next(iter(current.outputs["seg"].values()))).parent
    kinds = sorted(p.name.split("_")[0] for p in study_dir.iterdir())
    assert [k for k in kinds if k != "maps"] == [  # maps only where a label was called
        "gsps",
        "gsps",
        "key",
        "key",
        "result.json",
        "seg",
        "seg",
        "sr.dcm",
    ]


def test_a_worker_keeps_study_threads_studies_in_flight(
    tmp_path: Path, models: pipeline.Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """processing.study_threads = 2: a daemon worker has two claims in hand at once. Each
    study waits inside processing for another at a barrier, which one claim at a time
    would break (BrokenBarrierError); all jobs end done with one outcome each."""
    base = _settings()
    settings = base.model_copy(
        update={"processing": base.processing.model_copy(update={"study_threads": 2})}
    )
    site = _Site(tmp_path, settings)
    for index in range(4):
        study = write_study(tmp_path / "gen", index, seed=24, size=(256, 256))
        assert site.spool.take(study.path) is Taken.RECEIVED
    worker = QueueWorker(Site(settings, site.out, site.url), models)
    barrier = threading.Barrier(2, timeout=60)
    real = worker.processor.run
    claims_in_hand: list[int] = []

    def meet_then_run(study: Any, **kwargs: Any) -> Any:
        barrier.wait()
        claims_in_hand.append(len(worker.current))
        return real(study, **kwargs)

    monkeypatch.setattr(worker.processor, "run", meet_then_run)
    assert worker.run(until_idle=True) == 4
    assert claims_in_hand == [2, 2, 2, 2] and worker.current == []
    with site.sessions() as session:
        jobs = session.scalars(select(tables.Job)).all()
        assert sorted(j.status for j in jobs) == ["done"] * 4
    assert site.count(tables.Outcome) == 4


def test_worker_pauses_under_the_disk_watermark_and_resumes(
    tmp_path: Path,
    phantom_bytes: bytes,
    models: pipeline.Models,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # In the environment: it wins over load_settings' arguments (conftest sets it to 0).
    monkeypatch.setenv("CXRBATCH_QUEUE__MIN_FREE_DISK_MB", "500")
    settings = load_settings(
        None,
        segmentation={"device": "cpu"},
        ingest={"study_stable_seconds": 0.0},
        queue={"poll_interval_seconds": 0.05},
    )
    assert settings.queue.min_free_disk_mb == 500.0
    site = _Site(tmp_path, settings)
    (site.input / "IM1").write_bytes(phantom_bytes)
    assert site.spool.take(site.input / "IM1") is Taken.RECEIVED
    readings = iter([100.0, 100.0, 100.0])  # three checks under the watermark, then plenty
    monkeypatch.setattr(worker_module, "free_disk_mb", lambda _paths: next(readings, 10_000.0))
    caplog.set_level(logging.INFO)
    worker = QueueWorker(Site(settings, site.out, site.url), models)
    assert worker.run(until_idle=True) == 1
    messages = [r.getMessage() for r in caplog.records]
    paused = [i for i, m in enumerate(messages) if "under the watermark" in m]
    resumed = [i for i, m in enumerate(messages) if "claiming work again" in m]
    finished = [i for i, m in enumerate(messages) if "job of study" in m]
    assert len(paused) == 1 and resumed and paused[0] < resumed[0] < finished[0]


def test_sqlite_on_a_network_file_system_is_refused(tmp_path: Path) -> None:
    mounts = f"server:/export {tmp_path} nfs4 rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"
    with pytest.raises(ConfigError, match="network file systems"):
        ensure_local_sqlite(f"sqlite:///{tmp_path / 'db' / 'cxrbatch.sqlite'}", mounts)
    ensure_local_sqlite(f"sqlite:///{tmp_path / 'cxrbatch.sqlite'}", "/dev/sda1 / ext4 rw 0 0\n")
    ensure_local_sqlite("postgresql+psycopg://db/cxrbatch", mounts)  # not SQLite: fine


def test_one_json_log_line_per_study_outcome_without_patient_data(
    tmp_path: Path, models: pipeline.Models
) -> None:
    site = _Site(tmp_path, _settings())
    study = write_study(tmp_path / "gen", 3, seed=22, size=(256, 256))
    assert site.spool.take(study.path) is Taken.RECEIVED
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)  # the default level
    try:
        QueueWorker(Site(site.settings, site.out, site.url), models).run(until_idle=True)
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    outcomes = [line for line in lines if line.get("event") == "study_outcome"]
    assert len(outcomes) == 1
    (line,) = outcomes
    assert line["study_instance_uid"] == study.study_instance_uid
    assert line["status"] == "processed" and set(line["timings"]) >= {"decode", "segment"}
    text = stream.getvalue()
    assert "PHANTOM" not in text and "SYN-022" not in text and "19700101" not in text


def test_cli_queries_filters_worklist_status_and_retry(
    tmp_path: Path, classified_models: tuple[Settings, pipeline.Models]
) -> None:
    from typer.testing import CliRunner

    from cxrbatch.cli import app

    configured, loaded = classified_models
    out = tmp_path / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    upgrade(url)
    sessions = session_factory(make_engine(url))
    spool = Spool(out / "_spool", sessions, out / "_q", study_stable_seconds=0.0)
    for index in range(3):
        study = write_study(tmp_path / "gen", index, seed=23, size=(256, 256))
        assert spool.take(study.path) is Taken.RECEIVED
    (tmp_path / "gen" / "broken").mkdir()
    settings = configured.model_copy(
        update={"queue": configured.queue.model_copy(update={"poll_interval_seconds": 0.05})}
    )
    QueueWorker(Site(settings, out, url), loaded).run(until_idle=True)
    runner = CliRunner()
    listed = json.loads(
        runner.invoke(app, ["results", "--out", str(out), "--format", "json"]).stdout
    )
    assert len(listed) == 3 and {r["status"] for r in listed} == {"processed"}
    assert all(r["synthetic_model"] for r in listed)
    triaged = {r["triage"] for r in listed}
    for triage in triaged:
        subset = runner.invoke(
            app, ["results", "--out", str(out), "--format", "json", "--triage", triage]
        )
        assert {r["triage"] for r in json.loads(subset.stdout)} == {triage}

    def results(*filters: str) -> list[dict[str, Any]]:
        invoked = runner.invoke(app, ["results", "--out", str(out), "--format", "json", *filters])
        assert invoked.exit_code == 0, invoked.output
        return list(json.loads(invoked.stdout))

    assert results("--since", "2999-01-01") == []
    assert len(results("--until", "2999-01-01")) == 3
    assert len(results("--label", "Mass", "--min-probability", "0")) == 3
    assert results("--label", "Mass", "--min-probability", "1") == []
    assert results("--status", "failed") == []
    ranked = json.loads(
        runner.invoke(app, ["worklist", "--out", str(out), "--format", "json"]).stdout
    )
    order = [(r["triage"] != "abnormal", r["screening_no_finding_score"]) for r in ranked]
    assert order == sorted(order) and [r["rank"] for r in ranked] == [1, 2, 3]
    csv_text = runner.invoke(app, ["results", "--out", str(out), "--format", "csv"]).stdout
    assert csv_text.splitlines()[0].startswith(
        "study_instance_uid,accession_number,patient_id,study_date,modality,status,triage"
    )
    # Each label's probability, then the calls of the labels with a threshold (Mass here).
    assert csv_text.splitlines()[0].endswith(
        "p_Mass,p_Nodule,p_Pneumonia,p_Edema,p_Fibrosis,call_Mass"
    )
    # A dead job shows in status and is queued again by `jobs retry`.
    with sessions.begin() as session:
        job = session.scalars(select(tables.Job)).first()
        assert job is not None
        job.status, job.last_error = "dead", "example: out of memory 5 times"
        dead_uid = job.study_instance_uid
    report = json.loads(
        runner.invoke(app, ["status", "--out", str(out), "--format", "json"]).stdout
    )
    assert report["jobs"]["dead"] == 1 and report["jobs"]["done"] == 2
    assert report["dead_jobs"][0]["study_instance_uid"] == dead_uid
    assert report["finished_last_hour"] >= 2
    retried = runner.invoke(app, ["jobs", "retry", "--out", str(out)])
    assert retried.exit_code == 0 and "1 dead job" in retried.stdout
    with sessions() as session:
        assert (
            session.scalar(
                select(tables.Job.status).where(tables.Job.study_instance_uid == dead_uid)
            )
            == "queued"
        )
    shutil.rmtree(tmp_path / "gen")


def test_a_dicomdir_in_the_export_folder_is_recorded_once_and_left_in_place(
    tmp_path: Path,
) -> None:
    from tests.conftest import real_file

    site = _Site(tmp_path, _settings(quiet_seconds=0.0, reconcile_interval_seconds=0.5))
    dicomdir = site.input / "DICOMDIR"
    shutil.copyfile(real_file("DICOMDIR"), dicomdir)
    now = time.monotonic()
    for tick in range(3):  # three full scans of the export folder
        site.ingest.step(now + tick)
    assert dicomdir.exists()  # not the product's to delete (move mode moves instances only)
    with site.sessions() as session:
        (row,) = session.scalars(select(tables.RejectedFile)).all()
    assert row.reason.startswith("skipped: a DICOMDIR") and row.quarantine_path is None
    assert site.ingest.counts["rejected"] == 1  # taken once, not at every scan
    assert not (site.out / "_quarantine").exists() or not any((site.out / "_quarantine").iterdir())

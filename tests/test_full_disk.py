"""A full disk, or a results database that can take no more: one-line reasons, and a batch
that stops at once when outcomes cannot be recorded (instead of processing studies it
cannot record); a batch whose disk stays under the watermark stops with the studies left
queued (it used to wait forever), and Ctrl-C ends a batch that waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from cxrbatch import pipeline, worker
from cxrbatch.batch import run_batch
from cxrbatch.cli import app
from cxrbatch.config import Settings
from cxrbatch.db import models as tables
from cxrbatch.db.session import make_engine, session_factory
from cxrbatch.domain import StudyInput
from cxrbatch.errors import RecordingError, one_line
from cxrbatch.site import Site
from cxrbatch_training.synthetic import write_studies


def test_one_line_keeps_the_type_and_the_first_line_only() -> None:
    text = "disk full\nTraceback (most recent call last):\n  File 'x.py', line 1"
    assert one_line(RuntimeError(text)) == "RuntimeError: disk full"
    assert one_line(OSError(28, "No space left on device")).endswith("No space left on device")
    assert len(one_line(ValueError("x" * 1000))) == 300
    assert one_line(KeyError()) == "KeyError"


def test_a_failure_with_a_long_message_is_stored_as_one_line(
    tmp_path: Path, settings: Settings, models: pipeline.Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_studies(tmp_path / "in", 1, seed=31, size=(128, 128))

    def crash(*args: object, **kwargs: object) -> object:
        raise RuntimeError(
            "could not write\nTraceback (most recent call last):\n  File 'pipeline.py'\n"
        )

    monkeypatch.setattr(pipeline, "run", crash)
    summary = run_batch(tmp_path / "in", Site.at(settings, tmp_path / "out"), models=models)
    assert summary.studies["failed"] == 1
    engine = make_engine(f"sqlite:///{tmp_path / 'out' / 'cxrbatch.sqlite'}")
    with session_factory(engine)() as session:
        (outcome,) = session.query(tables.Outcome).all()
    engine.dispose()
    assert outcome.reason == "internal error: RuntimeError: could not write"


def test_no_new_study_starts_once_outcomes_cannot_be_recorded(
    tmp_path: Path, settings: Settings, models: pipeline.Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two studies in flight (study_threads 2) when the database fills up: both fail to
    record, the batch stops with the error, the other six never start."""
    write_studies(tmp_path / "in", 8, seed=33, size=(128, 128))
    started: list[str] = []
    lock = threading.Lock()
    real_run = pipeline.run

    def counted(study: StudyInput, *args: object, **kwargs: object) -> object:
        with lock:
            started.append(study.study_instance_uid)
        time.sleep(0.2)  # both loops have claimed before either records
        return real_run(study, *args, **kwargs)  # type: ignore[arg-type]

    def full(*args: object, **kwargs: object) -> object:
        raise OperationalError("INSERT INTO outcomes ...", {}, Exception("database is full"))

    monkeypatch.setattr(pipeline, "run", counted)
    monkeypatch.setattr(worker, "record_result", full)
    two = settings.model_copy(
        update={"processing": settings.processing.model_copy(update={"study_threads": 2})}
    )
    with pytest.raises(RecordingError):
        run_batch(tmp_path / "in", Site.at(two, tmp_path / "out"), models=models)
    assert len(started) == 2, started  # the two in flight; the other six never started


def _count_pipeline_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Study Instance UIDs pipeline.run is called with, in order (it still runs)."""
    ran: list[str] = []
    real_run = pipeline.run

    def counted(study: StudyInput, *args: object, **kwargs: object) -> object:
        ran.append(study.study_instance_uid)
        return real_run(study, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "run", counted)
    return ran


def test_process_stops_with_one_line_and_exit_2_when_the_database_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXRBATCH_SEGMENTATION__DEVICE", "cpu")
    write_studies(tmp_path / "in", 3, seed=32, size=(128, 128))
    ran = _count_pipeline_runs(monkeypatch)

    def full(*args: object, **kwargs: object) -> object:
        raise OperationalError(
            "INSERT INTO outcomes ...", {}, Exception("database or disk is full")
        )

    monkeypatch.setattr(worker, "record_result", full)
    result = CliRunner().invoke(
        app,
        ["process", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--study-threads", "1"],
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "cannot be recorded in the results database" in errors[0]
    assert errors[0].endswith("Exception: database or disk is full"), errors[0]
    assert len(ran) == 1  # the first study; the batch stopped there


def _job_statuses(out: Path) -> list[str]:
    """The statuses of the queue's jobs in the output folder's database, sorted."""
    engine = make_engine(f"sqlite:///{out / 'cxrbatch.sqlite'}")
    try:
        with session_factory(engine)() as session:
            return sorted(job.status for job in session.query(tables.Job))
    finally:
        engine.dispose()


def test_a_batch_whose_disk_stays_under_the_watermark_stops_and_the_next_run_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cxrbatch process` with the output's file system under queue.min_free_disk_mb for
    longer than queue.batch_disk_wait_seconds: exit 2 with one line, no study started, both
    left queued; with space again, the next run on that output folder processes both."""
    monkeypatch.setenv("CXRBATCH_SEGMENTATION__DEVICE", "cpu")
    monkeypatch.setenv("CXRBATCH_QUEUE__MIN_FREE_DISK_MB", "1024")
    monkeypatch.setenv("CXRBATCH_QUEUE__BATCH_DISK_WAIT_SECONDS", "0.5")
    monkeypatch.setenv("CXRBATCH_QUEUE__POLL_INTERVAL_SECONDS", "0.05")
    write_studies(tmp_path / "in", 2, seed=34, size=(128, 128))
    ran = _count_pipeline_runs(monkeypatch)
    monkeypatch.setattr(worker, "free_disk_mb", lambda _paths: 100.0)
    command = ["process", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    started = time.monotonic()
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    assert time.monotonic() - started < 120
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert "(100 MiB) stayed under queue.min_free_disk_mb (1024 MiB)" in text, text
    assert "stay queued" in text, text
    assert ran == []
    assert _job_statuses(tmp_path / "out") == ["queued", "queued"]

    monkeypatch.setattr(worker, "free_disk_mb", lambda _paths: 10_000.0)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert len(ran) == 2
    assert _job_statuses(tmp_path / "out") == ["done", "done"]


def test_a_batch_with_nothing_left_to_run_ends_at_once_under_the_watermark(
    tmp_path: Path, settings: Settings, models: pipeline.Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing queued (an input already processed, an empty folder): the batch has nothing
    to write, so a low disk neither delays nor fails it."""
    queue = settings.queue.model_copy(
        update={"min_free_disk_mb": 1024.0, "batch_disk_wait_seconds": 30.0}
    )
    low = settings.model_copy(update={"queue": queue})
    monkeypatch.setattr(worker, "free_disk_mb", lambda _paths: 100.0)
    (tmp_path / "in").mkdir()
    started = time.monotonic()
    summary = run_batch(tmp_path / "in", Site.at(low, tmp_path / "out"), models=models)
    assert sum(summary.studies.values()) == 0
    assert time.monotonic() - started < 10  # not the 30 s wait, nor its error


def test_ctrl_c_ends_a_batch_that_waits_for_disk_space(tmp_path: Path) -> None:
    """SIGINT to `cxrbatch process` (two study threads) while it waits under the watermark:
    it exits within seconds. Before, the interrupted main thread waited for claim loops that
    nothing told to stop, and the command hung until killed."""
    write_studies(tmp_path / "in", 1, seed=35, size=(128, 128))
    env = {
        **os.environ,
        "CXRBATCH_SEGMENTATION__DEVICE": "cpu",
        "CXRBATCH_QUEUE__MIN_FREE_DISK_MB": "1e15",  # no disk has that much free
        "CXRBATCH_QUEUE__BATCH_DISK_WAIT_SECONDS": "3600",
        "CXRBATCH_QUEUE__POLL_INTERVAL_SECONDS": "0.1",
    }
    command = ["process", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    process = subprocess.Popen(
        [sys.executable, "-m", "cxrbatch.cli", *command, "--study-threads", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: a shell's background job may have SIGINT ignored, and that
        # would pass down to the command.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    seen: list[str] = []
    try:
        for line in process.stdout:  # the log, until the workers pause
            seen.append(line)
            if "under the watermark" in line:
                break
        assert any("under the watermark" in line for line in seen), "".join(seen)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode != 0, "".join(seen) + rest
    assert _job_statuses(tmp_path / "out") == ["queued"]

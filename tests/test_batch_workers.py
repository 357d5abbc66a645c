"""`cxrbatch process --workers N`: a study that kills its worker process (out of memory, a
crash in native code) is found, recorded as failed with the reason, and costs no other
study its outcome; workers that cannot start stop the batch with a clear error."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from cxrbatch import pipeline
from cxrbatch.batch import run_batch
from cxrbatch.config import Settings
from cxrbatch.db import models as tables
from cxrbatch.db.jobs import Claim
from cxrbatch.db.session import make_engine, session_factory
from cxrbatch.errors import CxrBatchError
from cxrbatch.site import Site
from cxrbatch.worker import Turns
from cxrbatch_training.synthetic import write_studies

# Imported by every Python process started while it is on PYTHONPATH: the spawned worker
# processes kill themselves (SIGKILL, as the kernel's OOM killer does) on one study.
KILLER = """
import os
import threading
import signal

if os.environ.get("CXRBATCH_TEST_KILL_STUDY"):
    from cxrbatch import pipeline

    _run = pipeline.run

    def run(study, *args, **kwargs):
        if study.study_instance_uid == os.environ["CXRBATCH_TEST_KILL_STUDY"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return _run(study, *args, **kwargs)

    pipeline.run = run
"""


def _current_outcomes(out: Path) -> dict[str, tables.Outcome]:
    engine = make_engine(f"sqlite:///{out / 'cxrbatch.sqlite'}")
    with session_factory(engine)() as session:
        rows = session.execute(
            select(tables.Study.study_instance_uid, tables.Outcome)
            .join(tables.Outcome, tables.Outcome.study_id == tables.Study.id)
            .where(tables.Outcome.is_current)
        ).all()
        session.expunge_all()
    engine.dispose()
    return {uid: outcome for uid, outcome in rows}


def test_a_study_that_kills_its_worker_costs_no_other_study(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    models: pipeline.Models,
) -> None:
    studies = write_studies(tmp_path / "in", 4, seed=31, size=(256, 256))
    poison = studies[1].study_instance_uid
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILLER)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("CXRBATCH_TEST_KILL_STUDY", poison)
    out = tmp_path / "out"

    # 2 workers x 2 studies in flight: the poisoned study's worker dies, and the pool with
    # it; whatever was in flight is retried alone (worker.Turns), so the poisoned study is
    # found and the study that was only beside it is processed. (Before Turns, the two
    # were claimed together again by one worker now and then, and both failed.)
    summary = run_batch(tmp_path / "in", Site.at(settings, out), workers=2)

    assert summary.studies == {"processed": 3, "failed": 1}
    (failed,) = [r for r in summary.reports if r.status == "failed"]
    assert failed.study_instance_uid == poison
    assert failed.reason is not None and "worker process died" in failed.reason
    outcomes = _current_outcomes(out)
    assert set(outcomes) == {s.study_instance_uid for s in studies}
    assert outcomes[poison].status == "failed"
    assert "worker process died" in (outcomes[poison].reason or "")
    assert outcomes[poison].models and outcomes[poison].input_fingerprint
    for uid, outcome in outcomes.items():
        if uid != poison:
            assert outcome.status == "processed", (uid, outcome.reason)
            assert (out / uid / "result.json").is_file()

    # Recorded as failed, so the next run retries it (here in this process, unpoisoned)
    # and leaves the others alone.
    monkeypatch.delenv("CXRBATCH_TEST_KILL_STUDY")
    again = run_batch(tmp_path / "in", Site.at(settings, out), models=models)
    assert again.studies == {"processed": 1, "unchanged": 3}
    assert _current_outcomes(out)[poison].status == "processed"


def test_workers_that_cannot_load_their_models_stop_the_batch(
    tmp_path: Path, settings: Settings
) -> None:
    write_studies(tmp_path / "in", 2, seed=32, size=(256, 256))
    # A checkpoint that exists (the preflight check passes) but does not load: the workers
    # fail at start. (A missing one is refused before any worker starts, one line.)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    broken = settings.model_copy(
        update={
            "segmentation": settings.segmentation.model_copy(
                update={"backend": "medsam-vitb", "medsam_checkpoint": str(corrupt)}
            )
        }
    )
    with pytest.raises(CxrBatchError, match="before processing any study"):
        run_batch(tmp_path / "in", Site.at(broken, tmp_path / "out"), workers=2)
    missing = broken.model_copy(
        update={
            "segmentation": broken.segmentation.model_copy(
                update={"medsam_checkpoint": str(tmp_path / "none.pth")}
            )
        }
    )
    with pytest.raises(CxrBatchError, match="MedSAM ViT-B checkpoint not found"):
        run_batch(tmp_path / "in", Site.at(missing, tmp_path / "out2"), workers=2)


# The spawned workers find the results database full when they record.
FULL = """
import os
import threading

if os.environ.get("CXRBATCH_TEST_FULL_DATABASE"):
    from sqlalchemy.exc import OperationalError

    from cxrbatch import worker

    def full(*args, **kwargs):
        raise OperationalError("INSERT ...", {}, Exception("database or disk is full"))

    worker.record_result = full
"""


def test_workers_that_cannot_record_stop_the_batch_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    """As in one process: the batch stops with the database's reason, at once, instead of
    replacing worker after worker that cannot record either."""
    write_studies(tmp_path / "in", 3, seed=33, size=(256, 256))
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FULL)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("CXRBATCH_TEST_FULL_DATABASE", "1")
    with pytest.raises(CxrBatchError, match=r"cannot be recorded.*database or disk is full"):
        run_batch(tmp_path / "in", Site.at(settings, tmp_path / "out"), workers=2)
    assert _current_outcomes(tmp_path / "out") == {}


def test_a_study_whose_worker_died_runs_alone_in_the_next_one() -> None:
    """worker.Turns: a claim whose last attempt died with its worker waits for the
    studies in flight, and nothing starts beside it until it ends."""
    turns = Turns()
    normal = Claim(1, "1.2.1", attempts=1, generation=0, owner="o")
    suspect = Claim(2, "1.2.2", attempts=2, generation=0, owner="o", lost=True)
    other = Claim(3, "1.2.3", attempts=1, generation=0, owner="o")
    assert turns.take(normal)
    started = threading.Event()
    took: list[bool] = []
    waiting = threading.Thread(target=lambda: (took.append(turns.take(suspect)), started.set()))
    waiting.start()
    assert not started.wait(0.5)  # the study in flight finishes first
    assert turns.wait_while_alone(0.01)  # the loops claim nothing meanwhile
    assert not turns.take(other)  # one claimed at the same moment goes back
    turns.end(normal)
    assert started.wait(10) and took == [True]
    assert not turns.take(other)  # nothing beside it while it runs
    turns.end(suspect)
    waiting.join()
    assert not turns.wait_while_alone(0.01)
    assert turns.take(other) and turns.take(normal)  # two in flight again

"""`cxrbatch watch` as a hospital runs it: a real process on a real folder, killed with
SIGKILL at random moments and restarted, then drained with SIGTERM."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxrbatch_training.synthetic import write_studies

CONFIG = """
[segmentation]
device = "cpu"
[ingest]
quiet_seconds = 0.5
study_stable_seconds = 1.0
reconcile_interval_seconds = 2.0
[queue]
lease_seconds = 15.0
heartbeat_seconds = 2.0
poll_interval_seconds = 0.2
drain_grace_seconds = {grace}
min_free_disk_mb = 0.0
[logging]
level = "INFO"
format = "json"
"""


def _cxrbatch() -> list[str]:
    return [sys.executable, "-m", "cxrbatch.cli"]


class _Daemon:
    def __init__(self, root: Path, grace: float = 30.0, workers: int = 2) -> None:
        self.root = root
        self.export = root / "export"
        self.out = root / "out"
        self.export.mkdir(parents=True, exist_ok=True)
        self.config = root / "site.toml"
        self.config.write_text(CONFIG.format(grace=grace))
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.source: list[str] = [str(self.export)]  # or ["--listen", PORT]

    def start(self) -> None:
        self.starts += 1
        log = (self.root / f"daemon-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [
                *_cxrbatch(),
                "watch",
                *self.source,
                "--out",
                str(self.out),
                "--workers",
                str(self.workers),
                "--config",
                str(self.config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches the workers
        )

    def cleanup(self) -> None:
        """Never leave a daemon behind, whatever the test's outcome."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def kill9(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def terminate(self, timeout: float) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def query(self, sql: str) -> list[tuple[object, ...]]:
        database = self.out / "cxrbatch.sqlite"
        if not database.exists():
            return []
        with sqlite3.connect(database, timeout=30) as connection:
            try:
                return connection.execute(sql).fetchall()
            except sqlite3.OperationalError:  # schema not created yet
                return []

    def jobs(self, status: str) -> int:
        rows = self.query(f"SELECT count(*) FROM jobs WHERE status = '{status}'")
        return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]

    def wait_for(self, condition: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if callable(condition) and condition():
                return
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}): {self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}: {self.tail()}")

    def tail(self) -> str:
        logs = sorted(self.root.glob("daemon-*.log"))
        return logs[-1].read_text()[-3000:] if logs else ""


@pytest.fixture()
def daemons() -> Iterator[list[_Daemon]]:
    started: list[_Daemon] = []
    yield started
    for daemon in started:
        daemon.cleanup()


def _export(studies_dir: Path, export: Path, rng: random.Random) -> None:
    """Files arrive as a PACS writes them: some renamed into place, some written directly."""
    for index, path in enumerate(sorted(studies_dir.rglob("*.dcm"))):
        target = export / f"{path.parent.name}" / f"IM{index:04d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if rng.random() < 0.5:
            staging = target.parent / f".{target.name}.tmp"
            shutil.copyfile(path, staging)
            os.rename(staging, target)
        else:
            shutil.copyfile(path, target)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_restart_gives_exactly_one_outcome_each(
    tmp_path: Path, daemons: list[_Daemon]
) -> None:
    seed = int(os.environ.get("CXRBATCH_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"kill test seed {seed} (CXRBATCH_KILL_SEED to repeat)")
    studies = write_studies(tmp_path / "generated", 52, seed=31, size=(192, 192))
    daemon = _Daemon(tmp_path)
    daemons.append(daemon)
    daemon.start()
    _export(tmp_path / "generated", daemon.export, rng)
    kills = 0
    for _ in range(3):
        # Let it get going, then kill the whole process group at a random moment.
        daemon.wait_for(lambda: daemon.jobs("running") + daemon.jobs("done") > 0, 120, "work")
        time.sleep(rng.uniform(0.2, 4.0))
        daemon.kill9()
        kills += 1
        if daemon.jobs("done") == len(studies):
            break
        daemon.start()
    if daemon.process is None or daemon.process.poll() is not None:
        daemon.start()
    daemon.wait_for(lambda: daemon.jobs("done") == len(studies), 300, "all studies done")
    assert daemon.terminate(timeout=60) == 0
    assert kills >= 1

    # Exactly one current outcome per study, all processed; nothing running or lost.
    current = daemon.query(
        "SELECT s.study_instance_uid, count(*) FROM outcomes o JOIN studies s "
        "ON s.id = o.study_id WHERE o.is_current GROUP BY s.study_instance_uid"
    )
    assert sorted(uid for uid, _ in current) == sorted(s.study_instance_uid for s in studies)
    assert {n for _, n in current} == {1}
    assert daemon.query("SELECT DISTINCT status FROM outcomes WHERE is_current") == [("processed",)]
    assert daemon.jobs("running") == 0 and daemon.jobs("queued") == 0
    assert daemon.query("SELECT count(*) FROM instances") == [(len(studies),)]
    # One set of outputs per study, no temporaries anywhere, the export folder emptied.
    study_dirs = [p for p in daemon.out.iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert len(study_dirs) == len(studies)
    for folder in study_dirs:
        kinds = sorted(p.name.split("_")[0] for p in folder.iterdir())
        # A finding map only where the classifier called a label.
        kinds = [kind for kind in kinds if kind != "maps"]
        assert kinds == ["gsps", "key", "result.json", "seg", "sr.dcm"], kinds
    assert not [p for p in daemon.out.rglob("*") if p.name.endswith(".tmp")]
    assert not [p for p in daemon.export.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_sigterm_drains_the_study_in_hand_or_releases_it_after_the_grace(
    tmp_path: Path, daemons: list[_Daemon]
) -> None:
    write_studies(tmp_path / "generated", 4, seed=32, size=(768, 768))
    # Long grace: the studies in hand (one worker, processing.study_threads = 2 by default:
    # one or two, as the second claim came before the signal or not) finish, the rest stay
    # queued, exit code 0. The daemon passes the signal on to its workers at once: when it
    # waited for its ingest loop to stop first, a fast host finished all four (CI,
    # 2026-12-04: done was 4).
    daemon = _Daemon(tmp_path / "long", grace=60.0, workers=1)
    daemons.append(daemon)
    _export(tmp_path / "generated", daemon.export, random.Random(1))
    daemon.start()
    daemon.wait_for(lambda: daemon.jobs("running") >= 1, 120, "a running job")
    assert daemon.terminate(timeout=90) == 0
    assert daemon.jobs("running") == 0
    done = daemon.jobs("done")
    assert 1 <= done <= 2 and daemon.jobs("queued") == 4 - done
    # No grace: the studies in hand are given back at once, their attempts not counted.
    daemon = _Daemon(tmp_path / "none", grace=0.0, workers=1)
    daemons.append(daemon)
    _export(tmp_path / "generated", daemon.export, random.Random(2))
    daemon.start()
    # Signalled while at most one study is done: at least one is never claimed (one
    # worker holds two), so the queue keeps jobs whose attempts can be read. Waiting for a
    # running job alone let a fast host finish all four first (CI, 2026-12-04).
    daemon.wait_for(
        lambda: daemon.jobs("running") >= 1 and daemon.jobs("done") <= 1,
        120,
        "a running job with at most one study done",
    )
    assert daemon.terminate(timeout=60) == 0
    assert daemon.jobs("running") == 0 and daemon.jobs("queued") == 4 - daemon.jobs("done")
    assert daemon.jobs("queued") >= 1
    assert daemon.query("SELECT max(attempts) FROM jobs WHERE status = 'queued'") == [(0,)]


def test_watch_stops_with_exit_2_when_its_workers_cannot_load_the_model(
    tmp_path: Path, daemons: list[_Daemon]
) -> None:
    # A checkpoint that is there but cannot be loaded: only a worker finds out.
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch checkpoint")
    daemon = _Daemon(tmp_path, workers=1)
    daemons.append(daemon)
    daemon.config.write_text(
        daemon.config.read_text().replace(
            '[segmentation]\ndevice = "cpu"',
            '[segmentation]\ndevice = "cpu"\nbackend = "medsam-vitb"\n'
            f'medsam_checkpoint = "{corrupt}"',
        )
    )
    daemon.start()
    assert daemon.process is not None
    assert daemon.process.wait(120) == 2
    log = daemon.tail()
    assert "worker cannot start" in log and "corrupt.pth" in log


def test_a_study_pushed_by_c_store_is_processed_and_the_daemon_drains(
    tmp_path: Path, daemons: list[_Daemon]
) -> None:
    """A PACS pushes a study to `cxrbatch watch --listen` (no export folder): it is
    acknowledged, queued after the quiet period, processed, and SIGTERM stops the node."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore

    from tests.test_scp import _free_port

    (generated,) = write_studies(tmp_path / "generated", 1, seed=33, size=(512, 512))
    port = _free_port()
    daemon = _Daemon(tmp_path, workers=1)
    daemon.source = ["--listen", str(port)]
    daemons.append(daemon)
    daemon.config.write_text(daemon.config.read_text() + '[dicom]\nbind_address = "127.0.0.1"\n')
    daemon.start()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    deadline = time.monotonic() + 60
    while True:  # the node is listening once its models are loaded and its server is up
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRBATCH")
        if assoc.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert assoc.is_established, daemon.tail()
    status = assoc.send_c_store(dcmread(generated.path))
    assoc.release()
    assert status.Status == 0x0000
    daemon.wait_for(lambda: daemon.jobs("done") == 1, 120, "the pushed study done")
    outputs = list((daemon.out / generated.study_instance_uid).iterdir())
    assert {p.name.split("_")[0] for p in outputs} >= {"seg", "sr.dcm", "result.json"}
    assert daemon.terminate(timeout=60) == 0


LIGHT_PARENT = """
import sys, time
from pathlib import Path
from cxrbatch.config import load_settings
from cxrbatch.daemon import Service
from cxrbatch.site import Site
settings = load_settings(None, segmentation={"device": "cpu"})
service = Service(Site.at(settings, Path(sys.argv[1])), 1, None)
service._spawn_worker()
heavy = [m for m in ("torch", "highdicom", "cxrbatch.pipeline", "cxrbatch.worker")
         if m in sys.modules]
service._replace_dead_workers()
heavy += [m for m in ("torch", "cxrbatch.worker") if m in sys.modules and m not in heavy]
(child,) = service._children
child.terminate()
child.join(30)
print("heavy:", ",".join(heavy) or "none")
"""


def test_the_daemon_parent_does_not_import_torch_when_it_spawns_workers(tmp_path: Path) -> None:
    """The ingest process (watcher, receiver, sender) stays light: the worker's imports
    (torch, highdicom, the pipeline) happen in the spawned child only."""
    proc = subprocess.run(
        [sys.executable, "-c", LIGHT_PARENT, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "heavy: none" in proc.stdout, proc.stdout + proc.stderr[-2000:]

"""Campaign: kill -9 at random moments. `cxrbatch watch EXPORT --listen PORT` runs as a
real process group (ingest, receiver, worker processes); studies arrive half through the
export folder and half by C-STORE while the whole group is killed with SIGKILL at random
moments and started again. At the end: 0 studies lost, 0 duplicated outcomes, 0 orphaned
files (issue 20: >= 20 kills over >= 100 studies).

    python -m bench.campaign_kill [--studies 100] [--kills 20] [--seed 0] [--workdir DIR]

Prints one JSON line with the counts and `ok`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Daemon:
    def __init__(self, work: Path, port: int) -> None:
        self.work, self.port = work, port
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log = open(work / "daemon.log", "ab")  # noqa: SIM115 (kept open for the run)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cxrbatch", "watch", str(self.work / "export"),
             "--out", str(self.work / "out"), "--listen", str(self.port),
             "--config", str(self.work / "site.toml")],
            stdout=self.log, stderr=self.log, start_new_session=True,
        )  # fmt: skip
        self.starts += 1

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)  # the parent and every worker at once
        self.process.wait()

    def stop(self) -> int:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout=300)


def _c_store(path: Path, port: int, stop: threading.Event) -> None:
    """Send until acknowledged with Success (the daemon may be down or killed meanwhile)."""
    from pydicom import dcmread
    from pynetdicom import AE

    ds = dcmread(path)
    while not stop.is_set():
        ae = AE(ae_title="CAMPAIGN")
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRBATCH")
        if assoc.is_established:
            try:
                status = assoc.send_c_store(ds)
                if status and int(status.Status) == 0x0000:
                    return
            finally:
                if assoc.is_established:
                    assoc.release()
        time.sleep(0.5)


def _feed(studies: list[Path], work: Path, port: int, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    for index, path in enumerate(studies):
        if index % 2 == 0:  # the export folder: written under a temporary name, renamed
            target = work / "export" / f"study{index:03d}" / "IM0001"
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.parent / ".IM0001.part"
            shutil.copyfile(path, temporary)
            temporary.rename(target)
        else:
            _c_store(path, port, stop)
        time.sleep(rng.uniform(0.0, 1.5))


def _jobs_done(database: Path) -> tuple[int, int]:
    if not database.exists():
        return 0, 0
    try:
        with sqlite3.connect(database, timeout=5) as db:
            done = db.execute(
                "SELECT count(*) FROM jobs WHERE status IN ('done', 'ineligible')"
            ).fetchone()[0]
            total = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
            return int(done), int(total)
    except sqlite3.Error:
        return 0, 0


def check(work: Path, expected: dict[str, str]) -> dict[str, Any]:
    """The end state: every study once, no orphaned files anywhere under OUT."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cxrbatch.config import load_settings
    from cxrbatch.domain import IMAGE_OUTPUTS
    from cxrbatch.site import Site

    site = Site.at(load_settings(work / "site.toml"), work / "out")
    roots = site.roots
    with sqlite3.connect(work / "out" / "cxrbatch.sqlite") as db:
        current = db.execute(
            "SELECT s.study_instance_uid, o.status, o.outputs FROM outcomes o "
            "JOIN studies s ON s.id = o.study_id WHERE o.is_current"
        ).fetchall()
        outcome_rows = db.execute("SELECT count(*) FROM outcomes").fetchone()[0]
        spool_rows = {row[0] for row in db.execute("SELECT path FROM instances")}
    by_study: dict[str, int] = {}
    named: set[Path] = set()
    for uid, _status, outputs in current:
        by_study[uid] = by_study.get(uid, 0) + 1
        document = json.loads(outputs)
        for key in IMAGE_OUTPUTS:
            named |= {roots.resolve(p) for p in (document.get(key) or {}).values()}
        named |= {
            roots.resolve(document[key]) for key in ("sr", "json", "rejection") if document.get(key)
        }
    lost = sorted(set(expected.values()) - set(by_study))
    duplicated = sorted(uid for uid, count in by_study.items() if count > 1)
    out = work / "out"
    outputs_on_disk = {
        p for p in out.rglob("*")
        if p.is_file() and not p.relative_to(out).parts[0].startswith("_")
        and p.name not in ("cxrbatch.sqlite", "cxrbatch.sqlite-wal", "cxrbatch.sqlite-shm")
        and not p.name.startswith(".cxrbatch")
    }  # fmt: skip
    orphaned_outputs = sorted(str(p) for p in outputs_on_disk - named)
    spool_files = {p for p in site.spool_dir.rglob("*") if p.is_file()}
    spool_known = {roots.resolve(p) for p in spool_rows}
    orphaned_spool = sorted(str(p) for p in spool_files - spool_known)
    incoming = sorted(str(p) for p in site.incoming_dir.rglob("*") if p.is_file())
    left_in_export = sorted(
        str(p) for p in (work / "export").rglob("*") if p.is_file()
    )  # ingest.mode = move: everything taken leaves the export folder
    return {
        "studies": len(expected),
        "current_outcomes": len(current),
        "outcome_rows": outcome_rows,
        "lost": lost,
        "duplicated": duplicated,
        "orphaned_outputs": orphaned_outputs,
        "orphaned_spool_files": orphaned_spool,
        "left_in_incoming": incoming,
        "left_in_export": left_in_export,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="phantom size in pixels")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    from cxrbatch_training.synthetic import write_studies

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxrbatch-kill-"))
    (work / "export").mkdir(parents=True, exist_ok=True)
    generated = write_studies(work / "gen", args.studies, seed=args.seed, size=(args.size,) * 2)
    expected = {str(s.path): s.study_instance_uid for s in generated}
    port = _free_port()
    (work / "site.toml").write_text(
        '[segmentation]\ndevice = "cpu"\n[classifier]\ndevice = "cpu"\n'
        "[ingest]\nquiet_seconds = 0.5\nstudy_stable_seconds = 0.5\n"
        "reconcile_interval_seconds = 5.0\n"
        "[queue]\nlease_seconds = 15.0\nheartbeat_seconds = 3.0\npoll_interval_seconds = 0.2\n"
        "min_free_disk_mb = 0.0\nbackoff_base_seconds = 1.0\nbackoff_max_seconds = 5.0\n"
        "max_attempts = 50\n"
        "[processing]\nstudy_threads = 1\n"
    )
    rng = random.Random(args.seed)
    daemon = Daemon(work, port)
    stop = threading.Event()
    feeder = threading.Thread(
        target=_feed, args=([s.path for s in generated], work, port, args.seed, stop)
    )
    started = time.perf_counter()
    daemon.start()
    feeder.start()
    kills = 0
    while kills < args.kills:
        time.sleep(rng.uniform(2.0, 12.0))  # from a start: model loading, ingest, processing
        daemon.kill()
        kills += 1
        daemon.start()
    feeder.join(timeout=1800)
    deadline = time.monotonic() + 1800
    database = work / "out" / "cxrbatch.sqlite"
    while time.monotonic() < deadline:
        done, total = _jobs_done(database)
        if total >= args.studies and done == total:
            break
        time.sleep(2.0)
    stop.set()
    exit_code = daemon.stop()
    report = check(work, expected)
    report |= {
        "kills": kills,
        "starts": daemon.starts,
        "last_exit_code": exit_code,
        "seconds": round(time.perf_counter() - started, 1),
        "workdir": str(work),
    }
    report["ok"] = (
        not any(
            report[k]
            for k in (
                "lost",
                "duplicated",
                "orphaned_outputs",
                "orphaned_spool_files",
                "left_in_incoming",
                "left_in_export",
            )
        )
        and report["current_outcomes"] == args.studies == report["outcome_rows"]
    )
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

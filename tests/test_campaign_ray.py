"""A campaign on a Ray cluster (issue 34): two Ray nodes on this machine, the second in its
own PID namespace (`unshare`, as root: another host, whose processes cannot be looked up
from here), one PostgreSQL results database.

- The second node is killed (SIGKILL, the whole namespace) while its actor holds a study:
  the study's lease runs out, the other node's actor takes it again, and the campaign ends
  with every study recorded exactly once and no staging folder left.
- The outputs equal `cxrbatch process`'s on the same files (lung measures, QC, the SEG's
  pixels).
- Run again, the campaign adds nothing: every file is a duplicate, no outcome is added.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from cxrbatch.db import models as tables
from cxrbatch.db.leased import process_space
from cxrbatch.db.session import make_engine, session_factory
from cxrbatch_training.synthetic import write_studies
from tests.conftest import tool, unavailable
from tests.test_scp import _free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
[segmentation]
device = "cpu"

[queue]
lease_seconds = 9.0
heartbeat_seconds = 3.0
poll_interval_seconds = 0.3
"""


TWO_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], include_dashboard=False, logging_level="ERROR")
deadline = time.monotonic() + 180
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.monotonic() < deadline, "the second Ray node did not join"
    time.sleep(0.5)
"""


def _ray_cli() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent))
    if found is None:
        unavailable(
            "Ray is not installed (pip install 'cxrbatch[ray]')",
            "Ray (the dev extra) is required in CI for the campaign test",
        )
    return found


def _cxrbatch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrbatch", *args],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env,
    )  # fmt: skip


def _measures(out: Path) -> dict[str, Any]:
    """Per study: each image's lung measures and QC, and its SEG's pixels."""
    found: dict[str, Any] = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")):
        document = json.loads((folder / "result.json").read_text())
        images = [
            (i["sop_instance_uid"], i["lungs"], i["segmentation_qc"]) for i in document["images"]
        ]
        segs = [dcmread(p).pixel_array for p in sorted(folder.glob("seg_*.dcm"))]
        found[folder.name] = (images, segs)
    return found


@pytest.mark.postgres
def test_a_campaign_on_two_ray_nodes_survives_a_lost_node_and_matches_process(
    tmp_path: Path, postgres_url: str
) -> None:
    ray = _ray_cli()
    unshare = tool(
        "unshare",
        skip_reason="unshare (util-linux) is not installed",
        ci_reason="unshare (util-linux) is required in CI for the lost Ray node",
    )
    studies = write_studies(tmp_path / "in", 6, seed=41, size=(256, 256))
    config = tmp_path / "site.toml"
    config.write_text(CONFIG)
    # Token authentication on every node and the driver, as OPERATIONS.md says to run it,
    # with this test's own token.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip
    port = _free_port()
    head = subprocess.run(
        [ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats"],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert head.returncode == 0, head.stderr[-2000:]
    other_host: subprocess.Popen[bytes] | None = None
    try:
        other_host = subprocess.Popen(
            [unshare, "--pid", "--fork", "--mount-proc", ray, "start",
             f"--address=127.0.0.1:{port}", "--num-cpus=1", "--block"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True,
        )  # fmt: skip
        time.sleep(2)
        if other_host.poll() is not None:
            stderr = other_host.stderr.read().decode() if other_host.stderr else ""
            unavailable(
                f"unshare --pid is not allowed here: {stderr[-300:]}",
                f"unshare --pid needs root in CI: {stderr[-500:]}",
            )
        # Both nodes up before the campaign starts (else one actor may do every study).
        nodes = subprocess.run(
            [sys.executable, "-c", TWO_NODES, f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=240, env=env,
        )  # fmt: skip
        assert nodes.returncode == 0, nodes.stderr[-2000:]
        out = tmp_path / "out"
        campaign = subprocess.Popen(
            [sys.executable, "-m", "cxrbatch", "campaign", str(tmp_path / "in"), "--out",
             str(out), "--db", postgres_url, "--config", str(config),
             f"--address=127.0.0.1:{port}", "--actors", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
        )  # fmt: skip
        sessions = session_factory(make_engine(postgres_url))
        here = process_space()
        lost_study = None
        deadline = time.monotonic() + 600
        while lost_study is None and time.monotonic() < deadline and campaign.poll() is None:
            time.sleep(0.1)
            try:
                with sessions() as session:
                    held = session.scalar(
                        select(tables.Job).where(
                            tables.Job.status == "running",
                            ~tables.Job.lease_owner.endswith(here),
                        )
                    )
            except Exception:  # the schema is not there yet
                continue
            if held is not None:  # the other host's actor holds a study: lose that host
                lost_study = held.study_instance_uid
                os.killpg(other_host.pid, signal.SIGKILL)
        output, _ = campaign.communicate(timeout=900)
        assert lost_study is not None, output[-3000:]
        assert campaign.returncode == 0, output[-3000:]

        with sessions() as session:
            per_study = dict(
                session.execute(
                    select(tables.Study.study_instance_uid, func.count())
                    .join(tables.Outcome)
                    .group_by(tables.Study.study_instance_uid)
                ).all()
            )
            lost_job = session.scalar(
                select(tables.Job).where(tables.Job.study_instance_uid == lost_study)
            )
        assert per_study == {s.study_instance_uid: 1 for s in studies}
        assert lost_job is not None and lost_job.status == "done" and lost_job.attempts == 2
        assert not list(out.glob("*/.staging-*"))

        # The same outcomes as `process` gives on the same files.
        alone = _cxrbatch(
            "process", str(tmp_path / "in"), "--out", str(tmp_path / "alone"), "--config",
            str(config), env=env,
        )  # fmt: skip
        assert alone.returncode == 0, alone.stdout[-2000:] + alone.stderr[-2000:]
        campaign_measures, process_measures = _measures(out), _measures(tmp_path / "alone")
        assert campaign_measures.keys() == process_measures.keys() and len(campaign_measures) == 6
        for uid, (images, segs) in campaign_measures.items():
            expected_images, expected_segs = process_measures[uid]
            assert images == expected_images, uid
            assert len(segs) == len(expected_segs) == 1
            assert np.array_equal(segs[0], expected_segs[0]), uid

        # Run again: every file is a duplicate, nothing is added.
        again = _cxrbatch(
            "campaign", str(tmp_path / "in"), "--out", str(out), "--db", postgres_url,
            "--config", str(config), f"--address=127.0.0.1:{port}", "--actors", "1", env=env,
        )  # fmt: skip
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert "files duplicate" in again.stdout and "files received" not in again.stdout
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(tables.Outcome)) == 6
    finally:
        if other_host is not None and other_host.poll() is None:
            os.killpg(other_host.pid, signal.SIGKILL)
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=env)


def test_a_campaign_whose_disk_stays_under_the_watermark_stops_with_one_line(
    tmp_path: Path,
) -> None:
    """A campaign on a Ray cluster of this host whose actor's worker stops (the output's
    disk under queue.min_free_disk_mb for queue.batch_disk_wait_seconds): exit 2 with our
    one-line reason, not Ray's wrapped traceback, and the study left queued."""
    _ray_cli()
    write_studies(tmp_path / "in", 1, seed=42, size=(128, 128))
    config = tmp_path / "site.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "CXRBATCH_QUEUE__MIN_FREE_DISK_MB": "1e15",  # no disk has that much free
           "CXRBATCH_QUEUE__BATCH_DISK_WAIT_SECONDS": "1"}  # fmt: skip
    out = tmp_path / "out"
    ran = _cxrbatch(
        "campaign", str(tmp_path / "in"), "--out", str(out), "--config", str(config),
        "--actors", "1", env=env,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stdout[-2000:] + ran.stderr[-3000:]
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, ran.stderr[-3000:]
    assert "campaign: a worker stopped: the free disk" in errors[0], errors[0]
    assert "stay queued" in errors[0] and "Traceback" not in errors[0], errors[0]
    engine = make_engine(f"sqlite:///{out / 'cxrbatch.sqlite'}")
    with session_factory(engine)() as session:
        assert session.scalars(select(tables.Job.status)).all() == ["queued"]
    engine.dispose()

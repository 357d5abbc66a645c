"""Small seeded runs of the hardening campaigns (bench/campaign_*.py), so that the scripts
behind issue 20's figures keep working and keep finding nothing. The full figures come from
the bench runs themselves (docs/hardening.md lists the commands)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _campaign(name: str, *args: str, timeout: float = 900) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.campaign_{name}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def test_queue_campaign_runs_each_job_exactly_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    report = _campaign("queue", "--workers", "4", "--jobs", "120", "--db", url)
    assert report["each_exactly_once"] and report["jobs_run_twice"] == 0
    assert report["runs"] == report["distinct_jobs_run"] == 120


def test_fuzz_campaign_sample_records_every_input(tmp_path: Path) -> None:
    report = _campaign(
        "fuzz", "--cases", "45", "--chunk", "45", "--seed", "3", "--workdir", str(tmp_path)
    )
    assert report["ok"] and report["recorded"] == report["inputs"] == 45
    assert report["crashes"] == report["hangs"] == report["paths_outside_output"] == 0


def test_corpus_campaign_accounts_for_every_file() -> None:
    report = _campaign("corpus")
    assert report["not_accounted"] == [] and report["accounted"] == report["files"] > 200
    assert report["by_status"]["skipped"] >= 1  # the DICOMDIRs, recorded as skipped


def test_kill_campaign_sample_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    report = _campaign(
        "kill", "--studies", "8", "--kills", "3", "--seed", "5", "--workdir", str(tmp_path)
    )
    assert report["ok"], report
    assert report["lost"] == report["duplicated"] == report["orphaned_outputs"] == []

"""`cxrbatch results` and `worklist` read at 80 columns (issue 36): one line per study with
the columns a person scans; the rest behind --wide, CSV and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.web_data import populate

ROOT = Path(__file__).resolve().parent.parent


def _cxrbatch(*args: str, columns: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": str(columns), "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "cxrbatch", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip


def test_results_and_worklist_read_at_80_columns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    populate(f"sqlite:///{out / 'cxrbatch.sqlite'}", 12, seed=6)
    listed = json.loads(
        _cxrbatch("results", "--out", str(out), "--format", "json", columns=80).stdout
    )
    for command in ("results", "worklist"):
        shown = _cxrbatch(command, "--out", str(out), columns=80)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, shown.stdout
        rows = [line for line in lines if "#" in line]
        assert len(rows) == 12, shown.stdout  # one line per study, nothing wrapped
        for row in listed:  # each study's number and accession, whole
            line = next(r for r in rows if f"#{row['study_number']} " in r)
            assert row["accession_number"] in line
            top = max(row["probabilities"].items(), key=lambda item: item[1])
            assert f"{top[0]} {top[1]:.2f}" in line
    wide = _cxrbatch("results", "--out", str(out), "--wide", columns=250)
    assert wide.returncode == 0 and "study_instance_uid" in wide.stdout and "p_Mass" in wide.stdout


def test_no_model_is_named_as_deciding_a_study_no_model_scored() -> None:
    from cxrbatch.db import models as tables
    from cxrbatch.db.reads import deciding_models

    bundle = [{"name": "demo", "version": "1", "mask_mode": "M-50"}, {"name": "litemedsam"}]
    assert deciding_models(tables.Outcome(status="processed", models=bundle)) == "demo 1"
    both_roles = [{**bundle[0], "role": "classifier"}, {**bundle[0], "role": "screening"}]
    assert deciding_models(tables.Outcome(status="processed", models=both_roles)) == "demo 1"
    for status in ("ineligible", "failed"):  # a CT, an unreadable film: nothing scored
        assert deciding_models(tables.Outcome(status=status, models=bundle)) is None

"""A tiny run of the throughput harness, for correctness (not for time): both
configurations process every study, their outputs agree, the report is complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_harness_tiny_run(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.harness",
            "--studies",
            "3",
            "--min-size",
            "256",
            "--max-size",
            "320",
            "--workers",
            "2",
            "--study-threads",
            "2",
            "--codec",
            "mixed",
            "--rounds",
            "2",
            "--report",
            str(report_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("speedup_vs_naive: ")
    report = json.loads(report_path.read_text())
    assert float(last.split(": ")[1]) == round(report["speedup_vs_naive"], 2)
    # Two rounds (naive first, then tuned first): the ratio is the median of theirs.
    ratios = [r["speedup_vs_naive"] for r in report["rounds"]]
    assert len(ratios) == 2 and report["speedup_vs_naive"] == sum(ratios) / 2
    for r in report["rounds"]:
        assert r["speedup_vs_naive"] == r["runs"]["naive"]["wall_s"] / r["runs"]["tuned"]["wall_s"]
    assert report["runs"] == min(report["rounds"], key=lambda r: r["speedup_vs_naive"])["runs"]
    for mode in ("naive", "tuned"):
        run = report["runs"][mode]
        assert run["statuses"] == {"processed": 3}, run
        assert set(run["stage_seconds_per_study"]) == {"decode", "segment", "classify", "write"}
        assert run["peak_rss_bytes_total"] > 0
    # The naive run loads its models in process: the loading is timed apart, inside the
    # wall time; the tuned run's two worker processes load their own (not separable).
    naive = report["runs"]["naive"]
    assert 0 < naive["load_s"] < naive["wall_s"]
    assert report["runs"]["tuned"]["load_s"] is None and report["speedup_after_load"] is None
    tuned = report["runs"]["tuned"]
    assert tuned["workers"] == 2 and tuned["study_threads"] == 2
    # The tuned workers load the CPU graphs that an untimed first run cached.
    assert report["graph_cache"] == "warm"
    assert "graph cache warm" in proc.stdout
    # Tasks of two studies: one process takes two at once, the other the third.
    assert len(tuned["peak_rss_bytes_per_worker"]) == 2
    # fp32 on the CPU in both configurations: the same masks and probabilities.
    agreement = report["agreement"]
    assert agreement["images_compared"] == 3
    assert agreement["mask_dice_min"] >= 0.99
    assert agreement["probability_abs_diff_max"] <= 1e-3

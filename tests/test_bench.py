"""A tiny run of the throughput harness, for correctness (not for time): both
configurations process every study, their outputs agree, the report is complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.harness import generate, ratios, summarise

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
    (only,) = report["rounds"]
    assert only["runs"] == report["runs"]
    assert (
        report["speedup_vs_naive"]
        == report["runs"]["naive"]["wall_s"] / report["runs"]["tuned"]["wall_s"]
    )
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


def _round(naive_s: float, tuned_s: float, load_s: float | None) -> dict[str, Any]:
    runs = {
        "naive": {"wall_s": naive_s, "load_s": load_s},
        "tuned": {"wall_s": tuned_s, "load_s": load_s},
    }
    return {**ratios(runs), "runs": runs}


def test_rounds_are_summarised_by_their_median() -> None:
    rounds = [_round(100, 50, 2), _round(90, 60, 2), _round(100, 80, 2)]
    summary = summarise(rounds)
    assert summary["speedup_vs_naive"] == 1.5  # 2.0, 1.5, 1.25
    assert summary["speedup_range"] == [1.25, 2.0]
    assert summary["runs"] is rounds[1]["runs"]
    assert summary["speedup_after_load"] == 88 / 58
    # An even count: the mean of the middle two, the runs of the lower one.
    two = summarise(rounds[1:])
    assert two["speedup_vs_naive"] == (1.5 + 1.25) / 2 and two["runs"] is rounds[2]["runs"]
    # Worker processes load their own models: no ratio after loading.
    assert summarise([_round(100, 50, None)])["speedup_after_load"] is None


def test_host_side_against_a_baseline_is_summarised_per_tree() -> None:
    from bench.host_side import HOST_SIDE, HOST_SIDE_CPU, compare

    def run(wall: float, cpu: float) -> dict[str, float]:
        return {HOST_SIDE: wall, HOST_SIDE_CPU: cpu, "decode": 0.02}

    summary = compare(
        {
            "baseline": [run(0.20, 0.19), run(0.30, 0.17), run(0.18, 0.18)],
            "this tree": [run(0.10, 0.09), run(0.12, 0.10), run(0.40, 0.11)],
        }
    )
    assert summary["medians"]["baseline"] == {HOST_SIDE: 0.2, HOST_SIDE_CPU: 0.18, "decode": 0.02}
    assert summary["medians"]["this tree"][HOST_SIDE] == 0.12
    assert summary["host_side_ratio"] == round(0.2 / 0.12, 3)
    assert summary["host_side_cpu_ratio"] == round(0.18 / 0.10, 3)
    assert summary["runs"]["this tree"] == [0.09, 0.10, 0.11]
    # A baseline whose bench has no CPU figure: no CPU ratio rather than a made-up one.
    older = compare({"baseline": [{HOST_SIDE: 0.2}], "this tree": [run(0.1, 0.09)]})
    assert older["host_side_ratio"] == 2.0 and older["host_side_cpu_ratio"] is None


def test_host_side_against_an_unknown_commit_says_so() -> None:
    import pytest

    from bench.host_side import against

    with pytest.raises(SystemExit, match="cannot check out 'no-such-commit-here'"):
        against("no-such-commit-here", runs=1, rounds=1)


def test_generate_copies_drawn_studies_under_new_uids(tmp_path: Path) -> None:
    import numpy as np
    import pydicom

    generate(tmp_path, 5, 300, 340, "mixed", 1, distinct=2)
    files = sorted(tmp_path.glob("phantom_*/image.dcm"))
    assert [f.parent.name for f in files] == [f"phantom_{i:05d}" for i in range(5)]
    sets = [pydicom.dcmread(f) for f in files]
    for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
        assert len({str(ds[uid].value) for ds in sets}) == 5, uid
    for ds in sets:
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    # Copies carry their source's pixels in its codec (2 and 4 of study 0, 3 of study 1).
    for copy, source in ((2, 0), (3, 1), (4, 0)):
        assert sets[copy].file_meta.TransferSyntaxUID == sets[source].file_meta.TransferSyntaxUID
        assert np.array_equal(sets[copy].pixel_array, sets[source].pixel_array)
    # The two drawn studies are two films.
    assert not np.array_equal(sets[0].pixel_array, sets[1].pixel_array)

"""NIH ChestX-ray14 curation on the real label file shipped in torchxrayvision."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest

from cxrbatch_training.__main__ import main
from cxrbatch_training.curate import (
    CLASSES,
    curate,
    packaged_nih_labels,
    read_nih_labels,
    sample_per_class,
    split_entries,
    summary,
)

PAPER_UNIQUE_IMAGES = 10_486


@pytest.fixture(scope="module")
def nih_labels() -> Path:
    return packaged_nih_labels()


def test_real_label_file_curates_like_the_paper(nih_labels: Path) -> None:
    entries = read_nih_labels(nih_labels)
    assert len(entries) == 112_120
    rows = split_entries(sample_per_class(entries, 2000, seed=0), "image", seed=0)
    counts = summary(rows)
    per_class = counts["per_class"]
    assert isinstance(per_class, dict)
    # Classes with fewer than 2,000 images are taken whole; No Finding never co-occurs.
    assert per_class["Pneumonia"] == 1431 and per_class["Fibrosis"] == 1686
    assert per_class["No Finding"] == 2000
    # Mass, Nodule and Edema: 2,000 sampled, plus those that come with other classes' picks.
    assert all(2000 <= per_class[label] <= 2600 for label in ("Mass", "Nodule", "Edema"))
    unique = counts["unique_images"]
    assert isinstance(unique, int)
    assert abs(unique - PAPER_UNIQUE_IMAGES) / PAPER_UNIQUE_IMAGES < 0.01, unique
    # The paper's image-level split: exactly 70:15:15 after rounding.
    assert counts["per_split"] == {
        "train": round(unique * 0.70),
        "val": round(unique * 0.85) - round(unique * 0.70),
        "test": unique - round(unique * 0.85),
    }


def test_patient_split_keeps_each_patient_in_one_partition(nih_labels: Path) -> None:
    rows = curate(nih_labels, seed=3, split="patient")
    partitions: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        partitions[row.entry.patient_id].add(row.split)
    assert all(len(splits) == 1 for splits in partitions.values())
    shares = {
        name: sum(r.split == name for r in rows) / len(rows) for name in ("train", "val", "test")
    }
    assert shares["train"] == pytest.approx(0.70, abs=0.01)
    assert shares["val"] == pytest.approx(0.15, abs=0.01)
    # The image-level split, by contrast, puts some patients in two partitions.
    image_rows = curate(nih_labels, seed=3, split="image")
    by_patient: dict[str, set[str]] = defaultdict(set)
    for row in image_rows:
        by_patient[row.entry.patient_id].add(row.split)
    assert any(len(splits) > 1 for splits in by_patient.values())


def test_cli_writes_a_seeded_reproducible_csv(nih_labels: Path, tmp_path: Path) -> None:
    first, again, other = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    for out, seed in ((first, 7), (again, 7), (other, 8)):
        assert main(["curate", "--out", str(out), "--seed", str(seed), "--split", "patient"]) == 0
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    with first.open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["Image Index", "Patient ID", *CLASSES, "split"]
        rows = list(reader)
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert all(r[label] in ("0", "1") for r in rows for label in CLASSES)
    # Every row carries at least one of the six classes; No Finding excludes the others.
    for row in rows:
        positives = [label for label in CLASSES if row[label] == "1"]
        assert positives and (positives == ["No Finding"] or "No Finding" not in positives)


def test_clear_errors_for_missing_or_wrong_files(tmp_path: Path) -> None:
    assert main(["curate", "--nih-labels", str(tmp_path / "none.csv"), "--out", "x.csv"]) == 2
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("Image,Labels\na.png,Mass\n")
    with pytest.raises(ValueError, match="missing Image Index, Finding Labels, Patient ID"):
        read_nih_labels(wrong)


def test_the_training_commands_are_a_group_of_the_cxrbatch_command(tmp_path: Path) -> None:
    """One CLI framework: `cxrbatch training curate` is the command `python -m
    cxrbatch_training curate` runs, with the same output and the same usage errors."""
    from typer.testing import CliRunner

    from cxrbatch.cli import app

    via_cxrbatch, direct = tmp_path / "a.csv", tmp_path / "b.csv"
    args = ["curate", "--seed", "7", "--split", "patient", "--out"]
    ran = CliRunner().invoke(app, ["training", *args, str(via_cxrbatch)])
    assert ran.exit_code == 0, ran.output
    assert main([*args, str(direct)]) == 0
    assert via_cxrbatch.read_bytes() == direct.read_bytes()
    wrong = CliRunner().invoke(app, ["training", "curate", "--split", "family", "--out", "x"])
    assert wrong.exit_code == 2 and "family" in wrong.output
    assert main(["curate", "--split", "family", "--out", "x"]) == 2

"""NIH ChestX-ray14 curation as in arXiv 2512.23089, seeded, plus patient-level splits.

The paper's subset: the labels Mass, Nodule, Pneumonia, Edema and Fibrosis plus No Finding;
up to 2,000 images sampled per class (an image is in a class when its `Finding Labels`
contain the label; No Finding is the NIH's own "No Finding" label); the union of the
samples (10,486 unique images in the paper); a 70:15:15 train/val/test split.

Splits: "image" is the paper's (images shuffled and cut 70:15:15, so one patient's images
can fall into two partitions); "patient" keeps every patient in one partition (the paper's
first open question), cutting the shuffled patients where the image counts reach 70 % and
85 %.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

FINDINGS = ("Mass", "Nodule", "Pneumonia", "Edema", "Fibrosis")
NO_FINDING = "No Finding"
CLASSES = (*FINDINGS, NO_FINDING)
SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")

SplitMode = Literal["image", "patient"]


@dataclass(frozen=True)
class Entry:
    image_index: str
    patient_id: str
    labels: frozenset[str]


@dataclass(frozen=True)
class Curated:
    entry: Entry
    split: str

    def row(self) -> dict[str, str | int]:
        return {
            "Image Index": self.entry.image_index,
            "Patient ID": self.entry.patient_id,
            **{label: int(label in self.entry.labels) for label in CLASSES},
            "split": self.split,
        }


def packaged_nih_labels() -> Path:
    """The NIH label file shipped in the torchxrayvision package (not imported: only found)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "No --nih-labels file given and the torchxrayvision package (which ships "
            "data/Data_Entry_2017_v2020.csv.gz) is not installed: pip install -e '.[training]'"
        )
    path = (
        Path(next(iter(spec.submodule_search_locations))) / "data" / "Data_Entry_2017_v2020.csv.gz"
    )
    if not path.is_file():
        raise FileNotFoundError(f"Expected the NIH label file at {path}, found nothing.")
    return path


def read_nih_labels(path: Path) -> list[Entry]:
    """Read Data_Entry_2017.csv or its v2020 revision (plain or .gz)."""
    if not path.is_file():
        raise FileNotFoundError(f"NIH label file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"Expected NIH columns {', '.join(REQUIRED_COLUMNS)} in {path}, "
                f"missing {', '.join(missing)}."
            )
        return [
            Entry(
                row["Image Index"].strip(),
                row["Patient ID"].strip(),
                frozenset(label.strip() for label in row["Finding Labels"].split("|")),
            )
            for row in reader
        ]


def sample_per_class(entries: list[Entry], per_class: int, seed: int) -> list[Entry]:
    """Up to `per_class` images drawn per class (seeded); their union, in file order."""
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for label in CLASSES:
        members = [i for i, entry in enumerate(entries) if label in entry.labels]
        take = min(per_class, len(members))
        chosen.update(int(i) for i in rng.choice(members, size=take, replace=False))
    return [entries[i] for i in sorted(chosen)]


def _cut(n: int) -> tuple[int, int]:
    train = round(n * SPLITS[0][1])
    return train, train + round(n * SPLITS[1][1])


def split_entries(entries: list[Entry], mode: SplitMode, seed: int) -> list[Curated]:
    rng = np.random.default_rng(seed + 1)
    if mode == "image":
        order = rng.permutation(len(entries))
        first, second = _cut(len(entries))
        names = ["train"] * first + ["val"] * (second - first) + ["test"] * (len(entries) - second)
        split_of = {int(index): names[rank] for rank, index in enumerate(order)}
        return [Curated(entry, split_of[i]) for i, entry in enumerate(entries)]
    if mode != "patient":
        raise ValueError(f"Expected split mode 'image' or 'patient', found {mode!r}.")
    patients = sorted({entry.patient_id for entry in entries})
    images = Counter(entry.patient_id for entry in entries)
    first, second = _cut(len(entries))
    split_of_patient: dict[str, str] = {}
    seen = 0
    for index in rng.permutation(len(patients)):
        patient = patients[int(index)]
        split_of_patient[patient] = "train" if seen < first else "val" if seen < second else "test"
        seen += images[patient]
    return [Curated(entry, split_of_patient[entry.patient_id]) for entry in entries]


def curate(
    labels_file: Path, *, per_class: int = 2000, seed: int = 0, split: SplitMode = "image"
) -> list[Curated]:
    return split_entries(
        sample_per_class(read_nih_labels(labels_file), per_class, seed), split, seed
    )


def write_curated(rows: Iterable[Curated], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["Image Index", "Patient ID", *CLASSES, "split"]
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(row.row() for row in rows)
    tmp.replace(out)


def summary(rows: list[Curated]) -> dict[str, object]:
    """Per-class and per-split counts, unique images and patients."""
    return {
        "unique_images": len(rows),
        "patients": len({r.entry.patient_id for r in rows}),
        "per_class": {label: sum(label in r.entry.labels for r in rows) for label in CLASSES},
        "per_split": dict(Counter(r.split for r in rows)),
    }

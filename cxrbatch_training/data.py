"""Datasets of the study: curated classification tables, image folders, lung-mask datasets.

One table format serves real and synthetic data: the CSV that `cxrbatch training curate`
writes (`Image Index`, `Patient ID`, a 0/1 column per label incl. No Finding, `split`).
Images are found by file name anywhere under an image root (the NIH archive unpacks into
images_001/images/ ... images_012/images/). Lung masks live in a mask directory as
`<stem>.png` (0 / 255, 512 x 512: the study's working resolution, see cxrbatch_training.maskgen).

Lung segmentation datasets for MedSAM fine-tuning are image/mask folder pairs: RSUA-style
and Shenzhen layouts (one mask per image, `name.png` or `name_mask.png`), Montgomery and
JSRT/SCR layouts (one folder per lung, unioned).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cxrbatch.models.preprocess import to_uint8
from cxrbatch_training.curate import CLASSES, FINDINGS, NO_FINDING

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


@dataclass(frozen=True)
class Record:
    """One row of a curated table."""

    image_index: str
    patient_id: str
    labels: tuple[int, ...]  # the five findings, in FINDINGS order
    no_finding: int
    split: str

    @property
    def stem(self) -> str:
        return Path(self.image_index).stem


def read_curated(path: Path) -> list[Record]:
    """Rows of a curated CSV; a clear error for a missing file or column."""
    if not path.is_file():
        raise FileNotFoundError(f"Curated table not found: {path}")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"Image Index", "Patient ID", "split", *CLASSES} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the columns {sorted(missing)}")
        records = []
        for line, row in enumerate(reader, start=2):
            unlabelled = [label for label in CLASSES if not (row[label] or "").strip()]
            if unlabelled:
                # e.g. a `cxrbatch export-deid` table whose reader labels are not filled in
                raise ValueError(
                    f"{path} line {line} ({row['Image Index']}) has no label for "
                    f"{', '.join(unlabelled)}: fill in 0/1 reader labels before training"
                )
            records.append(
                Record(
                    image_index=row["Image Index"],
                    patient_id=row["Patient ID"],
                    labels=tuple(int(row[label]) for label in FINDINGS),
                    no_finding=int(row[NO_FINDING]),
                    split=row["split"],
                )
            )
        return records


def write_curated_rows(records: Sequence[Record], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Patient ID", *CLASSES, "split"])
        for r in records:
            writer.writerow([r.image_index, r.patient_id, *r.labels, r.no_finding, r.split])


def split_records(records: Iterable[Record], split: str) -> list[Record]:
    return [r for r in records if r.split == split]


def index_images(root: Path) -> dict[str, Path]:
    """File name -> path for every image under root (any depth)."""
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root}")
    found: dict[str, Path] = {}
    for path in root.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.setdefault(path.name, path)
    return found


def resolve_images(records: Sequence[Record], root: Path) -> dict[str, Path]:
    """Image Index -> path for every record; an error naming what is missing."""
    found = index_images(root)
    missing = [r.image_index for r in records if r.image_index not in found]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(records)} images of the table are not under {root} "
            f"(first: {', '.join(missing[:5])})"
        )
    return {r.image_index: found[r.image_index] for r in records}


def load_gray(path: Path) -> np.ndarray:
    """A radiograph file as uint8 grayscale (8- or 16-bit PNG, RGB(A) takes channel 0)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"Cannot read image {path}")
    if image.ndim == 3:
        image = image[..., 0]
    return to_uint8(image)


def load_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"Lung mask not found or unreadable: {path}")
    return mask > 127


def save_mask(mask: np.ndarray, path: Path) -> None:
    from cxrbatch.files import atomic_write

    ok, encoded = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise ValueError(f"Cannot encode mask for {path}")
    atomic_write(path, lambda h: h.write(encoded.tobytes()))


@dataclass(frozen=True)
class MaskPair:
    image: Path
    masks: tuple[Path, ...]  # unioned (one per lung in Montgomery / JSRT-SCR)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        image = load_gray(self.image)
        union = np.zeros(image.shape, bool)
        for path in self.masks:
            mask = load_mask(path)
            if mask.shape != image.shape:
                mask = (
                    cv2.resize(
                        mask.astype(np.uint8), image.shape[::-1], interpolation=cv2.INTER_NEAREST
                    )
                    > 0
                )
            union |= mask
        return image, union


def lung_mask_pairs(image_dir: Path, mask_dirs: Sequence[Path]) -> list[MaskPair]:
    """Pair images with masks by stem (`name`, `name_mask`), unioning several mask folders.

    RSUA / Shenzhen: one mask folder. Montgomery: ManualMask/leftMask + ManualMask/rightMask.
    JSRT (SCR annotations): "left lung" + "right lung" folders.
    """
    if not mask_dirs:
        raise ValueError("Give at least one mask folder.")
    images = index_images(image_dir)
    by_dir = []
    for mask_dir in mask_dirs:
        masks = index_images(mask_dir)
        by_stem = {}
        for name, path in masks.items():
            stem = Path(name).stem
            by_stem[stem.removesuffix("_mask")] = path
        by_dir.append(by_stem)
    pairs = []
    unmatched = []
    for name, path in sorted(images.items()):
        stem = Path(name).stem
        found = [d.get(stem) for d in by_dir]
        if all(found):
            pairs.append(MaskPair(path, tuple(p for p in found if p is not None)))
        else:
            unmatched.append(name)
    if not pairs:
        raise FileNotFoundError(
            f"No image in {image_dir} has a mask in every one of {[str(d) for d in mask_dirs]}"
        )
    return pairs

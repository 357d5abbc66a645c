"""A synthetic classification dataset in the NIH layout, for the study on a CPU.

`write_phantom_dataset` draws chest phantoms (cxrbatch_training.synthetic) with balanced labels,
writes them as 8-bit PNGs (the NIH form), their known lung masks at the study's 512 x 512
working resolution, and a curated table in the format of `cxrbatch training curate`.

The shortcut experiment of the study: in the splits named by `artefact_splits` a bright
marker outside the lungs goes with abnormality (present on `artefact_rate` of the abnormal
images and on 1 - `artefact_rate` of the normal ones); the other splits (the test split by
default) carry no marker. A model that learned the marker loses it at test time; a model
that only sees the dilated lungs (M-50) never had it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cxrbatch.files import atomic_write
from cxrbatch.models.masks import WORKING_SIZE, resize_mask
from cxrbatch_training.curate import FINDINGS
from cxrbatch_training.data import Record, load_gray, save_mask, write_curated_rows
from cxrbatch_training.synthetic import make_phantom

IMAGES = "images"
TRUTH_MASKS = "masks_truth"
TABLE = "curated.csv"
RECIPE = "dataset.json"


@dataclass(frozen=True)
class PhantomRecipe:
    seed: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"train": 320, "val": 80, "test": 120})
    size: int = 256
    normal_fraction: float = 0.35
    artefact_splits: tuple[str, ...] = ("train", "val")
    artefact_rate: float = 0.9


@dataclass(frozen=True)
class _Item:
    name: str
    phantom_seed: int
    size: int
    labels: dict[str, int]
    artefact: bool


def _draw(recipe: PhantomRecipe) -> list[tuple[_Item, str]]:
    rng = np.random.default_rng([recipe.seed, 1411])
    items = []
    for split, count in recipe.counts.items():
        for i in range(count):
            labels = dict.fromkeys(FINDINGS, 0)
            if rng.random() >= recipe.normal_fraction:
                k = 1 if rng.random() < 0.7 else 2
                for label in rng.choice(FINDINGS, size=k, replace=False):
                    labels[str(label)] = 1
            abnormal = any(labels.values())
            artefact = split in recipe.artefact_splits and bool(
                rng.random() < (recipe.artefact_rate if abnormal else 1 - recipe.artefact_rate)
            )
            name = f"phantom_s{recipe.seed}_{split}_{i:05d}.png"
            seed = int(rng.integers(2**31))
            items.append((_Item(name, seed, recipe.size, labels, artefact), split))
    return items


def _render(item: _Item, root: Path) -> None:
    phantom = make_phantom(
        item.phantom_seed, (item.size, item.size), item.labels, artefact=item.artefact
    )
    pixels = np.round(phantom.image * 255.0).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise ValueError(f"Cannot encode {item.name}")
    atomic_write(root / IMAGES / item.name, lambda h: h.write(encoded.tobytes()))
    lungs = resize_mask(phantom.right_lung | phantom.left_lung, WORKING_SIZE)
    save_mask(lungs, root / TRUTH_MASKS / item.name)


def write_phantom_dataset(
    root: Path, recipe: PhantomRecipe | None = None, workers: int = 2
) -> list[Record]:
    """Write (or find already written) the dataset of `recipe`; returns its records."""
    recipe = recipe or PhantomRecipe()
    recipe_json = json.dumps(asdict(recipe), sort_keys=True)
    table = root / TABLE
    marker = root / RECIPE
    drawn = _draw(recipe)
    records = [
        Record(
            image_index=item.name,
            patient_id=f"SYN{recipe.seed}-{n:05d}",
            labels=tuple(item.labels[label] for label in FINDINGS),
            no_finding=int(not any(item.labels.values())),
            split=split,
        )
        for n, (item, split) in enumerate(drawn)
    ]
    if marker.is_file() and marker.read_text() == recipe_json and table.is_file():
        return records
    todo = [item for item, _ in drawn]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(_render, todo, [root] * len(todo), chunksize=8))
    write_curated_rows(records, table)
    text = recipe_json.encode()
    atomic_write(marker, lambda h: h.write(text))
    return records


def artefact_share(records: Sequence[Record], root: Path) -> dict[str, float]:
    """Share of images per split whose marker pixel is lit (a check of the recipe)."""
    shares: dict[str, list[int]] = {}
    for r in records:
        image = load_gray(root / IMAGES / r.image_index)
        size = image.shape[0]
        lit = int(image[int(0.08 * size), int(0.08 * size)] > 240)
        shares.setdefault(r.split, []).append(lit)
    return {split: float(np.mean(v)) for split, v in shares.items()}

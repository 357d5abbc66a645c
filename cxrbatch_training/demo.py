"""The demo bundle: a small M-50 classifier trained on phantoms in about a minute on a CPU.

It lets the README's main command run the whole pipeline (segmentation, classification,
screening triage) out of the box without any real data or downloaded weights. Trained on
SYNTHETIC phantoms: every output it produces says so and is not clinically meaningful.

Built once per recipe: a bundle folder whose metadata carries the same recipe is reused.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cxrbatch.files import atomic_write
from cxrbatch_training.data import resolve_images, split_records
from cxrbatch_training.evaluate import evaluate_run
from cxrbatch_training.export import export_bundle
from cxrbatch_training.phantoms import IMAGES, TRUTH_MASKS, PhantomRecipe, write_phantom_dataset
from cxrbatch_training.train import SMALL_CPU, DataSpec, train

log = logging.getLogger(__name__)

DEMO_NAME = "cxrbatch-demo-phantom-resnet50-M50"
DEMO_VERSION = "1"
DEMO_RECIPE = PhantomRecipe(
    seed=2026, counts={"train": 240, "val": 80, "test": 80}, size=256, artefact_splits=()
)
DEMO_TRAIN = SMALL_CPU.model_copy(
    update={"mask_mode": "M-50", "max_epochs": 4, "patience": 4, "device": "cpu"}
)
CONFIG_NAME = "demo.toml"


def _recipe() -> dict[str, Any]:
    return {
        "phantoms": json.loads(json.dumps(asdict(DEMO_RECIPE))),  # tuples as JSON lists
        "train": DEMO_TRAIN.model_dump(mode="json"),
        "version": DEMO_VERSION,
    }


def _cached(bundle: Path) -> bool:
    metadata = bundle / "configs" / "metadata.json"
    if not metadata.is_file() or not (bundle / "models" / "model.pt").is_file():
        return False
    try:
        return bool(json.loads(metadata.read_text()).get("demo_recipe") == _recipe())
    except json.JSONDecodeError:
        return False


def build_demo_bundle(
    bundle: Path, progress: bool = True, say: Callable[[str], None] | None = None
) -> Path:
    """Train and export the demo bundle into `bundle` (reused when already built).
    `say`: told each stage and each epoch as a line (a newcomer sees it is not hung)."""
    tell = say or (lambda _text: None)
    if _cached(bundle):
        log.info("demo bundle %s is up to date", bundle)
        tell(f"demo bundle {bundle} is up to date: reused")
        return bundle
    work = bundle / "_work"
    total = sum(DEMO_RECIPE.counts.values())
    tell(f"[1/4] writing {total} synthetic phantoms ({DEMO_RECIPE.size} px) ...")
    records = write_phantom_dataset(work / "data", DEMO_RECIPE)
    data = DataSpec(
        images=resolve_images(records, work / "data" / IMAGES),
        masks=work / "data" / TRUTH_MASKS,
        synthetic=True,
        description="cxrbatch demo: synthetic chest phantoms, known lung masks",
    )
    run = work / "run"
    val, test = split_records(records, "val"), split_records(records, "test")
    epochs = DEMO_TRAIN.max_epochs
    tell(
        f"[2/4] training {DEMO_TRAIN.architecture} ({DEMO_TRAIN.mask_mode} masks) on the CPU, "
        f"{epochs} epochs at most; a line per epoch ..."
    )

    def epoch_done(entry: dict[str, float]) -> None:
        tell(
            f"      epoch {int(entry['epoch']) + 1}/{epochs}: validation macro AUROC "
            f"{entry['val_macro_auroc']:.3f}, {entry['seconds']:.0f} s of training so far"
        )

    train(run, DEMO_TRAIN, data, split_records(records, "train"), val, progress, epoch_done)
    tell("[3/4] evaluating on the held-out phantoms ...")
    evaluate_run(run, data, val, test, DEMO_TRAIN.device)
    tell("[4/4] exporting the bundle ...")
    export_bundle(run, bundle, DEMO_NAME, DEMO_VERSION, 0.98, {"demo_recipe": _recipe()})
    shutil.rmtree(work, ignore_errors=True)  # the metrics are in the bundle metadata
    return bundle


def write_demo_config(bundle: Path, path: Path | None = None) -> Path:
    """A site config that runs the demo bundle as classifier and screening bundle."""
    path = path or bundle / CONFIG_NAME
    location = json.dumps(str(bundle.resolve()))
    text = (
        "# cxrbatch demo: a classifier trained on SYNTHETIC phantoms (not clinically meaningful)\n"
        "[classifier]\n"
        f"bundle = {location}\n"
        f"screening_bundle = {location}\n"
    ).encode()
    atomic_write(path, lambda h: h.write(text))
    return path

"""`cxrbatch training <command>` (also `python -m cxrbatch_training <command>`): reproduce
arXiv 2512.23089 and export cxrbatch bundles.

  curate    --out CURATED.csv [--nih-labels FILE] [--split image|patient] [--seed N]
  phantoms  --out DIR [--seed N] [--train 320 --val 80 --test 120] [--size 256]
  finetune  --images DIR --masks DIR [--masks DIR2] --run DIR [--backend ...] [--epochs N]
  masks     --table CURATED.csv --images DIR --cache DIR [--backend ...] [--device ...]
  train     --table CURATED.csv --images DIR [--masks DIR] --run DIR [--arch ...] [--mask-mode ...]
  evaluate  --table CURATED.csv --images DIR [--masks DIR] --run DIR
  export    --run DIR --bundle DIR --name NAME [--version V] [--screening-sensitivity 0.98]
  study     --preset paper --nih-labels FILE --nih-images DIR --out DIR [--splits 0 1 2 3 4]
  study     --preset synthetic-small --out DIR

Every step is resumable: re-running the same command continues where it stopped. One CLI
framework for the product and its training: this is a typer app, mounted under `cxrbatch`
as `training`; heavy imports (torch, MONAI) happen inside the commands.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from cxrbatch.cliapp import GuardedApp
from cxrbatch.config import SegmentationSettings
from cxrbatch.errors import CxrBatchError

log = logging.getLogger(__name__)


def _errors_to_exit(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return function(*args, **kwargs)
        except ModuleNotFoundError as exc:
            sys.stderr.write(
                f"error: the training commands need the module {exc.name}, which is not "
                "installed: pip install 'cxrbatch[training]'\n"
            )
            raise typer.Exit(2) from exc
        except (FileNotFoundError, ValueError, CxrBatchError) as exc:
            sys.stderr.write(f"error: {exc}\n")
            raise typer.Exit(2) from exc

    return run


app = GuardedApp(
    _errors_to_exit,
    name="training",
    help="Reproduce arXiv 2512.23089 (curate, fine-tune MedSAM, lung masks, train, evaluate, "
    "the whole study) and export the bundles cxrbatch runs. Every step resumes.",
)


class Split(enum.StrEnum):
    IMAGE = "image"
    PATIENT = "patient"


class Backend(enum.StrEnum):
    LITEMEDSAM = "litemedsam"
    MEDSAM_VITB = "medsam-vitb"


class Architecture(enum.StrEnum):
    RESNET50 = "resnet50"
    DENSENET121 = "densenet121"


class MaskMode(enum.StrEnum):
    ORIGINAL = "original"
    M15 = "M-15"
    M50 = "M-50"


class Preset(enum.StrEnum):
    PAPER = "paper"
    SYNTHETIC_SMALL = "synthetic-small"


BackendOption = Annotated[Backend, typer.Option(help="The segmenter to use or fine-tune.")]
CheckpointOption = Annotated[
    Path | None, typer.Option(help="MedSAM weights (ViT-B, or fine-tuned LiteMedSAM).")
]
DeviceOption = Annotated[str, typer.Option(help="auto | cpu | cuda")]
SeedOption = Annotated[int, typer.Option(help="Random seed.")]
TableOption = Annotated[Path, typer.Option(help="Curated CSV (curate / phantoms).")]
ImagesOption = Annotated[Path, typer.Option(help="Image root (searched at any depth).")]
MasksOption = Annotated[
    Path | None, typer.Option(help="Lung mask cache (training masks); needed for M-15/M-50.")
]
DescriptionOption = Annotated[
    str | None, typer.Option(help="Training data description for the bundle.")
]
SyntheticOption = Annotated[bool, typer.Option(help="The data are synthetic (bundles say so).")]
RunOption = Annotated[Path, typer.Option(help="Run folder (resumes when it exists).")]


def _print(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _segmentation(backend: Backend, checkpoint: Path | None, device: str) -> SegmentationSettings:
    fields: dict[str, Any] = {"backend": backend.value, "device": device}
    if checkpoint:
        key = "medsam_checkpoint" if backend is Backend.MEDSAM_VITB else "litemedsam_checkpoint"
        fields[key] = str(checkpoint)
    return SegmentationSettings.model_validate(fields)


def _data(
    table: Path, images: Path, masks: Path | None, description: str | None, synthetic: bool
) -> tuple[list[Any], Any]:
    from cxrbatch_training.data import read_curated, resolve_images
    from cxrbatch_training.train import DataSpec

    records = read_curated(table)
    found = resolve_images(records, images)
    spec = DataSpec(found, masks, synthetic, description or f"table {table.name}")
    return records, spec


@app.command()
def curate(
    out: Annotated[Path, typer.Option(help="CSV to write.")],
    nih_labels: Annotated[
        Path | None,
        typer.Option(
            help="Data_Entry_2017.csv or Data_Entry_2017_v2020.csv(.gz); default: the file "
            "shipped in the torchxrayvision package."
        ),
    ] = None,
    split: Annotated[Split, typer.Option(help="Split by image or by patient.")] = Split.IMAGE,
    seed: SeedOption = 0,
    per_class: Annotated[int, typer.Option(help="Images per class at most.")] = 2000,
) -> None:
    """Curate the NIH ChestX-ray14 subset and split it."""
    from cxrbatch_training.curate import curate as curated
    from cxrbatch_training.curate import packaged_nih_labels, summary, write_curated

    labels = nih_labels or packaged_nih_labels()
    rows = curated(labels, per_class=per_class, seed=seed, split=split.value)
    write_curated(rows, out)
    _print({"nih_labels": str(labels), "seed": seed, "split": split.value, **summary(rows)})


@app.command()
def phantoms(
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into.")],
    seed: SeedOption = 0,
    train: Annotated[int, typer.Option(help="Training images.")] = 320,
    val: Annotated[int, typer.Option(help="Validation images.")] = 80,
    test: Annotated[int, typer.Option(help="Test images.")] = 120,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
) -> None:
    """A synthetic dataset in the curated layout."""
    from cxrbatch_training.phantoms import PhantomRecipe, artefact_share, write_phantom_dataset

    recipe = PhantomRecipe(seed=seed, counts={"train": train, "val": val, "test": test}, size=size)
    records = write_phantom_dataset(out, recipe)
    _print({"out": str(out), "images": len(records), "marker_share": artefact_share(records, out)})


@app.command()
def finetune(
    images: Annotated[Path, typer.Option(help="Image folder (any depth).")],
    masks: Annotated[
        list[Path],
        typer.Option(
            help="Mask folder; repeat for one folder per lung (Montgomery, JSRT/SCR): unioned."
        ),
    ],
    run: RunOption,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 10,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    batch_images: Annotated[int, typer.Option(help="Images per batch.")] = 4,
    box_jitter: Annotated[float, typer.Option(help="Box prompt jitter (share).")] = 0.1,
    freeze_image_encoder: Annotated[bool, typer.Option(help="Train the decoder only.")] = False,
    seed: SeedOption = 0,
    backend: BackendOption = Backend.LITEMEDSAM,
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Fine-tune MedSAM on lung image/mask folders."""
    from cxrbatch_training.data import lung_mask_pairs
    from cxrbatch_training.finetune import FinetuneConfig
    from cxrbatch_training.finetune import finetune as tune

    config = FinetuneConfig(
        backend=backend.value,
        checkpoint=str(checkpoint or ""),
        epochs=epochs,
        learning_rate=lr,
        batch_images=batch_images,
        box_jitter=box_jitter,
        freeze_image_encoder=freeze_image_encoder,
        seed=seed,
        device=device,
    )
    summary = tune(run, config, lung_mask_pairs(images, list(masks)))
    _print({k: v for k, v in summary.items() if k != "history"})


@app.command("masks")
def lung_masks(
    table: TableOption,
    images: ImagesOption,
    cache: Annotated[Path, typer.Option(help="Mask cache folder.")],
    backend: BackendOption = Backend.LITEMEDSAM,
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Lung masks by the pipeline's segmenter, cached (exit 1 when some failed)."""
    from cxrbatch_training.data import read_curated, resolve_images
    from cxrbatch_training.maskgen import generate_masks

    found = resolve_images(read_curated(table), images)
    failures = generate_masks(found, cache, _segmentation(backend, checkpoint, device))
    _print({"images": len(found), "failures": len(failures), "cache": str(cache)})
    if failures:
        raise typer.Exit(1)


@app.command("train")
def train_classifier(
    table: TableOption,
    images: ImagesOption,
    run: RunOption,
    masks: MasksOption = None,
    description: DescriptionOption = None,
    synthetic: SyntheticOption = False,
    device: DeviceOption = "auto",
    arch: Annotated[Architecture, typer.Option(help="Classifier.")] = Architecture.RESNET50,
    mask_mode: Annotated[MaskMode, typer.Option(help="Input masking.")] = MaskMode.ORIGINAL,
    input_size: Annotated[int, typer.Option(help="Input side in pixels.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 4,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    epochs: Annotated[int, typer.Option(help="Epochs at most.")] = 30,
    patience: Annotated[int, typer.Option(help="Early-stopping patience (epochs).")] = 5,
    seed: SeedOption = 0,
    workers: Annotated[int, typer.Option(help="Data loader processes.")] = 2,
    no_imagenet: Annotated[
        bool, typer.Option("--no-imagenet", help="Random initialisation.")
    ] = False,
) -> None:
    """Train one classifier (paper defaults)."""
    from cxrbatch_training.data import split_records
    from cxrbatch_training.train import TrainConfig, train

    records, data = _data(table, images, masks, description, synthetic)
    config = TrainConfig(
        architecture=arch.value,
        mask_mode=mask_mode.value,
        input_size=input_size,
        batch_size=batch_size,
        learning_rate=lr,
        max_epochs=epochs,
        patience=patience,
        seed=seed,
        pretrained=not no_imagenet,
        device=device,
        num_workers=workers,
    )
    result = train(
        run, config, data, split_records(records, "train"), split_records(records, "val")
    )
    _print(asdict(result))


@app.command()
def evaluate(
    table: TableOption,
    images: ImagesOption,
    run: RunOption,
    masks: MasksOption = None,
    description: DescriptionOption = None,
    synthetic: SyntheticOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Evaluate a run on its test split."""
    from cxrbatch_training.data import split_records
    from cxrbatch_training.evaluate import evaluate_run

    records, data = _data(table, images, masks, description, synthetic)
    result = evaluate_run(
        run, data, split_records(records, "val"), split_records(records, "test"), device
    )
    _print({"macro": result["macro"], "no_finding": result["no_finding"]})


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="An evaluated run folder.")],
    bundle: Annotated[Path, typer.Option(help="Bundle folder to write.")],
    name: Annotated[str, typer.Option(help="The bundle's model name.")],
    version: Annotated[str, typer.Option(help="The bundle's version.")] = "1",
    screening_sensitivity: Annotated[
        float, typer.Option(help="Sensitivity the screening threshold keeps.")
    ] = 0.98,
) -> None:
    """Export an evaluated run as a cxrbatch bundle."""
    from cxrbatch_training.export import export_bundle

    path = export_bundle(run, bundle, name, version, screening_sensitivity)
    _print({"bundle": str(path)})


@app.command()
def study(
    preset: Annotated[Preset, typer.Option(help="The paper's grid or a small synthetic one.")],
    out: Annotated[Path, typer.Option(help="Study folder (resumes when it exists).")],
    nih_labels: Annotated[Path | None, typer.Option(help="The NIH label file.")] = None,
    nih_images: Annotated[
        Path | None, typer.Option(help="Folder holding the NIH PNGs (any depth).")
    ] = None,
    split: Annotated[Split, typer.Option(help="Split by image or by patient.")] = Split.IMAGE,
    splits: Annotated[
        list[int] | None, typer.Option(help="Split seeds, repeated (default 0-4 / 0-1).")
    ] = None,
    segmenter_masks: Annotated[
        bool,
        typer.Option(help="synthetic-small: LiteMedSAM masks instead of the phantoms' own."),
    ] = False,
    backend: BackendOption = Backend.LITEMEDSAM,
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Run the whole grid and write the report (study.md; exit 1 when nothing ran)."""
    from cxrbatch_training.curate import packaged_nih_labels
    from cxrbatch_training.study import paper_config, run_study, synthetic_small_config

    overrides: dict[str, Any] = {}
    if splits:
        overrides["splits"] = tuple(splits)
    if preset is Preset.PAPER:
        overrides.update(
            nih_labels=nih_labels or packaged_nih_labels(),
            nih_images=nih_images,
            split_mode=split.value,
            segmentation=_segmentation(backend, checkpoint, device),
        )
        config = paper_config(**overrides)
    else:
        if segmenter_masks:
            overrides.update(
                masks="segmenter", segmentation=_segmentation(backend, checkpoint, device)
            )
        config = synthetic_small_config(**overrides)
    if device != "auto":
        config = config.model_copy(
            update={"train": config.train.model_copy(update={"device": device})}
        )
    report = run_study(config, out)
    sys.stdout.write((out / "study.md").read_text())
    if not report["settings"]:
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """Run one command as `python -m cxrbatch_training` does; returns its exit status (a
    usage error is 2, as typer gives it)."""
    try:
        app(args=argv, prog_name="cxrbatch training")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0

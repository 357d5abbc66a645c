"""`python -m training <command>`: reproduce arXiv 2512.23089 and export cxrbatch bundles.

  curate    --out CURATED.csv [--nih-labels FILE] [--split image|patient] [--seed N]
  phantoms  --out DIR [--seed N] [--train 320 --val 80 --test 120] [--size 256]
  finetune  --images DIR --masks DIR [--masks DIR2] --run DIR [--backend ...] [--epochs N]
  masks     --table CURATED.csv --images DIR --cache DIR [--backend ...] [--device ...]
  train     --table CURATED.csv --images DIR [--masks DIR] --run DIR [--arch ...] [--mask-mode ...]
  evaluate  --table CURATED.csv --images DIR [--masks DIR] --run DIR
  export    --run DIR --bundle DIR --name NAME [--version V] [--screening-sensitivity 0.98]
  study     --preset paper --nih-labels FILE --nih-images DIR --out DIR [--splits 0 1 2 3 4]
  study     --preset synthetic-small --out DIR

Every step is resumable: re-running the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cxrbatch.config import SegmentationSettings
from cxrbatch.errors import CxrBatchError
from training.curate import curate, packaged_nih_labels, summary, write_curated


def _print(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _curate(args: argparse.Namespace) -> int:
    labels = Path(args.nih_labels) if args.nih_labels else packaged_nih_labels()
    rows = curate(labels, per_class=args.per_class, seed=args.seed, split=args.split)
    write_curated(rows, Path(args.out))
    _print({"nih_labels": str(labels), "seed": args.seed, "split": args.split, **summary(rows)})
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from training.phantoms import PhantomRecipe, artefact_share, write_phantom_dataset

    recipe = PhantomRecipe(
        seed=args.seed,
        counts={"train": args.train, "val": args.val, "test": args.test},
        size=args.size,
    )
    out = Path(args.out)
    records = write_phantom_dataset(out, recipe)
    _print({"out": str(out), "images": len(records), "marker_share": artefact_share(records, out)})
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from training.data import lung_mask_pairs
    from training.finetune import FinetuneConfig, finetune

    pairs = lung_mask_pairs(Path(args.images), [Path(m) for m in args.masks])
    config = FinetuneConfig(
        backend=args.backend,
        checkpoint=args.checkpoint or "",
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_images=args.batch_images,
        box_jitter=args.box_jitter,
        freeze_image_encoder=args.freeze_image_encoder,
        seed=args.seed,
        device=args.device,
    )
    summary = finetune(Path(args.run), config, pairs)
    _print({k: v for k, v in summary.items() if k != "history"})
    return 0


def _segmentation(args: argparse.Namespace) -> SegmentationSettings:
    fields = {"backend": args.backend, "device": args.device}
    if args.checkpoint:
        key = "medsam_checkpoint" if args.backend == "medsam-vitb" else "litemedsam_checkpoint"
        fields[key] = args.checkpoint
    return SegmentationSettings.model_validate(fields)


def _table(args: argparse.Namespace) -> tuple[list[Any], dict[str, Path]]:
    from training.data import read_curated, resolve_images

    records = read_curated(Path(args.table))
    return records, resolve_images(records, Path(args.images))


def _masks(args: argparse.Namespace) -> int:
    from training.maskgen import generate_masks

    _, images = _table(args)
    failures = generate_masks(images, Path(args.cache), _segmentation(args))
    _print({"images": len(images), "failures": len(failures), "cache": args.cache})
    return 1 if failures else 0


def _data_spec(args: argparse.Namespace) -> tuple[list[Any], Any]:
    from training.train import DataSpec

    records, images = _table(args)
    description = args.description or f"table {Path(args.table).name}"
    masks = Path(args.masks) if args.masks else None
    return records, DataSpec(images, masks, args.synthetic, description)


def _train(args: argparse.Namespace) -> int:
    from training.data import split_records
    from training.train import TrainConfig, train

    records, data = _data_spec(args)
    config = TrainConfig(
        architecture=args.arch,
        mask_mode=args.mask_mode,
        input_size=args.input_size,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        max_epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        pretrained=not args.no_imagenet,
        device=args.device,
        num_workers=args.workers,
    )
    result = train(
        Path(args.run),
        config,
        data,
        split_records(records, "train"),
        split_records(records, "val"),
    )
    _print(asdict(result))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.data import split_records
    from training.evaluate import evaluate_run

    records, data = _data_spec(args)
    result = evaluate_run(
        Path(args.run),
        data,
        split_records(records, "val"),
        split_records(records, "test"),
        args.device,
    )
    _print({"macro": result["macro"], "no_finding": result["no_finding"]})
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export_bundle

    path = export_bundle(
        Path(args.run), Path(args.bundle), args.name, args.version, args.screening_sensitivity
    )
    _print({"bundle": str(path)})
    return 0


def _study(args: argparse.Namespace) -> int:
    from training.study import paper_config, run_study, synthetic_small_config

    overrides: dict[str, Any] = {}
    if args.splits:
        overrides["splits"] = tuple(args.splits)
    if args.preset == "paper":
        overrides.update(
            nih_labels=Path(args.nih_labels) if args.nih_labels else packaged_nih_labels(),
            nih_images=Path(args.nih_images) if args.nih_images else None,
            split_mode=args.split,
            segmentation=_segmentation(args),
        )
        config = paper_config(**overrides)
    else:
        if args.segmenter_masks:
            overrides.update(masks="segmenter", segmentation=_segmentation(args))
        config = synthetic_small_config(**overrides)
    if args.device != "auto":
        config = config.model_copy(
            update={"train": config.train.model_copy(update={"device": args.device})}
        )
    report = run_study(config, Path(args.out))
    sys.stdout.write((Path(args.out) / "study.md").read_text())
    return 0 if report["settings"] else 1


def _add_segmentation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("litemedsam", "medsam-vitb"), default="litemedsam")
    parser.add_argument("--checkpoint", help="MedSAM weights (ViT-B, or fine-tuned LiteMedSAM)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, help="curated CSV (curate / phantoms)")
    parser.add_argument("--images", required=True, help="image root (searched at any depth)")
    parser.add_argument("--masks", help="lung mask cache (training masks); needed for M-15/M-50")
    parser.add_argument("--description", help="training data description for the bundle")
    parser.add_argument(
        "--synthetic", action="store_true", help="the data are synthetic (bundles say so)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("curate", help="Curate the NIH ChestX-ray14 subset and split it.")
    p.add_argument(
        "--nih-labels",
        help="Data_Entry_2017.csv or Data_Entry_2017_v2020.csv(.gz); default: the file "
        "shipped in the torchxrayvision package.",
    )
    p.add_argument("--out", required=True, help="CSV to write.")
    p.add_argument("--split", choices=("image", "patient"), default="image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=2000)
    p.set_defaults(handler=_curate)

    p = commands.add_parser("phantoms", help="A synthetic dataset in the curated layout.")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=320)
    p.add_argument("--val", type=int, default=80)
    p.add_argument("--test", type=int, default=120)
    p.add_argument("--size", type=int, default=256)
    p.set_defaults(handler=_phantoms)

    p = commands.add_parser("finetune", help="Fine-tune MedSAM on lung image/mask folders.")
    p.add_argument("--images", required=True, help="image folder (any depth)")
    p.add_argument(
        "--masks",
        required=True,
        action="append",
        help="mask folder; repeat for one folder per lung (Montgomery, JSRT/SCR): unioned",
    )
    p.add_argument("--run", required=True, help="run folder (resumes when it exists)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-images", type=int, default=4)
    p.add_argument("--box-jitter", type=float, default=0.1)
    p.add_argument("--freeze-image-encoder", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    _add_segmentation(p)
    p.set_defaults(handler=_finetune)

    p = commands.add_parser("masks", help="Lung masks by the pipeline's segmenter, cached.")
    p.add_argument("--table", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--cache", required=True)
    _add_segmentation(p)
    p.set_defaults(handler=_masks)

    p = commands.add_parser("train", help="Train one classifier (paper defaults).")
    _add_data(p)
    p.add_argument("--run", required=True, help="run folder (resumes when it exists)")
    p.add_argument("--arch", choices=("resnet50", "densenet121"), default="resnet50")
    p.add_argument("--mask-mode", choices=("original", "M-15", "M-50"), default="original")
    p.add_argument("--input-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-imagenet", action="store_true", help="random initialisation")
    p.set_defaults(handler=_train)

    p = commands.add_parser("evaluate", help="Evaluate a run on its test split.")
    _add_data(p)
    p.add_argument("--run", required=True)
    p.set_defaults(handler=_evaluate)

    p = commands.add_parser("export", help="Export an evaluated run as a cxrbatch bundle.")
    p.add_argument("--run", required=True)
    p.add_argument("--bundle", required=True, help="bundle folder to write")
    p.add_argument("--name", required=True)
    p.add_argument("--version", default="1")
    p.add_argument("--screening-sensitivity", type=float, default=0.98)
    p.set_defaults(handler=_export)

    p = commands.add_parser("study", help="Run the whole grid and write the report.")
    p.add_argument("--preset", choices=("paper", "synthetic-small"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--nih-labels")
    p.add_argument("--nih-images", help="folder holding the NIH PNGs (any depth)")
    p.add_argument("--split", choices=("image", "patient"), default="image")
    p.add_argument("--splits", type=int, nargs="*", help="split seeds (default 0-4 / 0-1)")
    p.add_argument(
        "--segmenter-masks",
        action="store_true",
        help="synthetic-small: LiteMedSAM masks instead of the phantoms' known masks",
    )
    _add_segmentation(p)
    p.set_defaults(handler=_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (FileNotFoundError, ValueError, CxrBatchError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

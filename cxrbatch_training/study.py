"""The study runner: 2 architectures x 3 mask modes x N splits, tables, ROC plots, report.

For each split seed: the data table (NIH: `curate` with that seed; phantoms: a phantom
dataset drawn with that seed), the lung masks (the pipeline's segmenter, cached; for
phantoms optionally their known masks), then for each architecture and mask mode a run
folder `runs/split_<s>/<arch>_<mode>/` that is trained (resumable), evaluated and kept.
Everything is resumable: a killed study re-run with the same command continues.

The report (`study.md`, CSV tables, `roc_<arch>.png`, `study.json`) aggregates the runs:
mean and standard deviation over splits, paired tests of each mask mode against the
original images across splits, screening operating points, training times, and the
paper's headline numbers beside ours.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cxrbatch.config import SegmentationSettings
from cxrbatch.dicom.export import write_json
from cxrbatch.models.masks import MASK_MODES, MaskMode
from cxrbatch_training.curate import FINDINGS, curate, write_curated
from cxrbatch_training.data import Record, read_curated, resolve_images, split_records
from cxrbatch_training.evaluate import EVALUATION, PREDICTIONS, evaluate_run
from cxrbatch_training.maskgen import generate_masks
from cxrbatch_training.metrics import paired_tests
from cxrbatch_training.phantoms import IMAGES, TRUTH_MASKS, PhantomRecipe, write_phantom_dataset
from cxrbatch_training.train import SMALL_CPU, DataSpec, TrainConfig, train

log = logging.getLogger(__name__)

Architecture = Literal["resnet50", "densenet121"]

# Headline numbers of arXiv 2512.23089 (as summarised in the project's issue).
PAPER = {
    "resnet50 original macro AUROC": 0.794,
    "M-15 vs original macro AUROC": "about -0.01",
    "M-50 vs original macro AUROC": "comparable",
    "M-50 vs original No Finding AUROC": "about +0.02 (significant)",
    "ResNet50 training minutes (masked vs original)": "about 52 vs 54",
}


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["nih", "phantoms"]
    architectures: tuple[Architecture, ...] = ("resnet50", "densenet121")
    mask_modes: tuple[MaskMode, ...] = MASK_MODES
    splits: tuple[int, ...] = (0, 1, 2, 3, 4)
    train: TrainConfig = TrainConfig()
    # NIH ChestX-ray14
    nih_labels: Path | None = None
    nih_images: Path | None = None
    split_mode: Literal["image", "patient"] = "image"
    per_class: Annotated[int, Field(ge=1)] = 2000
    # Lung masks: the pipeline's segmenter (cached in `mask_cache`), or, for phantoms, the
    # phantoms' known masks ("truth").
    masks: Literal["segmenter", "truth"] = "segmenter"
    mask_cache: Path | None = None
    segmentation: SegmentationSettings = SegmentationSettings()
    # Phantoms
    phantom_counts: dict[str, int] = {"train": 320, "val": 80, "test": 120}
    phantom_size: int = 256


def paper_config(**overrides: Any) -> StudyConfig:
    """The paper's grid and hyper-parameters on NIH ChestX-ray14."""
    return StudyConfig(source="nih", **overrides)


def synthetic_small_config(**overrides: Any) -> StudyConfig:
    """Phantoms with the label-correlated marker in train/val only; minutes on a CPU.

    Deviations from the paper, for time: 64 x 64 inputs, batch 16, lr 1e-3, 5 epochs,
    2 splits, 320 training images, random initialisation (no ImageNet weights offline),
    the phantoms' known lung masks (`masks="segmenter"` runs LiteMedSAM instead).
    """
    settings: dict[str, Any] = {
        "source": "phantoms",
        "splits": (0, 1),
        "masks": "truth",
        "train": SMALL_CPU,
    }
    settings.update(overrides)
    return StudyConfig(**settings)


@dataclass(frozen=True)
class SplitData:
    seed: int
    records: list[Record]
    data: DataSpec


def _prepare_split(config: StudyConfig, out: Path, seed: int) -> SplitData:
    needs_masks = any(mode != "original" for mode in config.mask_modes)
    if config.source == "phantoms":
        root = out / "data" / f"split_{seed}"
        recipe = PhantomRecipe(
            seed=seed, counts=dict(config.phantom_counts), size=config.phantom_size
        )
        records = write_phantom_dataset(root, recipe)
        images = resolve_images(records, root / IMAGES)
        description = (
            f"synthetic chest phantoms (cxrbatch_training.synthetic), seed {seed}, "
            f"{config.phantom_size} px, label-correlated marker in train/val only"
        )
        masks = (
            root / TRUTH_MASKS
            if config.masks == "truth"
            else config.mask_cache or root / "masks_segmenter"
        )
        synthetic = True
    else:
        if config.nih_labels is None or config.nih_images is None:
            raise ValueError("The NIH study needs --nih-labels and --nih-images.")
        if config.masks == "truth":
            raise ValueError("NIH ChestX-ray14 has no lung masks: use masks = 'segmenter'.")
        table = out / "data" / f"curated_split_{seed}.csv"
        if not table.is_file():
            write_curated(
                curate(
                    config.nih_labels,
                    per_class=config.per_class,
                    seed=seed,
                    split=config.split_mode,
                ),
                table,
            )
        records = read_curated(table)
        images = resolve_images(records, config.nih_images)
        masks = config.mask_cache or out / "masks"
        description = (
            f"NIH ChestX-ray14 subset of arXiv 2512.23089, {config.split_mode}-level split, "
            f"seed {seed}"
        )
        synthetic = False
    if needs_masks and config.masks == "segmenter" and masks is not None:
        failures = generate_masks(images, masks, config.segmentation)
        if failures:
            raise ValueError(f"{len(failures)} images have no lung mask; see {masks}/failures.json")
    return SplitData(seed, records, DataSpec(images, masks, synthetic, description))


def run_dir(out: Path, seed: int, architecture: str, mode: str) -> Path:
    return out / "runs" / f"split_{seed}" / f"{architecture}_{mode}"


def run_study(config: StudyConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study_config.json", config.model_dump(mode="json"))
    cells: list[dict[str, Any]] = []
    for seed in config.splits:
        split = _prepare_split(config, out, seed)
        train_records = split_records(split.records, "train")
        val_records = split_records(split.records, "val")
        test_records = split_records(split.records, "test")
        for architecture in config.architectures:
            for mode in config.mask_modes:
                cell_config = config.train.model_copy(
                    update={"architecture": architecture, "mask_mode": mode, "seed": seed}
                )
                directory = run_dir(out, seed, architecture, mode)
                result = train(
                    directory, cell_config, split.data, train_records, val_records, progress
                )
                if (directory / EVALUATION).is_file():
                    evaluation = json.loads((directory / EVALUATION).read_text())
                else:
                    evaluation = evaluate_run(
                        directory, split.data, val_records, test_records, config.train.device
                    )
                cells.append(
                    {
                        "split": seed,
                        "architecture": architecture,
                        "mask_mode": mode,
                        "run_dir": str(directory),
                        "best_epoch": result.best_epoch,
                        "epochs_run": result.epochs_run,
                        "val_macro_auroc": result.best_val_macro_auroc,
                        "training_minutes": result.training_seconds / 60.0,
                        "evaluation": evaluation,
                    }
                )
    report = aggregate(cells, config)
    write_report(report, cells, config, out)
    return report


def _mean_sd(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, float)
    array = array[np.isfinite(array)]
    if len(array) == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def aggregate(cells: list[dict[str, Any]], config: StudyConfig) -> dict[str, Any]:
    """Mean and SD over splits per setting, paired tests against the original images."""
    settings: list[dict[str, Any]] = []
    by_setting: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        by_setting.setdefault((cell["architecture"], cell["mask_mode"]), []).append(cell)
    for (architecture, mode), group in by_setting.items():
        ev = [c["evaluation"] for c in group]
        row: dict[str, Any] = {
            "architecture": architecture,
            "mask_mode": mode,
            "splits": len(group),
        }
        for name, values in {
            "macro_auroc": [e["macro"]["auroc"] for e in ev],
            "macro_precision": [e["macro"]["precision"] for e in ev],
            "macro_recall": [e["macro"]["recall"] for e in ev],
            "macro_f1": [e["macro"]["f1"] for e in ev],
            "no_finding_auroc": [e["no_finding"]["auroc"] for e in ev],
            "val_macro_auroc": [c["val_macro_auroc"] for c in group],
            "training_minutes": [c["training_minutes"] for c in group],
            "epochs_run": [c["epochs_run"] for c in group],
            **{f"auroc_{label}": [e["labels"][label]["auroc"] for e in ev] for label in FINDINGS},
            **{
                f"screen{int(t * 100)}_{key}": [
                    next(p[key] for p in e["screening"] if p["target_sensitivity"] == t) for e in ev
                ]
                for t in (0.98, 0.99)
                for key in ("test_sensitivity", "test_normals_auto_triaged")
            },
        }.items():
            row[name], row[f"{name}_sd"] = _mean_sd(values)
        settings.append(row)
    tests = []
    for architecture in config.architectures:
        base = {
            c["split"]: c["evaluation"]
            for c in cells
            if c["architecture"] == architecture and c["mask_mode"] == "original"
        }
        for mode in config.mask_modes:
            if mode == "original" or not base:
                continue
            other = {
                c["split"]: c["evaluation"]
                for c in cells
                if c["architecture"] == architecture and c["mask_mode"] == mode
            }
            seeds = sorted(set(base) & set(other))
            for metric, (part, key) in (
                ("macro_auroc", ("macro", "auroc")),
                ("no_finding_auroc", ("no_finding", "auroc")),
            ):
                result = paired_tests(
                    [base[s][part][key] for s in seeds], [other[s][part][key] for s in seeds]
                )
                tests.append(
                    {
                        "architecture": architecture,
                        "comparison": f"{mode} - original",
                        "metric": metric,
                        **result,
                    }
                )
    return {"settings": settings, "paired_tests": tests, "paper": PAPER}


def _fmt(mean: float, sd: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {sd:.3f}"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _rows(report: dict[str, Any], keys: tuple[str, ...], tail: Any = None) -> list[str]:
    """One table row per setting: mean ± SD of `keys`, then tail(row) if given."""
    return [
        f"| {r['architecture']} | {r['mask_mode']} | "
        + " | ".join(_fmt(r[k], r[f"{k}_sd"]) for k in keys)
        + (tail(r) if tail else "")
        + " |"
        for r in report["settings"]
    ]


def markdown_report(report: dict[str, Any], config: StudyConfig) -> str:
    lines = [f"# Study report ({config.source}, splits {list(config.splits)})", ""]
    if config.source == "phantoms":
        lines += [
            "**SYNTHETIC DATA.** Phantoms whose train and validation splits carry a marker "
            "outside the lungs that goes with abnormality; the test split has none. "
            "These numbers show the mechanism, not clinical performance.",
            "",
        ]
    t = config.train
    lines += [
        f"Training: input {t.input_size} px, batch {t.batch_size}, Adam lr {t.learning_rate}, "
        f"up to {t.max_epochs} epochs (patience {t.patience}), ImageNet weights "
        f"{'requested' if t.pretrained else 'not used'}; masks: {config.masks}.",
        "",
        "## Test metrics (mean ± SD over splits)",
        "",
        "| architecture | mask | macro AUROC | precision | recall | F1 | No Finding AUROC "
        "| val macro AUROC | val - test | train min | epochs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += _rows(
        report,
        (
            "macro_auroc",
            "macro_precision",
            "macro_recall",
            "macro_f1",
            "no_finding_auroc",
            "val_macro_auroc",
        ),
        lambda r: (
            f" | {r['val_macro_auroc'] - r['macro_auroc']:+.3f}"
            f" | {r['training_minutes']:.1f} | {r['epochs_run']:.1f}"
        ),
    )
    lines += [
        "",
        "## Per-label test AUROC",
        "",
        "| architecture | mask | " + " | ".join(FINDINGS) + " |",
        "| --- | --- |" + " --- |" * len(FINDINGS),
    ]
    lines += _rows(report, tuple(f"auroc_{x}" for x in FINDINGS))
    lines += [
        "",
        "## Screening on the No Finding score (thresholds chosen on validation)",
        "",
        "| architecture | mask | sens. @0.98 target | normals auto-triaged | "
        "sens. @0.99 target | normals auto-triaged |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += _rows(
        report,
        (
            "screen98_test_sensitivity",
            "screen98_test_normals_auto_triaged",
            "screen99_test_sensitivity",
            "screen99_test_normals_auto_triaged",
        ),
    )
    lines += [
        "",
        "## Paired tests across splits (mask mode minus original)",
        "",
        "| architecture | comparison | metric | splits | mean difference | paired t p | "
        "Wilcoxon p |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in report["paired_tests"]:
        lines.append(
            f"| {p['architecture']} | {p['comparison']} | {p['metric']} | {int(p['n'])} | "
            f"{p['mean_difference']:+.3f} | {p['t_test_p']:.3g} | {p['wilcoxon_p']:.3g} |"
        )
    lines += ["", "## The paper's headline numbers (arXiv 2512.23089)", ""]
    lines += [f"- {k}: {v}" for k, v in report["paper"].items()]
    if config.source == "phantoms":
        lines += [
            "",
            "Not comparable in size with the paper: phantoms, small inputs, few epochs, "
            "random initialisation. What to read: whether the original-image model's test "
            "AUROC falls below its validation AUROC (marker present) more than M-50's does.",
        ]
    return "\n".join(lines) + "\n"


def plot_roc(cells: list[dict[str, Any]], out: Path) -> list[Path]:
    """ROC curves of the first split: per architecture, each label and No Finding."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import roc_curve
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[training]'): no ROC plots")
        return []
    written = []
    first = min(c["split"] for c in cells)
    for architecture in sorted({c["architecture"] for c in cells}):
        group = [c for c in cells if c["architecture"] == architecture and c["split"] == first]
        fig, axes = plt.subplots(2, 3, figsize=(12, 8))
        for cell in group:
            with np.load(Path(cell["run_dir"]) / PREDICTIONS) as p:
                probs, labels, nf = p["test_probs"], p["test_labels"], p["test_no_finding"]
            curves = [(label, probs[:, k], labels[:, k]) for k, label in enumerate(FINDINGS)]
            curves.append(("No Finding", 1.0 - probs.max(1), nf))
            for ax, (title, score, truth) in zip(axes.flat, curves, strict=True):
                if truth.min() != truth.max():
                    fpr, tpr, _ = roc_curve(truth, score)
                    ax.plot(fpr, tpr, label=cell["mask_mode"])
                ax.set_title(title)
                ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
                ax.set_xlabel("1 - specificity")
                ax.set_ylabel("sensitivity")
                ax.legend(loc="lower right", fontsize=8)
        fig.suptitle(f"{architecture}, test split of split seed {first}")
        fig.tight_layout()
        path = out / f"roc_{architecture}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def write_report(
    report: dict[str, Any], cells: list[dict[str, Any]], config: StudyConfig, out: Path
) -> None:
    _write_csv(out / "study_settings.csv", report["settings"])
    _write_csv(out / "paired_tests.csv", report["paired_tests"])
    _write_csv(
        out / "study_runs.csv",
        [{k: v for k, v in c.items() if k != "evaluation"} for c in cells],
    )
    (out / "study.md").write_text(markdown_report(report, config))
    (out / "study.json").write_text(json.dumps({"report": report, "runs": cells}, indent=2))
    plot_roc(cells, out)

"""Evaluation of a trained run on its test split, operating points chosen on validation.

Writes `evaluation.json` (per-label and macro AUROC with bootstrap 95 % CIs, precision,
recall and F1 at the validation F1-optimal thresholds, No Finding AUROC, screening points)
and `predictions.npz` (validation and test probabilities and labels, for ROC curves and
paired tests) into the run folder.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cxrbatch.dicom.export import write_json
from cxrbatch.files import atomic_write
from cxrbatch.models.device import resolve_device
from cxrbatch_training.curate import FINDINGS
from cxrbatch_training.data import Record
from cxrbatch_training.metrics import (
    auroc,
    bootstrap_ci,
    f1_optimal_thresholds,
    macro_auroc,
    no_finding_score,
    per_label_auroc,
    screening_points,
    threshold_metrics,
)
from cxrbatch_training.train import DataSpec, dataset, load_trained, make_loader, predict

EVALUATION = "evaluation.json"
PREDICTIONS = "predictions.npz"


def _predict_splits(
    run_dir: Path, data: DataSpec, splits: list[list[Record]], device: str = "auto"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Probabilities and labels per split, with the run's best weights loaded once."""
    torch_device = resolve_device(device)
    network, config = load_trained(run_dir, torch_device)
    return [
        predict(
            network,
            make_loader(dataset(records, data, config, cache=False), config, shuffle=False),
            torch_device,
        )
        for records in splits
    ]


def summarise(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    val_nf: np.ndarray,
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    test_nf: np.ndarray,
    resamples: int = 1000,
) -> dict[str, Any]:
    """All the numbers of one run from its predictions (pure: used by tests as well)."""
    thresholds = f1_optimal_thresholds(val_probs, val_labels)
    at = threshold_metrics(test_probs, test_labels, thresholds)
    aurocs = per_label_auroc(test_probs, test_labels)
    labels: dict[str, Any] = {}
    for k, label in enumerate(FINDINGS):
        labels[label] = {
            "auroc": aurocs[k],
            "auroc_ci95": bootstrap_ci(auroc, [test_probs[:, k], test_labels[:, k]], resamples),
            "threshold": float(thresholds[k]),
            "precision": float(at["precision"][k]),
            "recall": float(at["recall"][k]),
            "f1": float(at["f1"][k]),
            "positives": int(test_labels[:, k].sum()),
        }
    test_score = no_finding_score(test_probs)
    val_score = no_finding_score(val_probs)
    points = screening_points(val_score, val_labels.max(1), test_score, test_labels.max(1))
    return {
        "labels": labels,
        "macro": {
            "auroc": macro_auroc(test_probs, test_labels),
            "auroc_ci95": bootstrap_ci(macro_auroc, [test_probs, test_labels], resamples),
            "precision": float(np.mean(at["precision"])),
            "recall": float(np.mean(at["recall"])),
            "f1": float(np.mean(at["f1"])),
        },
        "no_finding": {
            "auroc": auroc(test_score, test_nf),
            "auroc_ci95": bootstrap_ci(auroc, [test_score, test_nf], resamples),
            "definition": "1 - max(p) over the five findings",
        },
        "screening": [asdict(p) for p in points],
        "test_images": len(test_labels),
    }


def evaluate_run(
    run_dir: Path,
    data: DataSpec,
    val_records: list[Record],
    test_records: list[Record],
    device: str = "auto",
) -> dict[str, Any]:
    (val_probs, val_labels), (test_probs, test_labels) = _predict_splits(
        run_dir, data, [val_records, test_records], device
    )
    val_nf = np.array([r.no_finding for r in val_records])
    test_nf = np.array([r.no_finding for r in test_records])
    result = summarise(val_probs, val_labels, val_nf, test_probs, test_labels, test_nf)
    write_json(run_dir / EVALUATION, result)

    def write_npz(handle: Any) -> None:
        np.savez(
            handle,
            val_probs=val_probs,
            val_labels=val_labels,
            val_no_finding=val_nf,
            test_probs=test_probs,
            test_labels=test_labels,
            test_no_finding=test_nf,
            test_images=np.array([r.image_index for r in test_records]),
        )

    atomic_write(run_dir / PREDICTIONS, write_npz)
    return result

"""Export a trained, evaluated run as a classifier bundle that `cxrbatch` runs.

The bundle (cxrbatch.models.bundle: MONAI bundle layout) carries the best weights, the
architecture, input size and normalisation, the mask mode, the per-label thresholds chosen
on validation, the screening threshold on the No Finding score at a target sensitivity
(chosen on validation), the training data's description with its synthetic flag, the test
metrics, the training config and library versions, and the weights' SHA-256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrbatch.models.bundle import BundleSpec, Screening, TrainingData, save_bundle
from cxrbatch_training.curate import FINDINGS
from cxrbatch_training.evaluate import EVALUATION
from cxrbatch_training.train import load_trained


def export_bundle(
    run_dir: Path,
    out_dir: Path,
    name: str,
    version: str = "1",
    screening_sensitivity: float = 0.98,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the bundle (with `metadata` added to its metadata.json); returns its folder."""
    evaluation_path = run_dir / EVALUATION
    if not evaluation_path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {EVALUATION}: evaluate the run before exporting it."
        )
    evaluation = json.loads(evaluation_path.read_text())
    document = json.loads((run_dir / "config.json").read_text())
    network, config = load_trained(run_dir)
    points = {p["target_sensitivity"]: p for p in evaluation["screening"]}
    if screening_sensitivity not in points:
        raise ValueError(
            f"No screening point at sensitivity {screening_sensitivity} in {evaluation_path} "
            f"(have {sorted(points)})."
        )
    point = points[screening_sensitivity]
    data = document["data"]
    synthetic = bool(data["synthetic"])
    spec = BundleSpec(
        architecture=config.architecture,
        labels=FINDINGS,
        input_size=config.input_size,
        mask_mode=config.mask_mode,
        thresholds={k: v["threshold"] for k, v in evaluation["labels"].items()},
        screening=Screening(
            no_finding_threshold=min(1.0, max(0.0, point["threshold"])),
            target_sensitivity=screening_sensitivity,
        ),
        training_data=TrainingData(description=data["description"], synthetic=synthetic),
    )
    extra: dict[str, Any] = {
        "training": {
            "config": document["train"],
            "imagenet_weights_loaded": document["imagenet_weights_loaded"],
            "versions": document.get("versions"),
            "run_dir": str(run_dir),
        },
        "metrics": {
            "macro_auroc": evaluation["macro"]["auroc"],
            "no_finding_auroc": evaluation["no_finding"]["auroc"],
            "per_label_auroc": {k: v["auroc"] for k, v in evaluation["labels"].items()},
            "screening_point": point,
            "test_images": evaluation["test_images"],
        },
        **(metadata or {}),
    }
    warning = " TRAINED ON SYNTHETIC PHANTOMS: not clinically meaningful." if synthetic else ""
    description = (
        f"{config.architecture} on {config.mask_mode} images ({data['description']}).{warning}"
    )
    save_bundle(out_dir, network, name, version, spec, description, extra)
    return out_dir

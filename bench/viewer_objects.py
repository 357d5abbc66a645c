"""What the viewer objects of issue 33 cost per image, against a run without them.

    python -m bench.viewer_objects [--bundle DIR] [--phantoms 4] [--rounds 3]

The same films (RG1 from pydicom-data and hard phantoms at 1024 px) go through
`pipeline.run` twice per round in one process, alternating: once with the key image, the
presentation state and the finding maps (Grad-CAM) off, once with all three on. Both use
the same classifier bundle: `--bundle`, or a randomly initialised ResNet50 at 224 px whose
thresholds (0.3 on every label) call findings, so that maps are made as on a film with
findings (the worst case). Prints each round's seconds per image, the mean seconds per
stage (decode, segment, classify, finding_maps, write) with the objects on, and last
`cost_ratio: X.XX` (with / without, the median of the rounds' ratios).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.seg_sets import pydicom_data_folder
from cxrbatch import pipeline
from cxrbatch.config import Settings, load_settings
from cxrbatch.dicom.discover import discover
from cxrbatch.domain import StudyInput
from cxrbatch.models.bundle import (
    LABELS,
    BundleSpec,
    TrainingData,
    build_network,
    load_bundle,
    save_bundle,
)
from cxrbatch_training.synthetic import make_hard_phantom, save, to_dataset

OBJECTS = ("key_image", "presentation_state", "finding_maps")


def random_bundle(directory: Path) -> Path:
    """A ResNet50 with random weights at 224 px, every label called from 0.3."""
    torch.manual_seed(0)
    spec = BundleSpec(
        architecture="resnet50",
        input_size=224,
        mask_mode="M-15",
        thresholds=dict.fromkeys(LABELS, 0.3),
        training_data=TrainingData(description="random weights (benchmark)", synthetic=True),
    )
    save_bundle(
        directory,
        build_network("resnet50", len(LABELS)),
        name="bench-resnet50-224",
        version="0.0.1",
        spec=spec,
        description="benchmark bundle: random weights, not a model",
    )
    return directory


def films(folder: Path, phantoms: int) -> list[StudyInput]:
    shutil.copyfile(pydicom_data_folder() / "RG1_UNCR.dcm", folder / "rg1.dcm")
    for index in range(phantoms):
        phantom = make_hard_phantom(index, (1024, 1024))
        save(to_dataset(phantom, f"bench/{index}"), folder / f"p{index}" / "image.dcm")
    studies, rejected = discover(folder)
    assert not rejected, rejected
    return studies


def run_all(
    studies: list[StudyInput], models: pipeline.Models, settings: Settings, out: Path
) -> tuple[float, dict[str, float]]:
    stages: dict[str, float] = {}
    start = time.perf_counter()
    for study in studies:
        result = pipeline.run(study, models, settings, out)
        for name, seconds in (result.timings or {}).items():
            stages[name] = stages.get(name, 0.0) + seconds
    images = len(studies)
    return (time.perf_counter() - start) / images, {k: v / images for k, v in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--phantoms", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="viewer-objects-") as temporary:
        work = Path(temporary)
        bundle = args.bundle or random_bundle(work / "bundle")
        (work / "in").mkdir()
        studies = films(work / "in", args.phantoms)
        classifier = {"device": "cpu", "bundle": str(bundle)}
        settings = {
            on: load_settings(
                None,
                segmentation={"device": "cpu"},
                classifier=classifier,
                output=dict.fromkeys(OBJECTS, on),
            )
            for on in (False, True)
        }
        base = pipeline.load_models(settings[True])
        models = pipeline.Models(base.segmenter, load_bundle(bundle, "cpu"), None)
        run_all(studies[:1], models, settings[True], work / "warm")  # warm-up
        ratios, stages = [], {}
        for index in range(args.rounds):
            without, _ = run_all(studies, models, settings[False], work / f"off{index}")
            with_objects, stages = run_all(studies, models, settings[True], work / f"on{index}")
            ratios.append(with_objects / without)
            print(
                f"round {index + 1}: {without:.2f} s per image without, "
                f"{with_objects:.2f} s with key image, GSPS and finding maps"
            )
        print("stages with the objects on (s per image):", json.dumps(stages, indent=None))
        print(f"cost_ratio: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()

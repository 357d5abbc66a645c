"""What a bundle's configs/inference.json calls under MONAI's bundle runner.

`python -m monai.bundle run --config_file B/configs/inference.json --bundle_root B
--image X --output Y`: MONAI's ConfigParser instantiates `network_def`
(`cxrbatch.models.bundle.build_network`), `with_weights` loads models/model.pt into it, and
`classify` runs it on one image with the bundle's own preprocessing (the same
`ClassifierInputs` the daemon uses; a masked bundle's lung mask comes from the default
MedSAM segmenter) and writes the probabilities, per-label calls and No Finding score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cxrbatch.errors import ModelError
from cxrbatch.files import atomic_write
from cxrbatch.models.bundle import BundleSpec
from cxrbatch.models.preflight import bundle_files
from cxrbatch.models.preprocess import ClassifierInputs


def with_weights(
    network: torch.nn.Module, state: dict[str, torch.Tensor], device: torch.device
) -> torch.nn.Module:
    network.load_state_dict(state, strict=True)
    return network.to(device).eval()


def _pixels(image: Path) -> np.ndarray:
    if image.suffix.lower() in (".png", ".jpg", ".jpeg"):
        pixels = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
        if pixels is None:
            raise ModelError(f"{image} is not a readable image.")
        return np.asarray(pixels)
    from cxrbatch.dicom.decode import decode
    from cxrbatch.dicom.discover import read_header
    from cxrbatch.domain import RejectedFile

    header = read_header(image)
    if isinstance(header, RejectedFile):
        raise ModelError(f"{image}: {header.reason}")
    return decode(header)[0].pixels


def classify(network: torch.nn.Module, bundle_root: str, image: str, output: str) -> dict[str, Any]:
    """Classify `image` and write the result to `output` (JSON); returns it."""
    if not image:
        raise ModelError("Give the image to classify: --image PATH (a DICOM file or a PNG).")
    _, _, metadata = bundle_files(bundle_root)
    spec = BundleSpec.model_validate(metadata["cxrbatch"])
    pixels = _pixels(Path(image))
    lungs = None
    if spec.mask_mode != "original":
        from cxrbatch.config import Settings
        from cxrbatch.models.prompts import segment_pixels
        from cxrbatch.models.segmenter import load_segmenter

        settings = Settings()
        segmenter = load_segmenter(settings.segmentation)
        # Which side is which does not change the union of the two lungs.
        lungs = segment_pixels(segmenter, pixels, True, settings.segmentation.refine).lungs
    inputs = ClassifierInputs(pixels, lungs)
    tensor = inputs.tensor(
        spec.mask_mode, spec.input_size, spec.mean, spec.std, spec.crop, spec.resize
    )
    device = next(network.parameters()).device
    with torch.inference_mode():
        logits = network(torch.from_numpy(tensor[None]).to(device))
    probabilities = torch.sigmoid(logits.float())[0].cpu().numpy()
    probs = {label: float(p) for label, p in zip(spec.labels, probabilities, strict=True)}
    result = {
        "bundle": {"name": metadata.get("name"), "version": metadata.get("version")},
        "image": str(image),
        "probabilities": probs,
        "calls": {
            label: probs[label] >= t for label, t in spec.thresholds.items() if label in probs
        },
        "thresholds": spec.thresholds,
        "no_finding_score": 1.0 - max(probs.values()),
        "synthetic_training_data": spec.training_data.synthetic,
        "note": "NOT FOR DIAGNOSTIC USE",
    }
    text = json.dumps(result, indent=2).encode()
    atomic_write(Path(output), lambda h: h.write(text))
    return result

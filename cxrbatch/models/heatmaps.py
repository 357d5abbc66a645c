"""Where a classifier found its evidence: Grad-CAM (Selvaraju et al., 2017) on the
classifier bundle's own network and the masked input it classified.

For each label at or above its threshold: the last convolutional block's output (ResNet-50
`layer4`, DenseNet-121 `features` after its ReLU), its channels weighted by the mean
gradient of the label's logit with respect to them, summed, rectified, scaled to the input
size and to a peak of 1. Where the bundle's mask mode hid the film (outside the lung mask)
the map is 0: the network saw nothing there.

Both networks end in global average pooling and one linear layer, so that gradient is the
same at every position: the layer's row for the label divided by the block's area. The
mean gradient is therefore known without differentiating, and Grad-CAM here is the class
activation map (Zhou et al., 2016) of the activations the classification pass already
made (`ClassifierBundle.evaluate`): no second pass, no autograd (until 2026-12-05 a second,
eager pass with gradients: 0.30 s a study with a positive label for ResNet-50 at 512 px on
2 threads; the maps agree within 6e-7; tests/test_heatmaps.py checks them against autograd).

Why not a library: pytorch-grad-cam would bring opencv-python-headless pins, ttach and a
scikit-learn import for these lines, and runs its own forward pass; captum's
LayerGradCam is the same arithmetic behind a larger dependency.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cxrbatch.domain import FindingMap, Findings
from cxrbatch.models.bundle import ClassifierBundle, linear_head
from cxrbatch.models.preprocess import ClassifierInputs

log = logging.getLogger(__name__)


def grad_cam(
    network: torch.nn.Module,
    activations: torch.Tensor,
    label_indices: list[int],
    size: tuple[int, int],
) -> dict[int, np.ndarray]:
    """Per label index, the Grad-CAM map (float32, `size`, peak 1; all 0 when the label
    has no positive evidence) of `network` from its trunk's `activations` for one input
    (channels, h, w; on any device, in any precision: computed in float32 on the host)."""
    weights = linear_head(network).weight.detach().float().cpu()
    features = activations.float().cpu()
    area = features.shape[-2] * features.shape[-1]
    maps: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for index in label_indices:
            # d logit / d activation at every position: the head's row over the area.
            channel_weights = weights[index] / area
            cam = torch.relu(torch.einsum("c,chw->hw", channel_weights, features))
            cam = torch.nn.functional.interpolate(
                cam[None, None], size=size, mode="bilinear", align_corners=False
            )[0, 0]
            peak = float(cam.max())
            maps[index] = (cam / peak if peak > 0 else cam).numpy().astype(np.float32)
    return maps


def finding_maps(
    bundle: ClassifierBundle,
    inputs: ClassifierInputs,
    findings: Findings,
    activations: torch.Tensor,
) -> tuple[FindingMap, ...]:
    """The maps of `findings`' labels at or above threshold, on the input the bundle saw,
    from the trunk's `activations` for it (channels, h, w: `ClassifierBundle.evaluate`)."""
    positive = [label for label, called in findings.calls.items() if called]
    if not positive:
        return ()
    spec = bundle.spec
    indices = [spec.labels.index(label) for label in positive]
    cams = grad_cam(bundle.network, activations, indices, (spec.input_size, spec.input_size))
    mask = inputs.mask(spec.mask_mode, spec.input_size, spec.crop)
    box = inputs.box(spec.crop)
    maps = []
    for label, index in zip(positive, indices, strict=True):
        activation = cams[index] if mask is None else np.where(mask, cams[index], 0.0)
        if not activation.max() > 0:
            log.info("label %s at threshold without positive evidence in its map", label)
        maps.append(
            FindingMap(
                label=label,
                probability=findings.probabilities[label],
                threshold=findings.thresholds[label],
                model=findings.model,
                activation=activation.astype(np.float32),
                box=box,
            )
        )
    return tuple(maps)

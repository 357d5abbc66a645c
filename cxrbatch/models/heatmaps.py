"""Where a classifier found its evidence: Grad-CAM (Selvaraju et al., 2017) on the
classifier bundle's own network and the masked input it classified.

For each label at or above its threshold: one forward pass with the last convolutional
block's output kept (ResNet-50 `layer4`, DenseNet-121 `features` after its ReLU), the
label's logit differentiated with respect to it, the channels weighted by their mean
gradient, summed, rectified, scaled to the input size and to a peak of 1. Where the
bundle's mask mode hid the film (outside the lung mask) the map is 0: the network saw
nothing there.

Why Grad-CAM and not a library: pytorch-grad-cam would bring opencv-python-headless pins,
ttach and a scikit-learn import for these twenty lines; captum's LayerGradCam is the same
arithmetic behind a larger dependency. The eager network is used (the frozen CPU graph
has no gradients); it runs in float32 whatever the bundle's inference precision.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torchvision

from cxrbatch.domain import FindingMap, Findings
from cxrbatch.models.bundle import ClassifierBundle
from cxrbatch.models.preprocess import ClassifierInputs

log = logging.getLogger(__name__)


def _split(network: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last convolutional block's output for `batch` and the logits computed from it,
    as torchvision's ResNet and DenseNet forward() compute them. No hooks: the network is
    shared with threads that classify other studies meanwhile."""
    if isinstance(network, torchvision.models.ResNet):
        x = network.maxpool(network.relu(network.bn1(network.conv1(batch))))
        activations = network.layer4(network.layer3(network.layer2(network.layer1(x))))
        return activations, network.fc(torch.flatten(network.avgpool(activations), 1))
    if isinstance(network, torchvision.models.DenseNet):
        activations = torch.relu(network.features(batch))
        pooled = torch.nn.functional.adaptive_avg_pool2d(activations, (1, 1))
        return activations, network.classifier(torch.flatten(pooled, 1))
    raise ValueError(f"no Grad-CAM layer known for {type(network).__name__}")


def grad_cam(
    network: torch.nn.Module, network_input: np.ndarray, label_indices: list[int]
) -> dict[int, np.ndarray]:
    """Per label index, the Grad-CAM map (float32, input size, peak 1; all 0 when the label
    has no positive evidence) of `network` on one input (channels, size, size)."""
    device = next(network.parameters()).device
    batch = torch.from_numpy(np.ascontiguousarray(network_input[None])).to(device).float()
    size = network_input.shape[-2:]
    maps: dict[int, np.ndarray] = {}
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        activations, logits = _split(network, batch)
        for position, index in enumerate(label_indices):
            last = position == len(label_indices) - 1
            (gradient,) = torch.autograd.grad(logits[0, index], activations, retain_graph=not last)
            weights = gradient[0].mean(dim=(1, 2))
            cam = torch.relu((weights[:, None, None] * activations[0].detach()).sum(dim=0))
            cam = torch.nn.functional.interpolate(
                cam[None, None], size=size, mode="bilinear", align_corners=False
            )[0, 0]
            peak = float(cam.max())
            maps[index] = (cam / peak if peak > 0 else cam).cpu().numpy().astype(np.float32)
    return maps


def finding_maps(
    bundle: ClassifierBundle, inputs: ClassifierInputs, findings: Findings
) -> tuple[FindingMap, ...]:
    """The maps of `findings`' labels at or above threshold, on the input the bundle saw."""
    positive = [label for label, called in findings.calls.items() if called]
    if not positive:
        return ()
    spec = bundle.spec
    network_input = inputs.tensor(
        spec.mask_mode, spec.input_size, spec.mean, spec.std, spec.crop, spec.resize
    )
    indices = [spec.labels.index(label) for label in positive]
    cams = grad_cam(bundle.network, network_input, indices)
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

"""The finding maps (cxrbatch/models/heatmaps.py): Grad-CAM made from the activations of
the classification pass, checked against Grad-CAM by autograd (a second pass with
gradients, as the product computed it until 2026-12-05), and the same from every engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxrbatch.domain import Findings
from cxrbatch.models.bundle import Trunk, build_network, head, load_bundle
from cxrbatch.models.heatmaps import finding_maps, grad_cam
from cxrbatch.models.preprocess import ClassifierInputs
from tests.conftest import make_tiny_bundle


def _autograd_grad_cam(
    network: torch.nn.Module, batch: torch.Tensor, index: int, size: tuple[int, int]
) -> np.ndarray:
    """Grad-CAM by its definition: the logit's gradient with respect to the activations,
    averaged per channel, as the channels' weights."""
    with torch.enable_grad():
        activations = Trunk(network)(batch)
        logit = head(network, activations)[0, index]
        (gradient,) = torch.autograd.grad(logit, activations)
    weights = gradient[0].mean(dim=(1, 2))
    cam = torch.relu((weights[:, None, None] * activations[0].detach()).sum(dim=0))
    cam = torch.nn.functional.interpolate(cam[None, None], size=size, mode="bilinear")[0, 0]
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).numpy()


@pytest.mark.parametrize("architecture", ["resnet50", "densenet121"])
def test_maps_from_the_classification_pass_are_grad_cam(architecture: str) -> None:
    torch.manual_seed(3)
    network = build_network(architecture, 5).eval()
    batch = torch.from_numpy(np.random.default_rng(4).normal(size=(1, 3, 96, 96)))
    batch = batch.float()
    with torch.inference_mode():
        activations = Trunk(network)(batch)
        # The trunk and the head are the network's own forward().
        torch.testing.assert_close(head(network, activations), network(batch))
    maps = grad_cam(network, activations[0], [0, 1, 2, 3, 4], (96, 96))
    nonzero = 0
    for index, found in maps.items():
        expected = _autograd_grad_cam(network, batch, index, (96, 96))
        assert found.shape == (96, 96) and found.dtype == np.float32
        np.testing.assert_allclose(found, expected, rtol=0, atol=1e-5)
        nonzero += int(found.max() > 0)
    assert nonzero >= 2  # the comparison saw maps, not only empty ones


@pytest.mark.parametrize("engine", ["torch", "openvino", "onnxruntime"])
def test_each_engine_gives_the_maps_eager_torch_gives(engine: str, tmp_path: Path) -> None:
    """A bundle with every label called: its maps from the tuned path (the CPU graph or a
    converted trunk) equal the eager network's, and are 0 where the M-15 mask hid the film."""
    if engine != "torch":
        pytest.importorskip(engine, reason="the engines extra is not installed")
    labels = ("Mass", "Nodule", "Pneumonia", "Edema", "Fibrosis")
    path = make_tiny_bundle(
        tmp_path / "bundle", "M-15", screening=None, seed=6, thresholds=dict.fromkeys(labels, 0.0)
    )
    eager = load_bundle(path, "cpu")
    tuned = load_bundle(path, "cpu", optimize_cpu=True, graph_cache=tmp_path, engine=engine)
    assert tuned.graph is not None and tuned.engine == engine
    image = np.random.default_rng(7).integers(0, 255, size=(300, 260), dtype=np.uint8)
    lungs = np.zeros(image.shape, dtype=bool)
    lungs[40:260, 30:120] = lungs[40:260, 140:230] = True
    inputs = ClassifierInputs(image, lungs)
    spec = eager.spec
    network_input = inputs.tensor(
        spec.mask_mode, spec.input_size, spec.mean, spec.std, spec.crop, spec.resize
    )[None]
    maps = {}
    for name, bundle in (("eager", eager), ("tuned", tuned)):
        probabilities, activations = bundle.evaluate(network_input)
        findings: Findings = bundle.findings(probabilities[0])
        assert all(findings.calls.values())
        maps[name] = finding_maps(bundle, inputs, findings, activations[0])
    assert [m.label for m in maps["tuned"]] == list(labels)
    mask = inputs.mask(spec.mask_mode, spec.input_size, spec.crop)
    assert mask is not None and not mask.all()
    for eager_map, tuned_map in zip(maps["eager"], maps["tuned"], strict=True):
        np.testing.assert_allclose(tuned_map.activation, eager_map.activation, rtol=0, atol=1e-4)
        assert not tuned_map.activation[~mask].any()
    assert any(m.activation.max() > 0 for m in maps["tuned"])

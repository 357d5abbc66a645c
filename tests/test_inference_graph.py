"""The frozen CPU inference graphs (segmentation.optimize_cpu, classifier.optimize_cpu) give
the eager networks' outputs: encoder features, lung masks, probabilities."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrbatch import pipeline
from cxrbatch.models.bundle import load_bundle
from cxrbatch.models.device import cpu_inference_graph
from cxrbatch.models.prompts import segment_pixels
from cxrbatch.models.segmenter import LiteMedSAM
from cxrbatch.synthetic import make_phantom


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_segmenter_graph_gives_the_eager_features_and_masks(models: pipeline.Models) -> None:
    eager = LiteMedSAM(device="cpu", optimize_cpu=False)
    graph = models.segmenter  # the session's segmenter: default settings, optimize_cpu on
    assert isinstance(graph, LiteMedSAM)
    assert isinstance(graph._encoder, torch.jit.ScriptModule)
    assert not isinstance(eager._encoder, torch.jit.ScriptModule)
    for seed in (11, 12):
        phantom = make_phantom(seed, (1400, 1100))
        pixels = np.round(phantom.image * 255).astype(np.uint8)
        a, b = eager.embed(pixels), graph.embed(pixels)
        scale = float(a.features.abs().max())
        assert float((a.features - b.features).abs().max()) <= 1e-4 * scale
        seg_a = segment_pixels(eager, pixels, True, refine=True, threshold=0.5)
        seg_b = segment_pixels(graph, pixels, True, refine=True, threshold=0.5)
        assert _dice(seg_a.right_lung, seg_b.right_lung) >= 0.999
        assert _dice(seg_a.left_lung, seg_b.left_lung) >= 0.999


def test_classifier_graph_gives_the_eager_probabilities(tiny_bundles: dict[str, Path]) -> None:
    eager = load_bundle(tiny_bundles["classifier"], "cpu", optimize_cpu=False)
    graph = load_bundle(tiny_bundles["classifier"], "cpu", optimize_cpu=True)
    assert eager.graph is None and isinstance(graph.graph, torch.jit.ScriptModule)
    inputs = np.random.default_rng(3).normal(size=(3, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(graph.predict(inputs), eager.predict(inputs), rtol=0, atol=1e-5)
    # One image at a time, as the pipeline calls it (the trace's own batch size).
    np.testing.assert_allclose(
        graph.predict(inputs[:1]), eager.predict(inputs[:1]), rtol=0, atol=1e-5
    )


class _Untraceable(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> float:
        return float(x.sum())  # a Python number: not traceable


def test_a_module_that_cannot_be_traced_stays_eager(caplog: pytest.LogCaptureFixture) -> None:
    module = _Untraceable()
    with caplog.at_level(logging.WARNING, logger="cxrbatch.models.device"):
        result = cpu_inference_graph(module, 8, "test network")
    assert result is module
    assert "test network runs eagerly" in caplog.text

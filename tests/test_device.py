"""Which device the models run on is said once per worker, so that an operator can check
an install (deploy/INSTALL.md): the GPU's name, or why the CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from cxrbatch import pipeline
from cxrbatch.config import Settings
from cxrbatch.errors import ConfigError
from cxrbatch.models.device import describe, resolve_device


def test_the_cpu_is_described_with_the_reason_it_was_chosen() -> None:
    text = describe(torch.device("cpu"))
    assert text.startswith("cpu (") and f"torch {torch.__version__}" in text
    if torch.version.cuda is None:
        assert "this torch is a CPU build" in text
    elif not torch.cuda.is_available():
        assert f"torch built for CUDA {torch.version.cuda} sees no CUDA device" in text
    else:
        assert "configured: a CUDA device is present" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_auto_is_the_cpu_and_cuda_is_refused_without_a_device() -> None:
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        resolve_device("cuda")


def test_loading_the_models_logs_their_device(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="cxrbatch.pipeline"):
        models = pipeline.load_models(settings)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("models on")]
    assert line.startswith(f"models on {describe(models.segmenter.device)}: segmenter ")

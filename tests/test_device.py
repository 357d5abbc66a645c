"""Which device the models run on is said once per worker, so that an operator can check
an install (deploy/INSTALL.md): the GPU's name, or why the CPU."""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import pytest
import torch

from cxrbatch import pipeline
from cxrbatch.config import Settings
from cxrbatch.errors import ConfigError
from cxrbatch.models import device
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


class _FakeDriver:
    """The five CUDA driver calls set_gpu_wait makes, over two devices whose primary
    contexts start with the given (flags, active) state; 0 is CUDA_SUCCESS."""

    def __init__(self, states: list[tuple[int, int]]) -> None:
        self.states = states
        self.set_calls: list[tuple[int, int]] = []

    def cuInit(self, flags: int) -> int:
        return 0 if flags == 0 else 1

    def cuDeviceGetCount(self, count: Any) -> int:
        count._obj.value = len(self.states)
        return 0

    def cuDeviceGet(self, device: Any, index: int) -> int:
        device._obj.value = 100 + index
        return 0

    def cuDevicePrimaryCtxGetState(self, device: Any, flags: Any, active: Any) -> int:
        flags._obj.value, active._obj.value = self.states[device.value - 100]
        return 0

    def cuDevicePrimaryCtxSetFlags(self, device: Any, flags: Any) -> int:
        self.set_calls.append((device.value, flags.value))
        return 0


def _with_driver(monkeypatch: pytest.MonkeyPatch, driver: _FakeDriver) -> list[str]:
    loaded: list[str] = []

    def load(name: str) -> _FakeDriver:
        loaded.append(name)
        return driver

    monkeypatch.setattr(ctypes, "CDLL", load)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    return loaded


def test_gpu_wait_block_is_set_on_every_primary_context_before_torch_makes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Device 1 carries another flag (CU_CTX_LMEM_RESIZE_TO_MAX, 0x10): it is kept.
    driver = _FakeDriver([(0x0, 0), (0x10, 0)])
    assert _with_driver(monkeypatch, driver) == []
    assert device.set_gpu_wait("block") is None
    assert driver.set_calls == [(100, 0x4), (101, 0x14)]
    driver.set_calls.clear()
    assert device.set_gpu_wait("spin") is None
    assert driver.set_calls == [(100, 0x1), (101, 0x11)]


def test_gpu_wait_says_why_it_was_not_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch made the context already (with CUDA's automatic choice, 0): too late, said so.
    driver = _FakeDriver([(0x0, 1)])
    loaded = _with_driver(monkeypatch, driver)
    why = device.set_gpu_wait("block")
    assert why is not None and "in use already" in why and driver.set_calls == []
    # Already so (a second load in one process): nothing to do, nothing to say.
    driver.states = [(0x4, 1)]
    assert device.set_gpu_wait("block") is None and driver.set_calls == []
    # "auto" does not touch the driver at all.
    calls = len(loaded)
    assert device.set_gpu_wait("auto") is None and len(loaded) == calls


def test_gpu_wait_without_a_cuda_driver_is_a_reason_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    why = device.set_gpu_wait("block", driver_library="libcuda-not-here.so.1")
    assert why == "no CUDA driver (libcuda-not-here.so.1 cannot be loaded)"
    with pytest.raises(ValueError, match="gpu_wait"):
        Settings.model_validate({"processing": {"gpu_wait": "sometimes"}})

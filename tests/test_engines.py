"""The inference engine seam (cxrbatch/models/engines.py): the segmenter's networks on
OpenVINO and ONNX Runtime give torch fp32's masks, a converted network that does not is
refused with one line and torch serves, a missing engine is no error, converted models
come back from the cache."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cxrbatch import pipeline
from cxrbatch.config import Settings, load_settings
from cxrbatch.models import engines
from cxrbatch.models.bundle import load_bundle
from cxrbatch.models.prompts import segment_pixels
from cxrbatch.models.segmenter import LiteMedSAM, probe_film
from cxrbatch_training.synthetic import make_hard_phantom

# The `engines` extra (in `dev` too).
pytest.importorskip("openvino", reason="the engines extra is not installed")
pytest.importorskip("onnxruntime", reason="the engines extra is not installed")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def eager() -> LiteMedSAM:
    return LiteMedSAM(device="cpu", optimize_cpu=False)


def test_auto_is_the_fastest_engine_measured(
    models: pipeline.Models, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The session's segmenter (default settings, both engine packages installed) runs its
    encoder on OpenVINO and its decoder on ONNX Runtime, and a classifier bundle loaded
    with the defaults runs on OpenVINO: "auto" is the engine bench/engines.py measured
    fastest per network (for the classifiers, the one ready soonest)."""
    assert models.segmenter.engines == {"encoder": "openvino", "decoder": "onnxruntime"}  # type: ignore[attr-defined]
    assert engines.DEFAULTS == engines.FASTEST
    assert engines.FASTEST["segmenter encoder"] == "openvino"
    assert engines.FASTEST["segmenter decoder"] == "onnxruntime"
    assert engines.FASTEST["classifier"] == "openvino"
    settings = load_settings(None)
    loaded = load_bundle(
        tiny_bundles["classifier"], "cpu", settings.classifier.precision,
        settings.classifier.optimize_cpu, tmp_path, settings.classifier.engine,
    )  # fmt: skip
    assert loaded.engine == "openvino"


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_each_engine_gives_torch_fp32_masks_on_hard_phantoms(
    engine: str, eager: LiteMedSAM, settings: Settings
) -> None:
    converted = LiteMedSAM(
        device="cpu",
        optimize_cpu=True,
        graph_cache=settings.processing.graph_cache(),
        engines=(engine, engine),
    )
    assert converted.engines == {"encoder": engine, "decoder": engine}
    for seed in (3, 4):
        phantom = make_hard_phantom(seed, (1024, 1024))
        pixels = np.round(phantom.image * 255).astype(np.uint8)
        a = segment_pixels(eager, pixels, True, refine=True)
        b = segment_pixels(converted, pixels, True, refine=True)
        assert a.right_lung.any() and a.left_lung.any()
        # Equal but for a pixel whose probability sits within 1e-5 of the threshold.
        assert _dice(a.right_lung, b.right_lung) >= 0.9999
        assert _dice(a.left_lung, b.left_lung) >= 0.9999
        embedding_a, embedding_b = eager.embed(pixels), converted.embed(pixels)
        boxes = np.array([[100, 150, 480, 800], [560, 150, 940, 800]], dtype=np.float32)
        pa, ia = eager.predict(embedding_a, boxes)
        pb, ib = converted.predict(embedding_b, boxes)
        assert float(np.abs(pa - pb).max()) <= engines.PROBABILITY_TOLERANCE
        assert float(np.abs(ia - ib).max()) <= engines.PROBABILITY_TOLERANCE


def test_the_probe_film_is_a_real_check(eager: LiteMedSAM) -> None:
    """The load-time check compares masks that exist: on the probe film torch segments two
    lung fields, each mostly inside its box."""
    image, boxes = probe_film()
    embedding = eager.embed(image)
    probs, _ = eager.predict(embedding, boxes)
    for mask, (x0, y0, x1, y1) in zip(probs > 0.5, boxes, strict=True):
        inside = mask[int(y0) : int(y1), int(x0) : int(x1)].sum()
        assert mask.sum() > 0.02 * mask.size
        assert inside >= 0.9 * mask.sum()


class _Off:
    """A converted network whose first output is off by `by` (a wrong conversion)."""

    def __init__(self, forward: Any, by: float) -> None:
        self.forward, self.by = forward, by

    def __call__(self, *inputs: torch.Tensor) -> Any:
        out = self.forward(*inputs)
        if isinstance(out, tuple):
            return (out[0] + self.by, *out[1:])
        return out + self.by


def test_a_segmenter_engine_that_differs_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, settings: Settings
) -> None:
    real = engines.compile_network

    def wrong(*args: Any, **kwargs: Any) -> Any:
        forward = real(*args, **kwargs)
        return None if forward is None else _Off(forward, 0.05)

    from cxrbatch.models import segmenter as segmenter_module

    monkeypatch.setattr(segmenter_module, "compile_network", wrong)
    with caplog.at_level(logging.WARNING, logger="cxrbatch.models.segmenter"):
        refused = LiteMedSAM(
            device="cpu",
            optimize_cpu=True,
            graph_cache=settings.processing.graph_cache(),
            engines=("torch", "onnxruntime"),
        )
    assert refused.engines == {"encoder": "torch", "decoder": "torch"}
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "decoder on onnxruntime refused" in lines[0]
    assert refused._decode is refused._decoder


def test_a_classifier_engine_that_differs_is_refused(
    tiny_bundles: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    from cxrbatch.models import bundle as bundle_module

    good = load_bundle(
        tiny_bundles["classifier"],
        "cpu",
        optimize_cpu=True,
        graph_cache=tmp_path,
        engine="openvino",
    )
    assert good.engine == "openvino"
    # Torch's answer on the probe is kept with the converted model: the next load runs
    # only the converted network.
    assert len(list(tmp_path.glob("*.npy"))) == 1
    eager = load_bundle(tiny_bundles["classifier"], "cpu", optimize_cpu=False)
    inputs = np.random.default_rng(5).normal(size=(2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(good.predict(inputs), eager.predict(inputs), rtol=0, atol=1e-4)

    real = engines.compile_network
    monkeypatch.setattr(bundle_module, "compile_network", lambda *a, **k: _Off(real(*a, **k), 0.5))
    with caplog.at_level(logging.WARNING, logger="cxrbatch.models.bundle"):
        refused = load_bundle(
            tiny_bundles["classifier"],
            "cpu",
            optimize_cpu=True,
            graph_cache=tmp_path,
            engine="openvino",
        )
    assert refused.engine == "torch"
    assert "openvino refused" in caplog.text
    np.testing.assert_allclose(refused.predict(inputs), eager.predict(inputs), rtol=0, atol=1e-4)


def test_a_missing_engine_means_torch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(engines, "available", lambda engine: engine == "torch")
    monkeypatch.setattr(engines, "_warned", set())
    with caplog.at_level(logging.INFO, logger="cxrbatch.models.engines"):
        segmenter = LiteMedSAM(device="cpu", optimize_cpu=True, engines=("auto", "openvino"))
    assert segmenter.engines == {"encoder": "torch", "decoder": "torch"}
    assert "openvino is not installed" in caplog.text
    assert engines.resolve("onnxruntime", "classifier", torch.device("cpu")) == "torch"


def test_cuda_and_unoptimised_runs_stay_in_torch() -> None:
    assert engines.resolve("openvino", "segmenter encoder", torch.device("cuda")) == "torch"
    assert (
        engines.resolve("auto", "classifier", torch.device("cpu")) == engines.DEFAULTS["classifier"]
    )
    plain = LiteMedSAM(device="cpu", optimize_cpu=False, engines=("openvino", "openvino"))
    assert plain.engines == {"encoder": "torch", "decoder": "torch"}


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_converted_models_come_back_from_the_cache(
    engine: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    example = (torch.rand(1, 3, 8, 8),)
    first = engines.compile_network(net, example, engine, "tiny", cache, "0" * 64)
    assert first is not None
    assert len(list(cache.iterdir())) == (2 if engine == "openvino" else 1)
    with caplog.at_level(logging.INFO, logger="cxrbatch.models.engines"):
        again = engines.compile_network(net, example, engine, "tiny", cache, "0" * 64)
    assert again is not None and "from the cache" in caplog.text
    with torch.inference_mode():
        torch.testing.assert_close(again(*example), net(*example), rtol=0, atol=1e-5)
    # A damaged cache file is converted again and replaced.
    for path in cache.iterdir():
        path.write_bytes(b"damaged")
    third = engines.compile_network(net, example, engine, "tiny", cache, "0" * 64)
    assert third is not None
    with torch.inference_mode():
        torch.testing.assert_close(third(*example), net(*example), rtol=0, atol=1e-5)
    assert all(path.read_bytes() != b"damaged" for path in cache.iterdir())


def test_torch_reference_on_the_probe_is_computed_once(tmp_path: Path) -> None:
    """A converted network is checked against torch's answer on the probe; that answer is
    cached by weights and code, computed again when its file is damaged, never trusted
    from a cache that is not private."""
    net = torch.nn.Linear(3, 2)
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.arange(4.0).reshape(2, 2)

    cache = tmp_path / "cache"
    key = (net, ((2, 2), "probe v1"), "f" * 64)
    first = engines.cached_reference(cache, key, compute, "probe")
    again = engines.cached_reference(cache, key, compute, "probe")
    assert len(calls) == 1 and torch.equal(first, again)
    other = engines.cached_reference(cache, (net, ((2, 2), "probe v2"), "f" * 64), compute, "p")
    assert len(calls) == 2 and torch.equal(other, first)
    for path in cache.glob("*.npy"):
        path.write_bytes(b"damaged")
    assert torch.equal(engines.cached_reference(cache, key, compute, "probe"), first)
    assert len(calls) == 3
    cache.chmod(0o777)
    engines.cached_reference(cache, key, compute, "probe")
    assert len(calls) == 4  # a cache others can write to is not read


# Two OpenVINO networks compiled, dropped in the other order, then a signal handled by
# Python on the main thread: OpenVINO (on an AMX processor) gives the compiling thread an
# alternate signal stack per compiled model and restores the one it found when that model
# is destroyed, so without engines.keeping_signal_stack the thread ends on an unmapped
# stack and the signal kills the process with no trace (the CI crash with these engines).
_SIGNAL_AFTER_OUT_OF_ORDER_DROPS = """
import ctypes, faulthandler, gc, os, signal, sys
import torch
from cxrbatch.models import engines

def stack():
    current = engines._SignalStack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(current)) == 0
    return (current.ss_sp, current.ss_size, current.ss_flags)

faulthandler.enable()
before = stack()
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
example = (torch.rand(1, 3, 16, 16),)
compile = engines.compile_network if sys.argv[1] == "product" else None
if compile is None:  # OpenVINO called directly, as the product did before
    import openvino as ov
    model = ov.convert_model(net, example_input=example)
    compile = lambda *args: ov.Core().compile_model(model, "CPU")
first = compile(net, example, "openvino", "first")
second = compile(net, example, "openvino", "second")
changed = stack() != before
del first
gc.collect()
del second
gc.collect()
print("changed" if changed or stack() != before else "kept", flush=True)
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
print("alive", flush=True)
"""


def test_compiled_openvino_models_leave_the_threads_signal_stack_alone(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    def run(how: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _SIGNAL_AFTER_OUT_OF_ORDER_DROPS, how],
            capture_output=True,
            text=True,
            timeout=300,
        )

    product = run("product")
    assert product.returncode == 0, product.stderr[-2000:]
    assert product.stdout.split() == ["kept", "handled", "alive"], product.stderr[-2000:]
    # Where OpenVINO swaps the stack (an AMX processor, as this project's hosts), calling
    # it directly is the crash this guards against: the guard is what keeps it alive.
    direct = run("direct")
    if direct.stdout.startswith("changed"):
        assert direct.returncode == -signal.SIGSEGV, direct.stdout

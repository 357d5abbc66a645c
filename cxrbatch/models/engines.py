"""CPU inference engines behind one seam: torch (the frozen TorchScript graphs of
graphs.py), OpenVINO and ONNX Runtime, chosen per network (issue 37).

A network is handed to an engine as the torch module built from the bundle's or the
package's verified weights, and comes back as a callable on torch tensors, as the torch
module is called. OpenVINO converts the module itself (`openvino.convert_model`); ONNX
Runtime runs an ONNX export of it (torch's TorchScript-based exporter). The converted
model is cached in the CPU graph cache (processing.graph_cache_dir) under a key over what
it computes: the weights' SHA-256, the network's architecture and code, torch's version,
the example shapes, the engine and its version (graphs.graph_key). Nothing converted is
ever committed or shipped; a model that cannot be cached costs only the conversion
(OpenVINO: about 10 s for LiteMedSAM's encoder on 2 cores).

Every engine is fp32. The caller checks a converted network against torch fp32 on a
fixed probe before using it (segmenter: mask Dice 1.0 and probabilities within
PROBABILITY_TOLERANCE; classifier: probabilities within it) and refuses it with one line
otherwise: torch then serves. A missing engine package is never an error: torch serves,
and the log says so once. On CUDA every network stays in torch.

`python -m bench.engines` (quiet host, alternating order, several rounds in one run)
measured the fastest engine per network (`FASTEST`; docs/performance.md has the figures).
The setting "auto" (`DEFAULTS`) is that fastest engine where its package is installed
(the `engines` extra), torch otherwise. The test runs that once crashed with these
defaults were OpenVINO's alternate signal stacks (`keeping_signal_stack`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import io
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cxrbatch.errors import OutputError
from cxrbatch.files import atomic_write, remove_stale_temporaries
from cxrbatch.models.graphs import (
    STALE_TEMPORARY_S,
    UNUSED_GRAPH_DAYS,
    graph_key,
    mark_used,
    private_cache,
    remove_unused_graphs,
)

log = logging.getLogger(__name__)

Engine = Literal["torch", "openvino", "onnxruntime"]
EngineChoice = Literal["auto", "torch", "openvino", "onnxruntime"]
ENGINES: tuple[Engine, ...] = ("torch", "openvino", "onnxruntime")
PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
# bench/engines.py on the 2-core CPU hosts (docs/performance.md, "Engines per network"):
# the fastest running per network; for the classifiers, whose engines run within each
# other's ranges, the one ready soonest (OpenVINO: 0.3-0.5 s from the cache to the first
# answer against 0.9-1.2 s for torch's fused graphs), which also ran 0.99-1.13x torch.
FASTEST: dict[str, Engine] = {
    "segmenter encoder": "openvino",
    "segmenter decoder": "onnxruntime",
    "classifier": "openvino",
}
# What "auto" means: the fastest measured, where its package is installed.
DEFAULTS: dict[str, Engine] = dict(FASTEST)
PROBABILITY_TOLERANCE = 1e-4
# Which inputs and outputs have a dimension that varies between calls (boxes, batch).
Dynamic = dict[str, int]
EngineForward = Callable[..., Any]

_warned: set[str] = set()


def available(engine: str) -> bool:
    """Whether the engine's package is installed (torch always is)."""
    package = PACKAGES.get(engine)
    return package is None or importlib.util.find_spec(package) is not None


def resolve(choice: str, network: str, device: torch.device) -> Engine:
    """The engine a network runs on: torch on CUDA; for "auto" the measured default; an
    engine whose package is missing falls back to torch (said once per engine)."""
    if device.type != "cpu":
        return "torch"
    engine: Engine = DEFAULTS.get(network, "torch") if choice == "auto" else choice  # type: ignore[assignment]
    if engine not in ENGINES:
        raise ValueError(f"unknown inference engine {choice!r}; expected one of {ENGINES}")
    if not available(engine):
        if engine not in _warned:
            _warned.add(engine)
            log.info(
                "%s is not installed: torch runs the networks chosen for it "
                "(pip install 'cxrbatch[engines]' to use it)",
                engine,
            )
        return "torch"
    return engine


def engine_version(engine: Engine) -> str:
    if engine == "openvino":
        import openvino

        return str(openvino.__version__)
    if engine == "onnxruntime":
        import onnxruntime

        return str(onnxruntime.__version__)
    return str(torch.__version__)


def compile_network(
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    engine: Engine,
    what: str,
    cache_dir: Path | None = None,
    weights_sha256: str = "",
    dynamic: Dynamic | None = None,
    output_names: Sequence[str] = ("output",),
) -> EngineForward | None:
    """`module` (eval mode, CPU, fp32) run by `engine`: a callable taking the example's
    inputs as torch tensors and giving a tensor (one output) or a tuple of them, or None
    when the engine could not take the network (one line in the log; torch serves).
    `dynamic`: input or output name -> the dimension that varies (inputs are named
    input0, input1, ...)."""
    if engine == "torch":
        raise ValueError("torch networks are built by graphs.cpu_inference_graph")
    module = module.eval()
    names = [f"input{i}" for i in range(len(example))]
    path = _cache_path(cache_dir, module, example, weights_sha256, engine, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and exporter notices
            if engine == "openvino":
                return _openvino(module, example, names, dynamic or {}, path, what)
            return _onnxruntime(module, example, names, output_names, dynamic or {}, path, what)
    except Exception as exc:  # a network the engine cannot convert: torch serves
        log.warning(
            "%s: %s could not take the network (%s: %s); torch runs it",
            what,
            engine,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return None


def _cache_path(
    cache_dir: Path | None,
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    weights_sha256: str,
    engine: Engine,
    what: str,
) -> Path | None:
    if cache_dir is None or not weights_sha256 or not private_cache(cache_dir, what):
        return None
    shapes = tuple(tuple(t.shape) for t in example)
    key = hashlib.sha256()
    for part in (graph_key(module, shapes, weights_sha256), engine, engine_version(engine)):
        key.update(part.encode())
        key.update(b"\0")
    remove_stale_temporaries(cache_dir, min_age_s=STALE_TEMPORARY_S)
    suffix = ".xml" if engine == "openvino" else ".onnx"
    return cache_dir / f"{key.hexdigest()}{suffix}"


def _openvino(
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    names: list[str],
    dynamic: Dynamic,
    path: Path | None,
    what: str,
) -> EngineForward:
    import openvino as ov

    core = ov.Core()
    model = None
    if path is not None and path.is_file() and path.with_suffix(".bin").is_file():
        try:
            model = core.read_model(str(path))
            mark_used(path, path.with_suffix(".bin"))
            log.info("%s: OpenVINO model loaded from the cache (%s)", what, path.name)
        except Exception as exc:  # a damaged file: convert again, replace it
            log.warning("%s: cached OpenVINO model unusable (%s); converting again", what, exc)
            model = None
    if model is None:
        shapes = []
        for name, tensor in zip(names, example, strict=True):
            shape = list(tensor.shape)
            if name in dynamic:
                shape[dynamic[name]] = -1
            shapes.append(ov.PartialShape(shape))
        with torch.no_grad():
            model = ov.convert_model(module, example_input=tuple(example), input=shapes)
        if path is not None:
            _store_openvino(model, path, what)
    with keeping_signal_stack():
        compiled = core.compile_model(
            model,
            "CPU",
            {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "INFERENCE_PRECISION_HINT": "f32",
            },
        )
    return _OpenVINOForward(compiled)


class _SignalStack(ctypes.Structure):  # stack_t of <signal.h> (Linux)
    _fields_ = [
        ("ss_sp", ctypes.c_void_p),
        ("ss_flags", ctypes.c_int),
        ("ss_size", ctypes.c_size_t),
    ]


@contextlib.contextmanager
def keeping_signal_stack() -> Iterator[None]:
    """The calling thread's alternate signal stack as it was before the block.

    OpenVINO's CPU plugin, on a processor with AMX, gives the thread that compiles a model
    an alternate signal stack of its own (its AMX state makes a signal frame larger than
    some stacks allow) and puts the previous one back when that compiled model is
    destroyed. Compiled models destroyed in another order than they were made (two
    segmenters loaded, the first dropped) leave the thread on a stack already unmapped;
    the next signal handled there (Python's handlers run on the alternate stack: a
    SIGTERM drain, Ctrl-C, the fault handler itself) then kills the process with a
    segmentation fault and no trace. That was the crash of the test runs with these
    engines as the default (docs/performance.md). Every compiled model here saves and
    restores the caller's own stack instead, which is always mapped: the fault handler's
    (about 58 KiB, more than OpenVINO's 20 KiB) or none (signals on the thread's stack).
    Where sigaltstack cannot be called (not Linux), the block runs as it is."""
    libc = _libc()
    saved = _SignalStack()
    if libc is None or libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sigaltstack  # noqa: B018  # present in every Linux C library
    except (OSError, AttributeError):
        return None
    return libc


def _store_openvino(model: Any, path: Path, what: str) -> None:
    """The model as OpenVINO IR (fp32 weights: save_model would halve them by default);
    the weights file first, the graph last, each atomically."""
    import tempfile

    import openvino as ov

    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            xml = Path(scratch) / "model.xml"
            ov.save_model(model, str(xml), compress_to_fp16=False)
            for source, target in (
                (xml.with_suffix(".bin"), path.with_suffix(".bin")),
                (xml, path),
            ):
                _write(target, source.read_bytes())
    except (OSError, OutputError, RuntimeError) as exc:  # the model still serves this process
        log.warning("%s: OpenVINO model not cached (%s)", what, exc)
        return
    log.info("%s: converted for OpenVINO and cached (%s)", what, path.name)
    _prune(path.parent)


def _prune(folder: Path) -> None:
    remove_unused_graphs(folder, UNUSED_GRAPH_DAYS * 86400)


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


class _OpenVINOForward:
    """A compiled OpenVINO model called like the torch module: one infer request, one call
    at a time (studies run in threads; the model is compiled for latency, one stream, so
    calls from two threads would queue inside OpenVINO anyway)."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
        self._outputs = len(compiled.outputs)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        arrays = [t.detach().contiguous().numpy() for t in inputs]
        with self._lock:
            results = self._request.infer(arrays)
            outputs = tuple(torch.from_numpy(results[i].copy()) for i in range(self._outputs))
        return outputs[0] if self._outputs == 1 else outputs


def _onnxruntime(
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    names: list[str],
    output_names: Sequence[str],
    dynamic: Dynamic,
    path: Path | None,
    what: str,
) -> EngineForward:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def session(data: bytes) -> Any:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    if path is not None and path.is_file():
        try:
            cached = session(path.read_bytes())
            mark_used(path)
            log.info("%s: ONNX model loaded from the cache (%s)", what, path.name)
            return _OnnxRuntimeForward(cached, names)
        except Exception as exc:  # a damaged file: export again, replace it
            log.warning("%s: cached ONNX model unusable (%s); exporting again", what, exc)
    buffer = io.BytesIO()
    axes = {name: {dim: f"{name}_{dim}"} for name, dim in dynamic.items()}
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(example),
            buffer,  # type: ignore[arg-type]  # a file object is accepted
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=list(output_names),
            dynamic_axes=axes or None,
        )
    data = buffer.getvalue()
    if path is not None:
        try:
            _write(path, data)
            log.info("%s: exported to ONNX and cached (%s)", what, path.name)
            _prune(path.parent)
        except (OutputError, OSError) as exc:
            log.warning("%s: ONNX model not cached (%s)", what, exc)
    return _OnnxRuntimeForward(session(data), names)


class _OnnxRuntimeForward:
    """An ONNX Runtime session called like the torch module (run() is thread-safe)."""

    def __init__(self, session: Any, names: list[str]) -> None:
        self._session = session
        self._names = names

    def __call__(self, *inputs: torch.Tensor) -> Any:
        feeds = {
            n: t.detach().contiguous().numpy() for n, t in zip(self._names, inputs, strict=True)
        }
        outputs = tuple(torch.from_numpy(o) for o in self._session.run(None, feeds))
        return outputs[0] if len(outputs) == 1 else outputs


def cached_reference(
    cache_dir: Path | None,
    key: tuple[torch.nn.Module, tuple[object, ...], str],
    compute: Callable[[], torch.Tensor],
    what: str,
) -> torch.Tensor:
    """Torch's answer on a probe (`compute`), kept in `cache_dir` under `key` (the module
    whose code and architecture it depends on, the probe's shape and code, the weights'
    SHA-256): the check of a converted network then costs only the converted network."""
    module, probe, weights_sha256 = key
    if cache_dir is None or not weights_sha256 or not private_cache(cache_dir, what):
        return compute()
    path = cache_dir / f"{graph_key(module, probe, weights_sha256)}.npy"
    if path.is_file():
        try:
            cached = torch.from_numpy(np.load(path, allow_pickle=False))
            mark_used(path)
            return cached
        except (OSError, ValueError) as exc:  # a damaged file: computed again, replaced
            log.warning("%s: cached torch reference unusable (%s); computing it", what, exc)
    reference = compute()
    buffer = io.BytesIO()
    np.save(buffer, reference.numpy(), allow_pickle=False)
    try:
        _write(path, buffer.getvalue())
    except (OutputError, OSError) as exc:
        log.warning("%s: torch reference not cached (%s)", what, exc)
    return reference


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0

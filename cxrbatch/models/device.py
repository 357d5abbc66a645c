"""Choosing the torch device once, from a setting; CPU threads of a worker process; the
frozen inference graph a network runs on the CPU."""

from __future__ import annotations

import logging
import warnings

import cv2
import torch

from cxrbatch.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' was configured but no CUDA device is available.")
    return torch.device(setting)


def limit_cpu_threads(threads: int) -> None:
    """CPU threads of one worker process, for torch and OpenCV alike: N workers share the
    cores instead of each starting a thread per core (OpenCV's default)."""
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)


def cpu_inference_graph(module: torch.nn.Module, input_size: int, what: str) -> torch.nn.Module:
    """`module` as a frozen TorchScript graph for CPU inference.

    `torch.jit.optimize_for_inference` on a trace: batch norms folded into convolutions,
    weights pre-packed for oneDNN, no Python between operators. Outputs equal the eager
    module's within a few 1e-5 (tests/test_inference_graph.py); 1.1-1.3x faster for
    LiteMedSAM's encoder and ResNet50 on this 2-core CPU, varying between runs
    (bench/cpu_graphs.py). Tracing costs one to two forward passes, once per process. A
    module that cannot be traced stays eager, with a warning. Traced on one
    (3, input_size, input_size) image; classifiers also take other batch sizes.
    """
    example = torch.zeros(1, 3, input_size, input_size)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python values in the trace
            traced = torch.jit.trace(module.eval(), example, check_trace=False)
            return torch.jit.optimize_for_inference(traced)
    except Exception as exc:  # eager still works; only speed is lost
        log.warning(
            "%s runs eagerly: no CPU inference graph (%s: %s)", what, type(exc).__name__, exc
        )
        return module

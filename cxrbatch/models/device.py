"""Choosing the torch device once, from a setting; CPU threads of a worker process."""

from __future__ import annotations

import cv2
import torch

from cxrbatch.errors import ConfigError


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' was configured but no CUDA device is available.")
    return torch.device(setting)


def describe(device: torch.device) -> str:
    """What a device is, for the log line an operator checks after an install: the GPU's
    name and torch's CUDA build, or why the CPU (no CUDA in this torch build, or no device
    the driver shows)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (
            f"{device.type}:{index} ({torch.cuda.get_device_name(index)}; torch "
            f"{torch.__version__}, CUDA {torch.version.cuda})"
        )
    if torch.version.cuda is None:
        why = "this torch is a CPU build"
    elif torch.cuda.is_available():
        why = "configured: a CUDA device is present"
    else:
        why = f"torch built for CUDA {torch.version.cuda} sees no CUDA device"
    return f"{device.type} ({why}; torch {torch.__version__}, {torch.get_num_threads()} threads)"


def limit_cpu_threads(threads: int) -> None:
    """CPU threads of one worker process, for torch and OpenCV alike: N workers share the
    cores instead of each starting a thread per core (OpenCV's default)."""
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)

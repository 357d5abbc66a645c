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


def limit_cpu_threads(threads: int) -> None:
    """CPU threads of one worker process, for torch and OpenCV alike: N workers share the
    cores instead of each starting a thread per core (OpenCV's default)."""
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)

"""Choosing the torch device once, from a setting."""

from __future__ import annotations

import torch

from cxrbatch.errors import ConfigError


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' was configured but no CUDA device is available.")
    return torch.device(setting)

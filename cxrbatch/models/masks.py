"""The study's lung masks: original (no mask), M-15 and M-50, at 512 x 512.

The raw MedSAM lung mask is eroded with a disk of radius 5 and then dilated with a disk
of radius 15 (M-15) or 50 (M-50), at the study's 512 x 512 working resolution. Morphology
uses exact Euclidean distance transforms: erosion by r keeps pixels farther than r from
the background, dilation by r adds pixels within r of the eroded mask.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from scipy import ndimage as ndi

MaskMode = Literal["original", "M-15", "M-50"]
MASK_MODES: tuple[MaskMode, ...] = ("original", "M-15", "M-50")
WORKING_SIZE = 512
EROSION_RADIUS = 5
DILATION_RADIUS: dict[str, int] = {"M-15": 15, "M-50": 50}


def resize_mask(mask: np.ndarray, size: int = WORKING_SIZE) -> np.ndarray:
    """Resize a boolean mask to size x size (area-weighted, then > 0.5)."""
    resized = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return resized > 0.5


def erode(mask: np.ndarray, radius: float) -> np.ndarray:
    if radius <= 0:
        return mask.astype(bool)
    return np.asarray(ndi.distance_transform_edt(mask) > radius)


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    if radius <= 0:
        return mask.astype(bool)
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    return np.asarray(ndi.distance_transform_edt(~mask) <= radius)


def study_mask(lungs: np.ndarray, mode: MaskMode) -> np.ndarray | None:
    """The mask of `mode` for a lung mask already at working resolution; None = no mask."""
    if mode == "original":
        return None
    return grow(erode(lungs.astype(bool), EROSION_RADIUS), mode)


def grow(eroded: np.ndarray, mode: MaskMode) -> np.ndarray:
    """The dilation step of `mode` ("M-15" or "M-50") on an already eroded lung mask: one
    erosion can serve both loose masks of an image."""
    if mode not in DILATION_RADIUS:
        raise ValueError(f"Expected a loose mask mode in {tuple(DILATION_RADIUS)}, found {mode!r}.")
    return dilate(eroded, DILATION_RADIUS[mode])


def apply_mask(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Zero the image outside the mask (the study's masking); None leaves it unchanged."""
    if mask is None:
        return image
    return np.where(mask, image, np.zeros_like(image))

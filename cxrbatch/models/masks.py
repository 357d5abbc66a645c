"""The study's lung masks: original (no mask), M-15 and M-50, at 512 x 512.

The raw MedSAM lung mask is eroded with a disk of radius 5 and then dilated with a disk
of radius 15 (M-15) or 50 (M-50), at the study's 512 x 512 working resolution. Morphology
uses exact Euclidean distance transforms: erosion by r keeps pixels farther than r from
the background, dilation by r adds pixels within r of the eroded mask. The transform is
OpenCV's exact one (DIST_L2 with DIST_MASK_PRECISE: Felzenszwalb and Huttenlocher's
algorithm), the same masks as scipy's distance_transform_edt at a fifth of its time
(tests/test_masks.py compares the two); a mask with no background pixel at all keeps
scipy's answer, which OpenCV does not define.
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


def distance_to_background(mask: np.ndarray) -> np.ndarray:
    """Each pixel's exact Euclidean distance to the nearest False pixel of `mask` (0 on
    them), as scipy.ndimage.distance_transform_edt gives it."""
    if mask.all():  # no background: OpenCV leaves this undefined
        return np.asarray(ndi.distance_transform_edt(mask))
    source = np.ascontiguousarray(mask, dtype=np.uint8)
    return np.asarray(cv2.distanceTransform(source, cv2.DIST_L2, cv2.DIST_MASK_PRECISE))


def erode(mask: np.ndarray, radius: float) -> np.ndarray:
    if radius <= 0:
        return mask.astype(bool)
    return distance_to_background(mask.astype(bool)) > radius


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    if radius <= 0:
        return mask.astype(bool)
    return Growth(mask).within(radius)


class Growth:
    """Dilations of one mask by any radii from one distance transform: each pixel's
    distance to the mask, thresholded per radius (M-15 and M-50 of one image share it)."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask.astype(bool)
        # None: an empty mask, which no dilation grows
        self.distance = distance_to_background(~self.mask) if self.mask.any() else None

    def within(self, radius: float) -> np.ndarray:
        """`dilate(mask, radius)`."""
        if radius <= 0:
            return self.mask.copy()
        if self.distance is None:
            return np.zeros_like(self.mask)
        return self.distance <= radius


def study_mask(lungs: np.ndarray, mode: MaskMode) -> np.ndarray | None:
    """The mask of `mode` for a lung mask already at working resolution; None = no mask."""
    if mode == "original":
        return None
    return grow(erode(lungs.astype(bool), EROSION_RADIUS), mode)


def grow(eroded: np.ndarray | Growth, mode: MaskMode) -> np.ndarray:
    """The dilation step of `mode` ("M-15" or "M-50") on an already eroded lung mask, or
    on its `Growth`: one erosion and one distance transform serve both loose masks of an
    image."""
    if mode not in DILATION_RADIUS:
        raise ValueError(f"Expected a loose mask mode in {tuple(DILATION_RADIUS)}, found {mode!r}.")
    growth = eroded if isinstance(eroded, Growth) else Growth(eroded)
    return growth.within(DILATION_RADIUS[mode])


def apply_mask(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Zero the image outside the mask (the study's masking); None leaves it unchanged."""
    if mask is None:
        return image
    return np.where(mask, image, np.zeros_like(image))

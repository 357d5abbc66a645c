"""One preprocessing for training and inference.

Both an 8-bit PNG (NIH ChestX-ray14) and a decoded DICOM (see cxrbatch.dicom.decode, which
ends in the same uint8 display form) go through `classifier_input`: resize to the
bundle's input size (area interpolation), scale to [0, 1], zero outside the study mask,
then normalise per channel with the bundle's mean and std and repeat to 3 channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from cxrbatch.models.masks import (
    EROSION_RADIUS,
    WORKING_SIZE,
    MaskMode,
    apply_mask,
    erode,
    grow,
    resize_mask,
)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Accept uint8, or 16-bit PNG data, or floats in [0, 1]; return uint8."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return np.round(image.astype(np.float64) / 257.0).astype(np.uint8)
    return np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


class ClassifierInputs:
    """One image's network inputs for any number of bundles.

    The resized image, the lung mask at the 512 x 512 working size and its erosion are
    computed once and shared: a classifier and a screening bundle at the same input size
    cost one resize of the full-size image and one erosion, not two. The arithmetic is that
    of `classifier_input`, which is this class used once.
    """

    def __init__(self, image: np.ndarray, lungs: np.ndarray | None) -> None:
        self.gray = to_uint8(image if image.ndim == 2 else image[..., 0])
        self.lungs = lungs
        self._resized: dict[int, np.ndarray] = {}
        self._eroded: np.ndarray | None = None

    def resized(self, size: int) -> np.ndarray:
        """The image at size x size (area interpolation), float32 in [0, 1]."""
        if size not in self._resized:
            small = cv2.resize(self.gray, (size, size), interpolation=cv2.INTER_AREA)
            self._resized[size] = small.astype(np.float32) / 255.0
        return self._resized[size]

    def mask(self, mask_mode: MaskMode, size: int) -> np.ndarray | None:
        """The study mask of `mask_mode` at size x size; None for "original"."""
        if mask_mode == "original":
            return None
        if self.lungs is None:
            raise ValueError(f"Mask mode {mask_mode} needs a lung mask.")
        if self._eroded is None:
            # Radii are defined at the study's 512 x 512 working resolution.
            self._eroded = erode(resize_mask(self.lungs, WORKING_SIZE), EROSION_RADIUS)
        mask = grow(self._eroded, mask_mode)
        return resize_mask(mask, size) if size != WORKING_SIZE else mask

    def tensor(
        self, mask_mode: MaskMode, size: int, mean: Sequence[float], std: Sequence[float]
    ) -> np.ndarray:
        """(3, size, size) float32 network input."""
        masked = apply_mask(self.resized(size), self.mask(mask_mode, size))
        channels = [(masked - m) / s for m, s in zip(mean, std, strict=True)]
        return np.stack(channels).astype(np.float32)


def classifier_input(
    image: np.ndarray,
    lungs: np.ndarray | None,
    mask_mode: MaskMode,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """(3, size, size) float32 network input from a grayscale image and its lung mask."""
    return ClassifierInputs(image, lungs).tensor(mask_mode, size, mean, std)

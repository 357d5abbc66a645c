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

from cxrbatch.models.masks import WORKING_SIZE, MaskMode, apply_mask, resize_mask, study_mask


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Accept uint8, or 16-bit PNG data, or floats in [0, 1]; return uint8."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return np.round(image.astype(np.float64) / 257.0).astype(np.uint8)
    return np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def classifier_input(
    image: np.ndarray,
    lungs: np.ndarray | None,
    mask_mode: MaskMode,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """(3, size, size) float32 network input from a grayscale image and its lung mask."""
    gray = to_uint8(image if image.ndim == 2 else image[..., 0])
    resized = (
        cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    )
    if mask_mode != "original":
        if lungs is None:
            raise ValueError(f"Mask mode {mask_mode} needs a lung mask.")
        # Radii are defined at the study's 512 x 512 working resolution.
        mask = study_mask(resize_mask(lungs, WORKING_SIZE), mask_mode)
        if mask is not None and size != WORKING_SIZE:
            mask = resize_mask(mask, size)
        resized = apply_mask(resized, mask)
    channels = [(resized - m) / s for m, s in zip(mean, std, strict=True)]
    return np.stack(channels).astype(np.float32)

"""One preprocessing for training and inference.

Both an 8-bit PNG (NIH ChestX-ray14) and a decoded DICOM (see cxrbatch.dicom.decode, which
ends in the same uint8 display form) go through `classifier_input`: resize to the
bundle's input size (area interpolation), scale to [0, 1], zero outside the study mask,
then normalise per channel with the bundle's mean and std and repeat to the bundle's
channels (3 for the ImageNet-initialised networks of the study).

Bundles imported from elsewhere declare the preprocessing their network was trained with
(cxrbatch/models/importers.py): TorchXRayVision's models take one channel in [-1024, 1024]
(mean 0.5, std 0.5/1024 here), a centre crop to a square and scikit-image's anti-aliased
bilinear resize done on the normalised image ("skimage"), which is exactly what
`torchxrayvision.datasets.XRayCenterCrop` and `XRayResizer` do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

from cxrbatch.models.masks import (
    EROSION_RADIUS,
    WORKING_SIZE,
    Growth,
    MaskMode,
    apply_mask,
    erode,
    grow,
    resize_mask,
)

Crop = Literal["none", "center"]
Resize = Literal["area", "skimage"]


def center_crop(image: np.ndarray) -> np.ndarray:
    """The centred square of side min(rows, columns), placed as TorchXRayVision places it."""
    rows, columns = image.shape[:2]
    side = min(rows, columns)
    top, left = rows // 2 - side // 2, columns // 2 - side // 2
    return image[top : top + side, left : left + side]


def skimage_resize(image: np.ndarray, size: int) -> np.ndarray:
    """scikit-image's anti-aliased bilinear resize with zero outside the border (the
    arguments of torchxrayvision.datasets.XRayResizer)."""
    from skimage.transform import resize  # only bundles that declare it need scikit-image

    out = resize(image, (size, size), order=1, mode="constant", preserve_range=True)
    return np.asarray(out, dtype=np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Accept uint8, or 16-bit PNG data, or floats in [0, 1]; return uint8."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return np.round(image.astype(np.float64) / 257.0).astype(np.uint8)
    return np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


class ClassifierInputs:
    """One image's network inputs for any number of bundles.

    The resized image, the lung mask at the 512 x 512 working size, its erosion and the
    distance transform the loose masks are grown by are computed once and shared: a
    classifier and a screening bundle at the same input size cost one resize of the
    full-size image, one erosion and one transform, not two each. The arithmetic is that
    of `classifier_input`, which is this class used once.
    """

    def __init__(self, image: np.ndarray, lungs: np.ndarray | None) -> None:
        self.gray = to_uint8(image if image.ndim == 2 else image[..., 0])
        self.lungs = lungs
        self._resized: dict[tuple[int, Crop], np.ndarray] = {}
        self._eroded: dict[Crop, Growth] = {}

    def _source(self, crop: Crop) -> np.ndarray:
        return center_crop(self.gray) if crop == "center" else self.gray

    def box(self, crop: Crop = "none") -> tuple[int, int, int, int]:
        """The part of the image a bundle with `crop` is given: (top, left, height, width)."""
        rows, columns = self.gray.shape
        if crop == "center":
            side = min(rows, columns)
            return rows // 2 - side // 2, columns // 2 - side // 2, side, side
        return 0, 0, rows, columns

    def resized(self, size: int, crop: Crop = "none") -> np.ndarray:
        """The image at size x size (area interpolation), float32 in [0, 1]."""
        if (size, crop) not in self._resized:
            source = self._source(crop)
            small = cv2.resize(source, (size, size), interpolation=cv2.INTER_AREA)
            self._resized[size, crop] = small.astype(np.float32) / 255.0
        return self._resized[size, crop]

    def mask(self, mask_mode: MaskMode, size: int, crop: Crop = "none") -> np.ndarray | None:
        """The study mask of `mask_mode` at size x size; None for "original"."""
        if mask_mode == "original":
            return None
        if self.lungs is None:
            raise ValueError(f"Mask mode {mask_mode} needs a lung mask.")
        if crop not in self._eroded:
            # Radii are defined at the study's 512 x 512 working resolution.
            lungs = center_crop(self.lungs) if crop == "center" else self.lungs
            self._eroded[crop] = Growth(erode(resize_mask(lungs, WORKING_SIZE), EROSION_RADIUS))
        mask = grow(self._eroded[crop], mask_mode)
        return resize_mask(mask, size) if size != WORKING_SIZE else mask

    def tensor(
        self,
        mask_mode: MaskMode,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop: Crop = "none",
        resize: Resize = "area",
    ) -> np.ndarray:
        """(len(mean), size, size) float32 network input."""
        mask = self.mask(mask_mode, size, crop)
        if resize == "area":
            masked = apply_mask(self.resized(size, crop), mask)
            channels = [(masked - m) / s for m, s in zip(mean, std, strict=True)]
        else:  # "skimage": resized after normalisation, as TorchXRayVision does it
            full = self._source(crop).astype(np.float32) / 255.0
            channels = []
            for m, s in zip(mean, std, strict=True):
                small = skimage_resize((full - m) / s, size)
                channels.append(small if mask is None else np.where(mask, small, -m / s))
        return np.stack(channels).astype(np.float32)


def classifier_input(
    image: np.ndarray,
    lungs: np.ndarray | None,
    mask_mode: MaskMode,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop: Crop = "none",
    resize: Resize = "area",
) -> np.ndarray:
    """(channels, size, size) float32 network input from a grayscale image and its mask."""
    return ClassifierInputs(image, lungs).tensor(mask_mode, size, mean, std, crop, resize)

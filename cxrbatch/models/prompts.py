"""Automatic box prompts for MedSAM on a frontal chest radiograph.

MedSAM segments what a box encloses; users give no boxes. The strategy does not depend on
the lungs being the darkest region (on real films they often are not: breast shadows,
masses and a low-contrast window make the lower zones as bright as the chest wall):

1. Thorax. On a 256-px copy: collimation borders (bright, flat rows and columns at the
   edges) are trimmed, air outside the patient (dark regions touching the border) is
   removed, and the box of the rest is the patient. The mediastinum is the brightest
   column of its central band.
2. Lung boxes. Each side's box spans the hemithorax (5 % in from the body's edge to 3 %
   off the midline, from 6 % of the body's height), and ends at the diaphragm: the first
   row below mid-thorax where the lateral half's row profile climbs 70 % of the way from
   lung to abdomen density, plus 7 % of the body's height (the costophrenic angle).
3. First pass: MedSAM on both boxes against one image embedding.
4. Refinement (optional): the box of the first mask's largest component, padded by 2 %,
   is prompted again.
5. Clean-up: largest connected component per lung, holes filled, pixels claimed by both
   prompts go to the more confident one.
6. Quality gate: cxrbatch/models/qc.py judges each mask in the thorax found in step 1
   and against its first pass; the verdict travels with the masks.
7. Sides: the box in the image's left half is the patient's right lung when column 0 is
   the patient's right (from PatientOrientation or the display convention), else the left.

Measured on the real film RG1 with a traced reference and nine transformed copies, and on
hard phantoms (`python -m bench.seg_quality`, docs/segmentation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from cxrbatch.domain import DecodedImage, LungSegmentation
from cxrbatch.models import qc
from cxrbatch.models.segmenter import BoxSegmenter

WORK_SIZE = 256
POST_SIZE = 1024
# The lung boxes as fractions of the body box (see the module docstring).
LATERAL_MARGIN, MEDIAL_MARGIN, TOP_MARGIN = 0.05, 0.03, 0.06
DIAPHRAGM_LEVEL, DIAPHRAGM_PAD = 0.70, 0.07
REFINE_PAD = 0.02
Box = tuple[float, float, float, float]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = ndi.sum(mask, labels, range(1, count + 1))
    return np.asarray(labels == (int(np.argmax(sizes)) + 1))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_fill_holes` (background 4-connected to the border stays) by
    one OpenCV flood fill from a one-pixel frame: the same pixels, many times faster."""
    rows, cols = mask.shape
    canvas = np.zeros((rows + 2, cols + 2), dtype=np.uint8)
    canvas[1:-1, 1:-1][mask] = 255
    cv2.floodFill(canvas, None, (0, 0), 128, flags=4)
    return np.asarray(canvas[1:-1, 1:-1] != 128)


def _bbox(mask: np.ndarray) -> Box | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))


def _pad_box(box: Box, pad_x: float, pad_y: float, cols: int, rows: int) -> Box:
    x0, y0, x1, y1 = box
    return (
        max(0.0, x0 - pad_x),
        max(0.0, y0 - pad_y),
        min(cols - 1.0, x1 + pad_x),
        min(rows - 1.0, y1 + pad_y),
    )


def _smoothed(image: np.ndarray) -> np.ndarray:
    return np.asarray(cv2.GaussianBlur(image.astype(np.float32), (0, 0), max(image.shape) / 128.0))


def body_box(smooth: np.ndarray) -> Box:
    """The patient in a small display image smoothed by `_smoothed`: collimation borders
    trimmed, the air outside the patient (dark regions touching the border) removed;
    (x0, y0, x1, y1), exclusive."""
    rows, cols = smooth.shape
    bright = float(np.percentile(smooth, 99))

    def collimated(line: np.ndarray) -> bool:
        return float(line.mean()) > 0.92 * bright and float(line.std()) < 0.04 * bright

    top, bottom, left, right = 0, rows, 0, cols
    while top < rows // 4 and collimated(smooth[top, left:right]):
        top += 1
    while bottom > 3 * rows // 4 and collimated(smooth[bottom - 1, left:right]):
        bottom -= 1
    while left < cols // 4 and collimated(smooth[top:bottom, left]):
        left += 1
    while right > 3 * cols // 4 and collimated(smooth[top:bottom, right - 1]):
        right -= 1
    inner = np.clip(smooth[top:bottom, left:right], 0, 255).astype(np.uint8)
    threshold, _ = cv2.threshold(inner, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    labels, _ = ndi.label(inner < 0.6 * threshold)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    body = ~np.isin(labels, border[border > 0])
    xs = np.nonzero(body.mean(axis=0) > 0.3)[0]
    ys = np.nonzero(body.mean(axis=1) > 0.3)[0]
    if len(xs) == 0 or len(ys) == 0:
        return (float(left), float(top), float(right), float(bottom))
    return (
        float(left + xs[0]),
        float(top + ys[0]),
        float(left + xs[-1] + 1),
        float(top + ys[-1] + 1),
    )


def midline(image: np.ndarray, body: Box) -> float:
    """The mediastinum: the brightest column of the body's central band."""
    x0, y0, x1, y1 = body
    width, height = x1 - x0, y1 - y0
    smooth = cv2.GaussianBlur(image.astype(np.float32), (0, 0), max(image.shape) / 85.0)
    c0, r0 = int(x0 + 0.3 * width), int(y0 + 0.2 * height)
    band = smooth[r0 : int(y0 + 0.7 * height), c0 : max(c0 + 1, int(x0 + 0.7 * width))]
    return float(c0 + int(np.argmax(band.mean(axis=0))))


def _diaphragm_row(smooth: np.ndarray, columns: tuple[float, float], body: Box) -> float | None:
    """The first row below mid-thorax where the mean of `columns` climbs DIAPHRAGM_LEVEL of
    the way from lung to abdomen density; None when it never does."""
    _, y0, _, y1 = body
    height = y1 - y0
    profile = smooth[:, int(columns[0]) : int(columns[1]) + 1].mean(axis=1)
    top, low = int(y0 + 0.2 * height), int(y0 + 0.45 * height)
    bottom = int(min(len(profile) - 1, y0 + 0.97 * height))
    if low >= bottom or top >= low:
        return None
    lung = float(np.percentile(profile[top:low], 30))
    abdomen = float(np.percentile(profile[low : bottom + 1], 90))
    above = np.nonzero(profile[low : bottom + 1] > lung + DIAPHRAGM_LEVEL * (abdomen - lung))[0]
    return None if len(above) == 0 else float(low + above[0])


@dataclass(frozen=True)
class Thorax:
    """What the prompts found in a working-size image: the patient's body box, the
    mediastinum's column and one box per lung ("image_left", "image_right")."""

    body: Box
    midline: float
    boxes: dict[str, Box]


def lung_boxes(image: np.ndarray) -> Thorax:
    """The thorax and the boxes, in `image` pixel coordinates, of the image-left and
    image-right lung."""
    rows = image.shape[0]
    smooth = _smoothed(image)
    body = body_box(smooth)
    x0, y0, x1, y1 = body
    width, height = x1 - x0, y1 - y0
    middle = midline(image, body)
    boxes: dict[str, Box] = {}
    for side, (bx0, bx1) in {
        "image_left": (x0 + LATERAL_MARGIN * width, middle - MEDIAL_MARGIN * width),
        "image_right": (middle + MEDIAL_MARGIN * width, x1 - LATERAL_MARGIN * width),
    }.items():
        top = y0 + TOP_MARGIN * height
        half = (bx1 - bx0) / 2
        lateral = (bx0, bx0 + half) if side == "image_left" else (bx0 + half, bx1)
        row = _diaphragm_row(smooth, lateral, body)
        bottom = y0 + 0.83 * height if row is None else row + DIAPHRAGM_PAD * height
        bottom = min(rows - 1.0, max(bottom, top + 0.5 * height))
        boxes[side] = (bx0, top, max(bx1, bx0 + 1.0), bottom)
    return Thorax(body, middle, boxes)


def _refined_box(first: np.ndarray, box: np.ndarray, scale: float) -> np.ndarray:
    """The box of the first mask (its largest component), padded by REFINE_PAD, in
    original pixels; the first box when the first mask is empty."""
    found = _bbox(first)
    if found is None:
        return box
    rows, cols = first.shape
    padded = _pad_box(found, REFINE_PAD * cols, REFINE_PAD * rows, cols, rows)
    return np.array(padded, dtype=np.float32) / scale


def segment_lungs(
    segmenter: BoxSegmenter, image: DecodedImage, refine: bool = True, threshold: float = 0.5
) -> LungSegmentation:
    """The patient's lungs in a decoded DICOM image."""
    return segment_pixels(
        segmenter, image.pixels, image.image_left_is_patient_right, refine, threshold
    )


def working_copy(pixels: np.ndarray) -> np.ndarray:
    """The WORK_SIZE-px copy (long side) in which the prompts are found."""
    rows, cols = pixels.shape
    scale = WORK_SIZE / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    return np.asarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA))


def segment_pixels(
    segmenter: BoxSegmenter,
    pixels: np.ndarray,
    image_left_is_patient_right: bool = True,
    refine: bool = True,
    threshold: float = 0.5,
    thorax: Thorax | None = None,
) -> LungSegmentation:
    """The lungs in a uint8 display-form image (a decoded DICOM or an NIH PNG).

    Without orientation information (PNGs) the radiographic display convention applies:
    the patient's right is on the image's left. `thorax` (in `working_copy` pixels)
    replaces the prompts found automatically; the QC bench uses it for bad prompts.
    """
    rows, cols = pixels.shape
    scale = WORK_SIZE / max(rows, cols)
    small = working_copy(pixels)
    thorax = thorax or lung_boxes(small)
    sides = ("image_left", "image_right")
    boxes = np.array([[v / scale for v in thorax.boxes[s]] for s in sides], dtype=np.float32)

    # Masks are decoded and cleaned up at most POST_SIZE px on the long side (SAM's logits
    # are 256 px anyway), then resized to the image: scipy's labelling and hole filling on
    # a 3000 x 3000 image cost more than the whole model on a GPU.
    post_scale = min(1.0, POST_SIZE / max(rows, cols))
    post_shape = (max(1, round(rows * post_scale)), max(1, round(cols * post_scale)))
    embedding = segmenter.embed(pixels)
    first_pass = None
    if refine:
        # The first pass steers the second (and is compared with it by QC): decode it at
        # the 256-px working size.
        first, _ = segmenter.predict(embedding, boxes, output_size=small.shape[:2])
        first_pass = tuple(fill_holes(_largest_component(first[i] > threshold)) for i in range(2))
        boxes = np.stack([_refined_box(first_pass[i], boxes[i], scale) for i in range(2)])
    probs, iou = segmenter.predict(embedding, boxes, output_size=post_shape)

    masks, small_masks = [], []
    for i in range(2):
        own = probs[i] > threshold
        other = probs[1 - i]
        own &= ~((other > threshold) & (other > probs[i]))
        mask = fill_holes(_largest_component(own))
        small_masks.append(_resized(mask, small.shape[:2]))
        if post_shape != (rows, cols):
            mask = _resized(mask, (rows, cols))
        masks.append(mask)
    verdict = qc.assess(
        small,
        (small_masks[0], small_masks[1]),
        thorax.body,
        thorax.midline,
        None if first_pass is None else (first_pass[0], first_pass[1]),
        (float(iou[0]), float(iou[1])),
        image_left_is_patient_right,
    )
    image_left_mask, image_right_mask = masks
    if image_left_is_patient_right:
        right, left = image_left_mask, image_right_mask
        right_box, left_box, right_iou, left_iou = boxes[0], boxes[1], iou[0], iou[1]
    else:
        right, left = image_right_mask, image_left_mask
        right_box, left_box, right_iou, left_iou = boxes[1], boxes[0], iou[1], iou[0]
    return LungSegmentation(
        right_lung=right,
        left_lung=left,
        prompt_boxes={
            "right": tuple(float(v) for v in right_box),  # type: ignore[dict-item]
            "left": tuple(float(v) for v in left_box),  # type: ignore[dict-item]
        },
        predicted_iou={"right": float(right_iou), "left": float(left_iou)},
        qc=verdict,
    )


def _resized(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    resized = cv2.resize(mask.astype(np.float32), shape[::-1], interpolation=cv2.INTER_LINEAR)
    return np.asarray(resized) > 0.5

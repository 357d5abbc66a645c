"""Automatic box prompts for MedSAM on a frontal chest radiograph.

MedSAM segments what a box encloses; users give no boxes. The strategy:

1. Dark-field boxes. On a 256-px copy, lungs are the large dark regions enclosed by the
   body. Smooth, Otsu-threshold, open, drop dark regions touching the image border (air
   outside the patient), split at the mediastinum (the brightest column of the central
   band) and take the largest dark region on each side. Its bounding box is the first
   prompt. A side with no plausible region falls back to an anatomical prior box.
2. First pass: MedSAM on both boxes against one image embedding.
3. Refinement (optional): the box of the union of the first mask's largest component and
   the dark region, padded by 2 %, is prompted again; the refined mask is kept when it is
   plausible (1-40 % of the image), else the first one.
4. Clean-up: largest connected component per lung, holes filled, pixels claimed by both
   prompts go to the more confident one.
5. Sides: the box in the image's left half is the patient's right lung when column 0 is
   the patient's right (from PatientOrientation or the display convention), else the left.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

from cxrbatch.domain import DecodedImage, LungSegmentation
from cxrbatch.models.segmenter import BoxSegmenter

WORK_SIZE = 256
POST_SIZE = 1024
# Prior boxes (x0, y0, x1, y1) as fractions of the image: the image-left and image-right lung.
PRIOR_BOXES = {"image_left": (0.10, 0.12, 0.48, 0.82), "image_right": (0.52, 0.12, 0.90, 0.84)}
PLAUSIBLE_AREA = (0.01, 0.40)

Box = tuple[float, float, float, float]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = ndi.sum(mask, labels, range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


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


def dark_field_regions(image: np.ndarray) -> dict[str, np.ndarray | None]:
    """The largest enclosed dark region on each side of the mediastinum, at `image` size."""
    rows, cols = image.shape
    smooth = cv2.GaussianBlur(image.astype(np.float32), (0, 0), max(rows, cols) / 128.0)
    smooth_u8 = np.clip(smooth, 0, 255).astype(np.uint8)
    threshold, _ = cv2.threshold(smooth_u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = smooth_u8 < threshold
    dark = ndi.binary_opening(dark, iterations=2)
    labels, count = ndi.label(dark)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    band = smooth[int(0.2 * rows) : int(0.7 * rows), int(0.3 * cols) : int(0.7 * cols)]
    midline = int(0.3 * cols) + int(np.argmax(band.mean(axis=0)))
    result: dict[str, np.ndarray | None] = {"image_left": None, "image_right": None}
    best_size = {"image_left": 0.0, "image_right": 0.0}
    if count == 0:
        return result
    sizes = ndi.sum(dark, labels, range(1, count + 1))
    centres = ndi.center_of_mass(dark, labels, range(1, count + 1))
    for index, (size, (_, cx)) in enumerate(zip(sizes, centres, strict=True), start=1):
        if index in border or size < 0.02 * rows * cols:
            continue
        side = "image_left" if cx < midline else "image_right"
        if size > best_size[side]:
            best_size[side] = float(size)
            result[side] = labels == index
    return result


def initial_boxes(
    image: np.ndarray,
) -> tuple[dict[str, Box], dict[str, np.ndarray | None], list[str]]:
    """Boxes in `image` pixel coordinates for the image-left and image-right lung."""
    rows, cols = image.shape
    regions = dark_field_regions(image)
    boxes: dict[str, Box] = {}
    notes: list[str] = []
    for side, region in regions.items():
        box = _bbox(region) if region is not None else None
        if box is not None and (box[3] - box[1]) >= 0.2 * rows and (box[2] - box[0]) >= 0.1 * cols:
            boxes[side] = box
        else:
            fx0, fy0, fx1, fy1 = PRIOR_BOXES[side]
            boxes[side] = (fx0 * cols, fy0 * rows, fx1 * cols, fy1 * rows)
            regions[side] = None
            notes.append(f"{side.replace('_', '-')} lung: no dark field found, prior box used")
    return boxes, regions, notes


def _refined_box(
    first: np.ndarray,
    region: np.ndarray | None,
    box: np.ndarray,
    shape: tuple[int, int],
    scale: float,
) -> np.ndarray:
    """The box of the first mask's largest component united with the dark region, padded
    by 2 %, in original pixels; the first box when the first mask is empty."""
    union = _largest_component(first)
    if region is not None:
        union = union | region
    found = _bbox(union)
    if found is None:
        return box
    rows, cols = shape
    padded = _pad_box(found, 0.02 * cols, 0.02 * rows, cols, rows)
    return np.array(padded, dtype=np.float32) / scale


def segment_lungs(
    segmenter: BoxSegmenter, image: DecodedImage, refine: bool = True, threshold: float = 0.5
) -> LungSegmentation:
    """The patient's lungs in a decoded DICOM image."""
    return segment_pixels(
        segmenter, image.pixels, image.image_left_is_patient_right, refine, threshold
    )


def segment_pixels(
    segmenter: BoxSegmenter,
    pixels: np.ndarray,
    image_left_is_patient_right: bool = True,
    refine: bool = True,
    threshold: float = 0.5,
) -> LungSegmentation:
    """The lungs in a uint8 display-form image (a decoded DICOM or an NIH PNG).

    Without orientation information (PNGs) the radiographic display convention applies:
    the patient's right is on the image's left.
    """
    rows, cols = pixels.shape
    scale = WORK_SIZE / max(rows, cols)
    small = cv2.resize(
        pixels,
        (max(1, round(cols * scale)), max(1, round(rows * scale))),
        interpolation=cv2.INTER_AREA,
    )
    small_boxes, regions, notes = initial_boxes(small)
    sides = ("image_left", "image_right")
    boxes = np.array([[v / scale for v in small_boxes[s]] for s in sides], dtype=np.float32)

    # Masks are decoded and cleaned up at most POST_SIZE px on the long side (SAM's logits
    # are 256 px anyway), then resized to the image: scipy's labelling and hole filling on
    # a 3000 x 3000 image cost more than the whole model on a GPU.
    post_scale = min(1.0, POST_SIZE / max(rows, cols))
    post_shape = (max(1, round(rows * post_scale)), max(1, round(cols * post_scale)))
    embedding = segmenter.embed(pixels)
    if not refine:
        probs, iou = segmenter.predict(embedding, boxes, output_size=post_shape)
    else:
        # The first pass only steers the second: decode it at the 256-px working size.
        first, iou = segmenter.predict(embedding, boxes, output_size=small.shape[:2])
        refined = np.stack(
            [
                _refined_box(first[i] > threshold, regions[side], boxes[i], small.shape[:2], scale)
                for i, side in enumerate(sides)
            ]
        )
        probs, iou2 = segmenter.predict(embedding, refined, output_size=post_shape)
        fallback = None
        for i, side in enumerate(sides):
            fraction = float((probs[i] > threshold).mean())
            if PLAUSIBLE_AREA[0] <= fraction <= PLAUSIBLE_AREA[1]:
                iou[i], boxes[i] = iou2[i], refined[i]
                continue
            if fallback is None:
                fallback = segmenter.predict(embedding, boxes, output_size=post_shape)[0]
            probs[i] = fallback[i]
            notes.append(
                f"{side.replace('_', '-')} lung: refined mask implausible, first pass kept"
            )

    masks = []
    for i in range(2):
        own = probs[i] > threshold
        other = probs[1 - i]
        own &= ~((other > threshold) & (other > probs[i]))
        mask = fill_holes(_largest_component(own))
        if post_shape != (rows, cols):
            resized = cv2.resize(
                mask.astype(np.float32), (cols, rows), interpolation=cv2.INTER_LINEAR
            )
            mask = np.asarray(resized) > 0.5
        masks.append(mask)
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
        notes=tuple(notes),
    )

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

from dataclasses import dataclass, field

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
# The chest-wall edge (`wall_bottom`): searched in the lateral WALL_BAND of each
# hemithorax, followed while it keeps WALL_KEEP of its mid-thorax strength, across gaps
# of WALL_GAP of the body height. A second, extended box is tried where it ends more than
# EXTEND_MIN of the image height below the diaphragm box (padded by DIAPHRAGM_PAD), and
# taken when the model's own IoU estimate for it is at most IOU_TOLERANCE lower.
WALL_BAND, WALL_KEEP, WALL_GAP = 0.4, 0.35, 0.03
EXTEND_MIN, IOU_TOLERANCE = 0.04, 0.02
# An extended lung whose base ends more than BASE_SPREAD of the image below the other's.
BASE_SPREAD = 0.12
Box = tuple[float, float, float, float]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask` (the first in raster order on a tie), as
    scipy.ndimage.label with its default structure finds it, by OpenCV. Most masks are one
    region, so they are labelled first without the regions' statistics (1 ms for a 1024-px
    mask, against 4 ms with them), and only a mask of several regions is labelled again
    with their areas (scipy's label and sum: 15 ms for three regions)."""
    source = np.ascontiguousarray(mask, dtype=np.uint8)
    if cv2.connectedComponents(source, connectivity=4)[0] <= 2:  # background + one region
        return mask.astype(bool)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(source, connectivity=4)
    return np.asarray(labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))


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


def wall_bottom(smooth: np.ndarray, body: Box, middle: float, side: str) -> float | None:
    """Where the lateral lung border ends: the lowest row of the run of the chest wall's
    edge (lung darker inside, ribs and wall brighter outside) that starts in mid-thorax,
    in the lateral WALL_BAND of the hemithorax; the costophrenic angle of a lung whose
    base lies lower than the diaphragm profile says (a magnified or cropped film). Gaps
    of up to WALL_GAP of the body's height (a rib's shadow) are bridged. None when no
    edge is found in mid-thorax."""
    x0, y0, x1, y1 = body
    height = y1 - y0
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    if side == "image_left":  # the wall is to the image's left of the lung
        a, b = int(x0), max(int(x0) + 2, int(x0 + WALL_BAND * (middle - x0)))
        edge = -gx[:, a:b]
    else:
        a, b = min(int(x1) - 2, int(middle + (1 - WALL_BAND) * (x1 - middle))), int(x1)
        edge = gx[:, a:b]
    strength = np.convolve(np.clip(edge, 0, None).max(axis=1), np.ones(5) / 5, mode="same")
    r0, r1 = int(y0 + 0.25 * height), int(y0 + 0.55 * height)
    if r1 <= r0 or r1 >= len(strength):
        return None
    reference = float(np.median(strength[r0:r1]))
    if reference <= 0:
        return None
    found = strength > WALL_KEEP * reference
    row, gap = r1, max(1, int(WALL_GAP * height))
    while True:
        while row + 1 < len(found) and found[row + 1]:
            row += 1
        ahead = np.nonzero(found[row + 1 : row + 2 + gap])[0]
        if len(ahead) == 0:
            return float(row)
        row += 1 + int(ahead[0])


@dataclass(frozen=True)
class Thorax:
    """What the prompts found in a working-size image: the patient's body box, the
    mediastinum's column, one box per lung ("image_left", "image_right") ending at the
    diaphragm the row profile shows, and where each side's chest-wall edge ends
    (`wall_bottoms`, None where none was found)."""

    body: Box
    midline: float
    boxes: dict[str, Box]
    wall_bottoms: dict[str, float | None] = field(default_factory=dict)


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
    walls: dict[str, float | None] = {}
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
        walls[side] = wall_bottom(smooth, body, middle, side)
    return Thorax(body, middle, boxes, walls)


def _bottom(mask: np.ndarray) -> float:
    rows = np.nonzero(mask.any(axis=1))[0]
    return float(rows.max()) if len(rows) else 0.0


def _extended_boxes(thorax: Thorax, rows: int, sides: tuple[str, str]) -> list[tuple[int, Box]]:
    """(side index, box) for each lung whose chest-wall edge ends more than EXTEND_MIN of
    the image below its box: the box reaching down to that edge's end, padded."""
    longer = []
    height = thorax.body[3] - thorax.body[1]
    for i, side in enumerate(sides):
        wall = thorax.wall_bottoms.get(side)
        x0, y0, x1, y1 = thorax.boxes[side]
        if wall is not None and wall > y1 + EXTEND_MIN * rows:
            bottom = min(rows - 1.0, wall + DIAPHRAGM_PAD * height)
            longer.append((i, (x0, y0, x1, bottom)))
    return longer


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
        segmenter, image.for_segmentation, image.image_left_is_patient_right, refine, threshold
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
    embedding = segmenter.embed(pixels, area_resized=small)
    first_pass = None
    alternatives: list[np.ndarray | None] = [None, None]
    if refine:
        # The first pass steers the second (and is compared with it by QC): decode it at
        # the 256-px working size.
        first, first_iou = segmenter.predict(embedding, boxes, output_size=small.shape[:2])
        masks = [fill_holes(_largest_component(first[i] > threshold)) for i in range(2)]
        # Where the chest wall's edge runs on below the diaphragm box (a magnified, rotated
        # or cropped film), the same lung prompted down to it: the mask the model is surer
        # of is kept, the other is what the quality gate compares it with.
        longer = _extended_boxes(thorax, small.shape[0], sides)
        if longer:
            extra = np.array([[v / scale for v in box] for _, box in longer], dtype=np.float32)
            second, second_iou = segmenter.predict(embedding, extra, output_size=small.shape[:2])
            capped = list(masks)
            for k, (i, _) in enumerate(longer):
                candidate = fill_holes(_largest_component(second[k] > threshold))
                if float(second_iou[k]) >= float(first_iou[i]) - IOU_TOLERANCE:
                    alternatives[i], masks[i] = masks[i], candidate
                    boxes[i] = extra[k]
                else:
                    alternatives[i] = candidate
            # A base taken lower than the other lung's by more than BASE_SPREAD of the
            # image (on a film where the other did not come down with it) has leaked into
            # the abdomen: the diaphragm box's mask is kept.
            for i in range(2):
                if alternatives[i] is None or capped[i] is masks[i]:
                    continue
                if _bottom(masks[i]) - _bottom(masks[1 - i]) > BASE_SPREAD * small.shape[0]:
                    alternatives[i], masks[i] = masks[i], capped[i]
                    boxes[i] = np.array([v / scale for v in thorax.boxes[sides[i]]], np.float32)
        first_pass = (masks[0], masks[1])
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
        (alternatives[0], alternatives[1]),
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

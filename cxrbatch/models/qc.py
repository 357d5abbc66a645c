"""The segmentation quality gate: is each lung mask plausible as a lung field?

MedSAM answers every box with some mask; nothing in its output says that the mask missed
half the lung or grew into the abdomen. These checks look at each mask in the thorax the
prompts found (`prompts.Thorax`, on the 256-px working copy) and at the two masks together:

    area_fraction    lung area / thorax (body box) area
    lateral_offset   centroid distance from the midline towards the lung's own side,
                     as a fraction of the thorax width (negative: across the midline)
    centroid_height  centroid row below the thorax top, as a fraction of its height
    vertical_extent  the mask's height as a fraction of the thorax height
    solidity         mask area / convex hull area (a lung field is nearly convex)
    contrast         how much darker the mask is than a ring around it (outside both
                     masks), as a fraction of the thorax's 5-95 % intensity range: aerated
                     lung is dark; a mask over a whited-out hemithorax is not
    pass_agreement   Dice between the first pass and the refined pass (with refinement)
    predicted_iou    the model's own estimate of its mask's IoU
    area_ratio       smaller lung area / larger lung area (the pair)
    contrast_ratio   lower contrast / higher contrast of the two lungs (the pair): a mask
                     over a whited-out hemithorax is much less dark than its partner

A mask fails when a measure falls outside THRESHOLDS; the reason names each failed
measure with its value and the expected range. The thresholds were chosen on hard
phantoms (seed 0, 48 films), phantoms with a whited-out or missing lung, and deliberately
bad prompts, never on RG1, and are checked on held-out phantoms (seed 1) and on the RG1
set: docs/segmentation.md says how and what they flag (`python -m bench.seg_quality`).
"""

from __future__ import annotations

import cv2
import numpy as np

from cxrbatch.domain import LungQC, SegmentationQC

Box = tuple[float, float, float, float]

# measure -> (lowest, highest) plausible value; None = no bound on that side.
THRESHOLDS: dict[str, tuple[float | None, float | None]] = {
    "area_fraction": (0.06, 0.30),
    "lateral_offset": (0.10, 0.40),
    "centroid_height": (0.22, 0.60),
    "vertical_extent": (0.35, None),
    "solidity": (0.75, None),
    "contrast": (0.20, None),
    "pass_agreement": (0.85, None),
    "predicted_iou": (0.70, None),
}
PAIR_THRESHOLDS: dict[str, tuple[float | None, float | None]] = {
    "area_ratio": (0.45, None),
    "contrast_ratio": (0.55, None),
}
PERCENT = {"area_fraction", "lateral_offset", "centroid_height", "vertical_extent"}


def _solidity(mask: np.ndarray) -> float:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0.0
    hull = cv2.convexHull(np.concatenate(contours))
    canvas = np.zeros(mask.shape, dtype=np.uint8)
    cv2.fillConvexPoly(canvas, hull, 1)
    return float(mask.sum()) / max(1.0, float(canvas.sum()))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = float(a.sum()) + float(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


RING_WIDTH = 0.04  # of the thorax width


def _contrast(image: np.ndarray, mask: np.ndarray, both: np.ndarray, body: Box) -> float:
    x0, y0, x1, y1 = (round(v) for v in body)
    radius = max(1, round(RING_WIDTH * (x1 - x0)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    ring = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool) & ~both
    inside_body = np.zeros(mask.shape, dtype=bool)
    inside_body[y0:y1, x0:x1] = True
    ring &= inside_body
    if not ring.any():
        return 0.0
    low, high = np.percentile(image[inside_body], [5, 95])
    spread = max(1.0, float(high - low))
    return (float(np.median(image[ring])) - float(np.median(image[mask]))) / spread


def lung_measures(
    image: np.ndarray,
    mask: np.ndarray,
    both: np.ndarray,
    body: Box,
    midline: float,
    towards: int,
    first_pass: np.ndarray | None,
    predicted_iou: float,
) -> dict[str, float]:
    """The measures of one lung's mask in its thorax, on the working-size `image`; `both`
    is the union of the two masks. `towards` is -1 for the lung in the image's left half,
    +1 for the one in its right half."""
    x0, y0, x1, y1 = body
    width, height = max(1.0, x1 - x0), max(1.0, y1 - y0)
    area = float(mask.sum())
    measures = {"area_fraction": area / (width * height), "predicted_iou": predicted_iou}
    if area == 0:
        measures.update(lateral_offset=0.0, centroid_height=0.0, vertical_extent=0.0)
        measures.update(solidity=0.0, contrast=0.0)
    else:
        ys, xs = np.nonzero(mask)
        measures["lateral_offset"] = towards * (float(xs.mean()) - midline) / width
        measures["centroid_height"] = (float(ys.mean()) - y0) / height
        measures["vertical_extent"] = (float(ys.max()) - float(ys.min()) + 1) / height
        measures["solidity"] = _solidity(mask)
        measures["contrast"] = _contrast(image, mask, both, body)
    if first_pass is not None:
        measures["pass_agreement"] = dice(first_pass, mask)
    return {k: round(v, 4) for k, v in measures.items()}


def _failures(
    measures: dict[str, float], thresholds: dict[str, tuple[float | None, float | None]]
) -> tuple[str, ...]:
    failed = []
    for name, (low, high) in thresholds.items():
        if name not in measures:
            continue
        value = measures[name]

        def show(v: float, name: str = name) -> str:
            return f"{v:.0%}" if name in PERCENT else f"{v:.2f}"

        if low is not None and value < low:
            failed.append(f"{name.replace('_', ' ')} {show(value)} (expected >= {show(low)})")
        elif high is not None and value > high:
            failed.append(f"{name.replace('_', ' ')} {show(value)} (expected <= {show(high)})")
    return tuple(failed)


def assess(
    image: np.ndarray,
    image_side_masks: tuple[np.ndarray, np.ndarray],
    body: Box,
    midline: float,
    first_pass: tuple[np.ndarray, np.ndarray] | None,
    predicted_iou: tuple[float, float],
    image_left_is_patient_right: bool,
) -> SegmentationQC:
    """The verdict on the masks of the image-left and image-right lung, all at the size of
    `image`, the working copy in which `body` and `midline` were found."""
    verdicts = []
    both = image_side_masks[0] | image_side_masks[1]
    for i, towards in ((0, -1), (1, +1)):
        first = None if first_pass is None else first_pass[i]
        measures = lung_measures(
            image, image_side_masks[i], both, body, midline, towards, first, predicted_iou[i]
        )
        verdicts.append((measures, _failures(measures, THRESHOLDS)))
    pair = {}
    for name, key in (("area_ratio", "area_fraction"), ("contrast_ratio", "contrast")):
        values = [max(0.0, m[key]) for m, _ in verdicts]
        pair[name] = round(min(values) / max(values), 4) if max(values) > 0 else 0.0
    sides = ("right", "left") if image_left_is_patient_right else ("left", "right")
    lungs = {side: LungQC(side, m, f) for side, (m, f) in zip(sides, verdicts, strict=True)}
    return SegmentationQC(
        right=lungs["right"],
        left=lungs["left"],
        pair_measures=pair,
        pair_failures=_failures(pair, PAIR_THRESHOLDS),
    )

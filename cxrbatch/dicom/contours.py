"""Outlines of masks as DICOM graphic data: the SR's SCOORD POLYLINEs, the presentation
state's graphic objects (lung fields and the regions a classifier looked at).

DICOM image coordinates (PS3.3 C.10.5.1.2, C.18.6.1.2): column then row, in pixels, the
top left corner of the top left pixel at (0, 0), so a pixel's centre at (c + 0.5, r + 0.5).
A closed POLYLINE repeats its first point last.
"""

from __future__ import annotations

import cv2
import numpy as np

# The colours of the lungs and finding regions in every picture and object (sRGB): the
# key image, the web overlays, the SEG's recommended display colours, the GSPS layers.
RIGHT_COLOUR = (255, 160, 0)  # orange: the patient's right lung
LEFT_COLOUR = (0, 200, 255)  # light blue: the left lung
REGION_COLOUR = (255, 255, 0)  # yellow: a finding map's region

MAX_POINTS = 256  # per outline: a lung's border at this many points is within a pixel or two


def as_u8(mask: np.ndarray) -> np.ndarray:
    """A mask as the 0/1 bytes OpenCV takes: a boolean one viewed, not copied."""
    if mask.dtype == np.bool_ and mask.flags.c_contiguous:
        return mask.view(np.uint8)
    return mask.astype(np.uint8)


class Borders:
    """The outer borders of a mask's connected regions, found once (every border pixel;
    OpenCV's findContours on the full-size mask, the costly step) for all that draw them:
    the SR's and the presentation state's polylines and the presentation state's overlay
    (a study's writers share each lung's, `LungBorders`)."""

    def __init__(self, mask: np.ndarray) -> None:
        self.found, _ = cv2.findContours(as_u8(mask), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        self._lines: dict[tuple[int, float], list[np.ndarray]] = {}

    def polylines(self, max_points: int = MAX_POINTS, min_area: float = 0.0) -> list[np.ndarray]:
        """`outlines(mask, max_points, min_area)`, simplified once for each caller asking
        the same (the arrays are shared: read them, do not change them)."""
        if (max_points, min_area) not in self._lines:
            self._lines[max_points, min_area] = self._simplified(max_points, min_area)
        return self._lines[max_points, min_area]

    def polyline(self) -> np.ndarray | None:
        """The largest region's border, or None when the mask is empty."""
        lines = self.polylines()
        return lines[0] if lines else None

    def _simplified(self, max_points: int, min_area: float) -> list[np.ndarray]:
        regions = sorted(
            (c for c in self.found if cv2.contourArea(c) >= min_area and len(c) >= 3),
            key=cv2.contourArea,
            reverse=True,
        )
        lines = []
        for contour in regions:
            tolerance = 0.5
            simplified = contour
            while len(simplified) > max_points:
                simplified = cv2.approxPolyDP(contour, tolerance, True)
                tolerance *= 1.5
            points = simplified.reshape(-1, 2).astype(np.float64) + 0.5
            lines.append(np.vstack([points, points[:1]]))
        return lines


# The patient's right and left lung's borders, in that order.
LungBorders = tuple[Borders, Borders]


def outlines(
    mask: np.ndarray, max_points: int = MAX_POINTS, min_area: float = 0.0
) -> list[np.ndarray]:
    """The outer border of each connected region of `mask` (largest first; regions under
    `min_area` pixels left out) as closed polylines, (n, 2) float arrays of (column, row),
    simplified to at most `max_points` points."""
    return Borders(mask).polylines(max_points, min_area)

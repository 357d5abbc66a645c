"""Overlays for the study page: the radiograph with the lung contours of its SEG, rendered
server-side as PNG and cached (keyed by the SEG and source files' identity and the size).

The radiograph is decoded as the pipeline decodes it (VOI window, MONOCHROME1 inverted,
in its own pixel orientation); the masks come from the SEG written for it
(segment 1 the patient's right lung, 2 the left). A source that is gone (a purged spool
file, a moved input folder) gives the contours on black, said so in the PNG's corner.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import cv2
import numpy as np
import pydicom

from cxrbatch.dicom.decode import decode
from cxrbatch.dicom.discover import read_header
from cxrbatch.dicom.keyimage import WARNING_COLOUR, contour_picture
from cxrbatch.domain import RejectedFile
from cxrbatch.files import atomic_write

log = logging.getLogger(__name__)

SIZES = {"thumb": 256, "large": 1024}


class OverlayError(Exception):
    """The overlay cannot be drawn (no SEG, an unreadable SEG)."""


def seg_masks(seg_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The right and left lung masks of a cxrbatch SEG (source resolution)."""
    try:
        ds = pydicom.dcmread(seg_path)
        frames = np.asarray(ds.pixel_array)
    except Exception as exc:
        raise OverlayError(f"the SEG cannot be read: {type(exc).__name__}") from exc
    if frames.ndim == 2:
        frames = frames[None]
    masks: dict[int, np.ndarray] = {}
    for index, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        masks[number] = np.logical_or(masks.get(number, False), frames[index] > 0)
    shape = frames.shape[1:]
    empty = np.zeros(shape, dtype=bool)
    return masks.get(1, empty), masks.get(2, empty)


def _identity(path: Path | None) -> str:
    if path is None or not path.is_file():
        return "missing"
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def render_overlay(source: Path | None, seg: Path, size: str) -> bytes:
    """The PNG of one image's overlay at `size` ('thumb' or 'large')."""
    right, left = seg_masks(seg)
    pixels: np.ndarray | None = None
    if source is not None and source.is_file():
        header = read_header(source)
        if not isinstance(header, RejectedFile):
            try:
                decoded, _ = decode(header)
                if decoded.pixels.shape == right.shape:
                    pixels = decoded.pixels
            except Exception as exc:  # a source that no longer decodes: contours on black
                log.info("overlay source cannot be decoded: %s", type(exc).__name__)
    missing = pixels is None
    if pixels is None:
        pixels = np.zeros(right.shape, dtype=np.uint8)
    picture = contour_picture(pixels, right, left, SIZES[size])
    if missing:
        cv2.putText(
            picture, "radiograph not available: contours only", (6, 18),
            cv2.FONT_HERSHEY_SIMPLEX, 0.45, WARNING_COLOUR, 1, cv2.LINE_AA,
        )  # fmt: skip
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OverlayError("the overlay cannot be encoded as PNG")
    return bytes(encoded.tobytes())


def cached_overlay(cache_dir: Path, source: Path | None, seg: Path, size: str) -> bytes:
    """`render_overlay`, kept in `cache_dir` under a key of both files' identity."""
    key = hashlib.sha256(f"{_identity(source)}|{_identity(seg)}|{size}".encode()).hexdigest()
    target = cache_dir / key[:2] / f"{key}.png"
    try:
        return target.read_bytes()
    except FileNotFoundError:
        pass
    data = render_overlay(source, seg, size)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda handle: handle.write(data))
    except OSError as exc:  # a full or read-only cache: serve it uncached
        log.warning("overlay cache not written: %s", exc.strerror)
    return data

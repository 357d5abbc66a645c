"""Overlays for the study page: the radiograph with the lung contours of its SEG (and, on
request, the classifier's finding maps), rendered server-side as PNG and cached (keyed by
the SEG, source and maps files' identity and the size).

The radiograph is decoded as the pipeline decodes it (VOI window, MONOCHROME1 inverted,
in its own pixel orientation); the masks come from the SEG written for it
(segment 1 the patient's right lung, 2 the left). A source that is gone (a purged spool
file, a moved input folder) gives the contours on black, said so in the PNG's corner.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom

from cxrbatch.dicom.decode import decode, modality_image, percentile_bounds
from cxrbatch.dicom.discover import read_header
from cxrbatch.dicom.export import read_maps
from cxrbatch.dicom.keyimage import WARNING_COLOUR, contour_picture, draw_lungs
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


def render_overlay(source: Path | None, seg: Path, size: str, maps: Path | None = None) -> bytes:
    """The PNG of one image's overlay at `size` ('thumb' or 'large'), with the finding
    maps of `maps` (export.write_maps) tinted over it when given."""
    right, left = seg_masks(seg)
    finding_maps = []
    if maps is not None:
        try:
            finding_maps = read_maps(maps)
        except (OSError, ValueError, KeyError) as exc:
            raise OverlayError(f"the finding maps cannot be read: {type(exc).__name__}") from exc
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
    picture = contour_picture(pixels, right, left, SIZES[size], finding_maps)
    notes = ["radiograph not available: contours only"] if missing else []
    if any(m.model.synthetic_training_data for m in finding_maps):
        notes.append("SYNTHETIC MODEL: maps not clinically meaningful")
    for row, note in enumerate(notes):
        cv2.putText(
            picture, note, (6, 18 + 20 * row),
            cv2.FONT_HERSHEY_SIMPLEX, 0.45, WARNING_COLOUR, 1, cv2.LINE_AA,
        )  # fmt: skip
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OverlayError("the overlay cannot be encoded as PNG")
    return bytes(encoded.tobytes())


def cached_overlay(
    cache_dir: Path, source: Path | None, seg: Path, size: str, maps: Path | None = None
) -> bytes:
    """`render_overlay`, kept in `cache_dir` under a key of the files' identity."""
    files = f"{_identity(source)}|{_identity(seg)}|{_identity(maps) if maps else 'no maps'}"
    key = hashlib.sha256(f"{files}|{size}".encode()).hexdigest()
    return _cached(
        cache_dir / key[:2] / f"{key}.png", lambda: render_overlay(source, seg, size, maps)
    )


def _cached(target: Path, make: Callable[[], bytes]) -> bytes:
    """The bytes kept at `target`, or made now and kept there (atomically)."""
    try:
        return target.read_bytes()
    except FileNotFoundError:
        pass
    data = make()
    _keep(target, data)
    return data


def _keep(target: Path, data: bytes) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda handle: handle.write(data))
    except OSError as exc:  # a full or read-only cache: serve it uncached
        log.warning("web cache not written: %s", exc.strerror)


# ---- the study page's viewer (static/viewer.js) -----------------------------------------
#
# The browser windows the film itself: it gets the Modality LUT values (not a display
# rendering) as little-endian uint16 codes spanning [low, high], gzip-compressed, at most
# VIEW_MAX pixels on the long side; their description (size, value range, the header's
# window or else the 0.5-99.5 percentile one, inversion); and the lung contours as a
# transparent PNG of the same size, drawn over the film when the reader wants them.

VIEW_MAX = 2048
VIEW_PARTS = ("view.json", "pixels", "lungs.png")


def render_view(source: Path, seg: Path) -> dict[str, bytes]:
    """The viewer's three parts for one image (VIEW_PARTS); OverlayError when the
    radiograph is gone or does not decode."""
    header = read_header(source) if source.is_file() else None
    if header is None or isinstance(header, RejectedFile):
        raise OverlayError("the radiograph is not available")
    try:
        image = modality_image(header)
    except Exception as exc:
        raise OverlayError(f"the radiograph does not decode: {type(exc).__name__}") from exc
    right, left = seg_masks(seg)
    values: np.ndarray = image.values.astype(np.float32)
    if right.shape != values.shape:
        raise OverlayError("the segmentation does not match the radiograph's size")
    rows, cols = values.shape
    scale = min(1.0, VIEW_MAX / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    if scale < 1:
        values = cv2.resize(values, size, interpolation=cv2.INTER_AREA)
    low, high = float(values.min()), float(values.max())
    span = high - low if high > low else 1.0
    codes = np.round((values - low) / span * 65535.0).astype("<u2")
    p_low, p_high = percentile_bounds(values)
    center, width = image.window or ((p_low + p_high) / 2, p_high - p_low)
    lungs = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    draw_lungs(lungs, right, left)
    ok, png = cv2.imencode(".png", cv2.cvtColor(lungs, cv2.COLOR_RGBA2BGRA))
    if not ok:
        raise OverlayError("the lung layer cannot be encoded as PNG")
    meta = {
        "width": size[0],
        "height": size[1],
        "source_rows": rows,
        "source_columns": cols,
        "low": low,
        "high": high,
        "window": {"center": center, "width": max(width, 1.0)},
        "window_source": "header" if image.window else "percentile 0.5-99.5",
        "percentile": {"low": p_low, "high": p_high},
        "inverted": image.inverted,
    }
    return {
        "view.json": json.dumps(meta).encode(),
        "pixels": gzip.compress(codes.tobytes(), compresslevel=6),
        "lungs.png": bytes(png.tobytes()),
    }


def cached_view(cache_dir: Path, source: Path, seg: Path, part: str) -> bytes:
    """One part of `render_view` (VIEW_PARTS), the three kept in `cache_dir`."""
    key = hashlib.sha256(f"{_identity(source)}|{_identity(seg)}|view".encode()).hexdigest()
    folder = cache_dir / key[:2] / key
    try:
        return (folder / part).read_bytes()
    except FileNotFoundError:
        pass
    parts = render_view(source, seg)
    for name, data in parts.items():
        _keep(folder / name, data)
    return parts[part]

"""The two evaluation sets of lung segmentation: the real chest film RG1 (pydicom-data)
with its hand-traced reference and transformed copies, and the hard phantoms.

RG1's reference (`tests/data/rg1_lung_fields.json`, one polygon per lung, how it was
traced is written in the file) is carried through every transform, so each copy is
scored against the same outline:

- ``original``: RG1_UNCR decoded by the product's own decoder;
- ``j2k-lossy``: RG1_J2KI (lossy JPEG 2000 of the same film), decoded for real;
- ``mirrored``: columns flipped and the patient's right put on the image's right, as a
  film with PatientOrientation ``R\\F``;
- ``rotated+7`` / ``rotated-7``: rotated about the centre (patient rotation / tilt);
- ``gamma0.6`` / ``gamma1.6``: a darker and a lighter exposure;
- ``noisy``: Gaussian noise of 12 grey levels (a low-dose film);
- ``cropped``: a tighter collimation (8 % off the sides, 5 % off the top);
- ``half-size``: half the resolution.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from cxrbatch.dicom.decode import decode
from cxrbatch.dicom.discover import read_header
from cxrbatch.domain import DecodedImage, InstanceHeader
from cxrbatch.models.qc import dice
from cxrbatch.synthetic import Phantom, make_hard_phantom

__all__ = ["Case", "dice", "hard_phantom_cases", "lung_lost_cases", "reference_masks", "rg1_cases"]

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "rg1_lung_fields.json"


@dataclass(frozen=True, eq=False)
class Case:
    """One film with its reference lung fields (the patient's right and left)."""

    name: str
    image: DecodedImage
    right_lung: np.ndarray
    left_lung: np.ndarray


def pydicom_data_folder() -> Path:
    try:
        import data_store  # the import name of the pydicom-data package
    except ImportError as exc:
        raise FileNotFoundError(
            "pydicom-data is not installed: it ships the real chest film RG1 "
            "(pip install pydicom-data)"
        ) from exc
    return Path(data_store.__file__).parent / "data"


def _decoded(path: Path) -> DecodedImage:
    header = read_header(path)
    if not isinstance(header, InstanceHeader):
        raise ValueError(f"Expected a readable DICOM image at {path}, found {header!r}.")
    return decode(header)[0]


def reference_masks(shape: tuple[int, int], path: Path = REFERENCE) -> tuple[np.ndarray, ...]:
    """RG1's traced lung fields rasterised at `shape` (RG1's own is 1955 x 1841)."""
    doc = json.loads(path.read_text())
    masks = []
    for key in ("right_lung", "left_lung"):
        canvas = np.zeros(shape, np.uint8)
        points = np.round(np.array(doc[key], np.float64) * 8).astype(np.int32)
        cv2.fillPoly(canvas, [points], 1, lineType=cv2.LINE_8, shift=3)
        masks.append(canvas.astype(bool))
    return tuple(masks)


def _warp(
    case: Case, name: str, op: Callable[[np.ndarray, int], np.ndarray], side_flip: bool = False
) -> Case:
    pixels = op(case.image.pixels, cv2.INTER_AREA)
    right = op(case.right_lung.astype(np.uint8) * 255, cv2.INTER_LINEAR) > 127
    left = op(case.left_lung.astype(np.uint8) * 255, cv2.INTER_LINEAR) > 127
    image = replace(
        case.image,
        pixels=np.ascontiguousarray(pixels),
        image_left_is_patient_right=case.image.image_left_is_patient_right ^ side_flip,
    )
    return Case(name, image, right, left)


def _rotate(degrees: float) -> Callable[[np.ndarray, int], np.ndarray]:
    def op(a: np.ndarray, interpolation: int) -> np.ndarray:
        rows, cols = a.shape
        matrix = cv2.getRotationMatrix2D((cols / 2, rows / 2), degrees, 1.0)
        return cv2.warpAffine(
            a, matrix, (cols, rows), flags=interpolation, borderMode=cv2.BORDER_REPLICATE
        )

    return op


def _intensity(case: Case, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Case:
    pixels = np.clip(np.round(fn(case.image.pixels.astype(np.float64))), 0, 255).astype(np.uint8)
    return Case(name, replace(case.image, pixels=pixels), case.right_lung, case.left_lung)


def rg1_cases(folder: Path | None = None) -> list[Case]:
    """RG1 and its transformed copies, each with the reference carried along."""
    folder = folder or pydicom_data_folder()
    image = _decoded(folder / "RG1_UNCR.dcm")
    right, left = reference_masks(image.pixels.shape)
    base = Case("original", image, right, left)
    lossy = replace(base, name="j2k-lossy", image=_decoded(folder / "RG1_J2KI.dcm"))
    rows, cols = image.pixels.shape
    noise = np.random.default_rng(18).normal(0.0, 12.0, image.pixels.shape)
    top, side = round(0.05 * rows), round(0.08 * cols)
    return [
        base,
        lossy,
        _warp(base, "mirrored", lambda a, _i: a[:, ::-1], side_flip=True),
        _warp(base, "rotated+7", _rotate(7.0)),
        _warp(base, "rotated-7", _rotate(-7.0)),
        _intensity(base, "gamma0.6", lambda p: 255.0 * (p / 255.0) ** (1 / 0.6)),
        _intensity(base, "gamma1.6", lambda p: 255.0 * (p / 255.0) ** (1 / 1.6)),
        _intensity(base, "noisy", lambda p: p + noise),
        _warp(base, "cropped", lambda a, _i: a[top:, side : cols - side]),
        _warp(
            base,
            "half-size",
            lambda a, i: cv2.resize(a, (cols // 2, rows // 2), interpolation=i),
        ),
    ]


def _phantom_case(name: str, phantom: Phantom) -> Case:
    header = InstanceHeader(Path(name), "", name, "", "", "", "CR", "CHEST", "PA", "")
    image = DecodedImage(
        header,
        np.round(phantom.image * 255).astype(np.uint8),
        image_left_is_patient_right=not phantom.flipped,
        side_source="PatientOrientation",
    )
    return Case(name, image, phantom.right_lung, phantom.left_lung)


def hard_phantom_cases(count: int, size: int = 1024, seed: int = 0) -> Iterator[Case]:
    """`count` hard phantoms (cxrbatch.synthetic.make_hard_phantom), generated lazily."""
    for index in range(count):
        phantom = make_hard_phantom(seed * 1_000_003 + index, (size, size))
        yield _phantom_case(f"hard-{index:03d}", phantom)


def lung_lost_cases(count: int, size: int = 1024, seed: int = 0) -> Iterator[Case]:
    """Films on which one lung field cannot be found, which the QC gate must flag: a
    whited-out hemithorax (massive effusion; `make_hard_phantom(white_out=...)`) and a film
    cut off beside the mediastinum (a lung outside the field), alternating sides. Their
    seeds are offset from `hard_phantom_cases`' so the films differ from that set's."""
    for index in range(count):
        side = ("right", "left")[index % 2]
        number = seed * 1_000_003 + 500_000 + index
        if index % 4 < 2:
            phantom = make_hard_phantom(number, (size, size), white_out=side)
            yield _phantom_case(f"whiteout-{side}-{index:03d}", phantom)
            continue
        phantom = make_hard_phantom(number, (size, size))
        lost = phantom.right_lung if side == "right" else phantom.left_lung
        kept = phantom.left_lung if side == "right" else phantom.right_lung
        # Cut off the lost lung's side 5 % of the width beyond the kept lung's medial edge.
        columns = np.nonzero(kept.any(axis=0))[0]
        lost_cols = np.nonzero(lost.any(axis=0))[0]
        if lost_cols.mean() < columns.mean():
            start, stop = max(0, int(columns.min()) - size // 20), size
        else:
            start, stop = 0, min(size, int(columns.max()) + size // 20 + 1)
        cut = replace(
            phantom,
            image=np.ascontiguousarray(phantom.image[:, start:stop]),
            right_lung=np.ascontiguousarray(phantom.right_lung[:, start:stop]),
            left_lung=np.ascontiguousarray(phantom.left_lung[:, start:stop]),
        )
        yield _phantom_case(f"cutoff-{side}-{index:03d}", cut)

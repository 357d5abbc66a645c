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

The portable families (`portable_cases`, issue 32) are what a hospital sends at night from
ICU and ward films, each over a range: magnified 1.05-1.25x about the centre (AP
portable), rotated up to +/-15 degrees, bases cropped 10-30 %, apices cropped 5-15 %, a
header window or VOI LUT far narrower than the data (decoded from the DICOM by the
product's decoder), a pleural effusion covering 20-70 % of a hemithorax (a meniscus of
fluid density), a lobar consolidation at a base, and mirrored films whose orientation was
left as ``L\\F``. The reference stays the lung field (the effusion and consolidation are
inside it: a mask that leaves them out misses the lower zone a classifier must see). The
same families are made from hard phantoms (`portable_phantom_cases`), and films that are
not frontal chests at all (a tibia, a CT and an MR slice, an ultrasound frame) labelled as
one (`not_chest_cases`).
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
from cxrbatch_training.synthetic import Phantom, make_hard_phantom

__all__ = [
    "Case",
    "dice",
    "hard_phantom_cases",
    "lower_zone_dice",
    "lung_lost_cases",
    "not_chest_cases",
    "portable_cases",
    "portable_phantom_cases",
    "reference_masks",
    "rg1_cases",
]

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "rg1_lung_fields.json"


@dataclass(frozen=True, eq=False)
class Case:
    """One film with its reference lung fields (the patient's right and left).

    `family` groups the portable sets' films; `sides_wrong`: the header's orientation says
    the opposite of the anatomy (a mirrored film left as L\\F), which the gate must flag."""

    name: str
    image: DecodedImage
    right_lung: np.ndarray
    left_lung: np.ndarray
    family: str = ""
    sides_wrong: bool = False

    @property
    def cut_off(self) -> bool:
        """A base runs off the film: the reference lies along the film's bottom edge over
        more than a tenth of its width (a costophrenic angle not imaged), which the gate
        must flag whatever the Dice against the part that is on the film."""
        for lung in (self.right_lung, self.left_lung):
            columns = np.nonzero(lung.any(axis=0))[0]
            if len(columns) == 0:
                continue
            width = columns.max() - columns.min() + 1
            if lung[-2:].any(axis=0).sum() > 0.1 * width:
                return True
        return False


def lower_zone_dice(mask: np.ndarray, reference: np.ndarray) -> float:
    """Dice of `mask` against `reference` over the reference's lower third (its rows from
    two thirds of its height down to the film's bottom): the zone where effusions, basal
    consolidation and edema lie, and the one a mask cut short or run into the abdomen
    gets wrong while the whole lung's Dice stays near 0.9. 1.0 for an empty reference
    (nothing to miss)."""
    rows = np.nonzero(reference.any(axis=1))[0]
    if len(rows) == 0:
        return 1.0
    start = int(rows.min() + 2 * (rows.max() - rows.min() + 1) / 3)
    return dice(mask[start:], reference[start:])


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
    seg = case.image.segmentation_pixels
    image = replace(
        case.image,
        pixels=np.ascontiguousarray(pixels),
        segmentation_pixels=None if seg is None else np.ascontiguousarray(op(seg, cv2.INTER_AREA)),
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
    """An exposure or noise change: of the film itself, so of both 8-bit copies."""

    def change(a: np.ndarray) -> np.ndarray:
        return np.clip(np.round(fn(a.astype(np.float64))), 0, 255).astype(np.uint8)

    seg = case.image.segmentation_pixels
    image = replace(
        case.image,
        pixels=change(case.image.pixels),
        segmentation_pixels=None if seg is None else change(seg),
    )
    return Case(name, image, case.right_lung, case.left_lung)


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
    """`count` hard phantoms (cxrbatch_training.synthetic.make_hard_phantom), generated lazily."""
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


# -- the portable families (issue 32) -----------------------------------------------------


def _magnify(factor: float) -> Callable[[np.ndarray, int], np.ndarray]:
    def op(a: np.ndarray, interpolation: int) -> np.ndarray:
        rows, cols = a.shape
        cx, cy = cols / 2, rows / 2
        matrix = np.array([[factor, 0, (1 - factor) * cx], [0, factor, (1 - factor) * cy]])
        return cv2.warpAffine(
            a, matrix, (cols, rows), flags=interpolation, borderMode=cv2.BORDER_REPLICATE
        )

    return op


def _crop_rows(top: float, bottom: float) -> Callable[[np.ndarray, int], np.ndarray]:
    def op(a: np.ndarray, _interpolation: int) -> np.ndarray:
        rows = a.shape[0]
        return a[round(top * rows) : rows - round(bottom * rows)]

    return op


def soft_edged(region: np.ndarray) -> np.ndarray:
    """`region` as a float32 weight with a soft edge (a Gaussian of 1/250 of the film)."""
    return np.asarray(cv2.GaussianBlur(region.astype(np.float32), (0, 0), max(region.shape) / 250))


def towards_tissue(
    values: np.ndarray, soft: np.ndarray, lungs: np.ndarray, strength: float, percentile: float
) -> np.ndarray:
    """`values` (float32) blended by `strength` x `soft` towards the soft tissue's value:
    the `percentile` of the rows below the `lungs` (70 for display pixels, where dense is
    bright; 30 for MONOCHROME1 stored values, where it is low)."""
    pixels = values.astype(np.float32)
    bottom = int(np.nonzero(lungs.any(axis=1))[0].max())
    below = pixels[min(pixels.shape[0] - 1, bottom + 5) :]
    tissue = float(np.percentile(below, percentile) if below.size else np.percentile(pixels, 80))
    return np.asarray(pixels + soft * strength * (tissue - pixels))


def _opacity(
    case: Case,
    name: str,
    family: str,
    region: np.ndarray,
    strength: float,
    seed: int,
) -> Case:
    """`region` made denser: blended towards the soft-tissue grey of the film (below the
    lungs) by `strength`, with a soft edge and film grain."""
    lungs = case.right_lung | case.left_lung
    soft = soft_edged(region)
    grain = np.random.default_rng(seed).normal(0.0, 4.0, lungs.shape).astype(np.float32)

    def denser(image: np.ndarray) -> np.ndarray:
        blended = towards_tissue(image, soft, lungs, strength, 70) + soft * grain
        return np.clip(np.round(blended), 0, 255).astype(np.uint8)

    seg = case.image.segmentation_pixels
    image = replace(
        case.image,
        pixels=denser(case.image.pixels),
        segmentation_pixels=None if seg is None else denser(seg),
    )
    return Case(name, image, case.right_lung, case.left_lung, family)


def effusion_region(lung: np.ndarray, share: float) -> np.ndarray:
    """The lowest part of `lung` holding `share` of its area under a meniscus (the fluid
    climbs laterally), plus the costophrenic recess just outside it."""
    ys, xs = np.nonzero(lung)
    top, bottom = ys.min(), ys.max()
    centre = xs.mean()
    half = max(1.0, (xs.max() - xs.min()) / 2)
    yy, xx = np.mgrid[0 : lung.shape[0], 0 : lung.shape[1]]
    lateral = np.clip(np.abs(xx - centre) / half, 0, 1)  # 0 medial-centre, 1 at the edge
    meniscus = 0.12 * (bottom - top) * lateral**2
    total = float(lung.sum())
    low, high = float(top), float(bottom)
    for _ in range(30):  # the fluid level that covers `share` of the lung
        level = (low + high) / 2
        covered = float((lung & (yy >= level - meniscus)).sum()) / total
        low, high = (low, level) if covered < share else (level, high)
    region = lung & (yy >= (low + high) / 2 - meniscus)
    recess = cv2.dilate(region.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    return region | (recess & (yy >= (low + high) / 2))


def _consolidation_region(lung: np.ndarray, seed: int) -> np.ndarray:
    """A lobar consolidation in the lower third of `lung`: an irregular blob over half its
    width there."""
    rng = np.random.default_rng(seed)
    ys = np.nonzero(lung.any(axis=1))[0]
    top, bottom = ys.min(), ys.max()
    height = bottom - top
    y0 = top + 0.62 * height
    band = lung & (np.arange(lung.shape[0])[:, None] >= y0)
    if not band.any():
        return band
    bx = np.nonzero(band.any(axis=0))[0]
    cx = float(
        rng.uniform(bx.min() + 0.3 * (bx.max() - bx.min()), bx.max() - 0.3 * (bx.max() - bx.min()))
    )
    cy = float(y0 + 0.5 * (bottom - y0))
    yy, xx = np.mgrid[0 : lung.shape[0], 0 : lung.shape[1]]
    radius = 0.28 * (bx.max() - bx.min())
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.2 * np.sin(3 * angle + rng.uniform(0, 6.28))
    blob = np.hypot((xx - cx) / 1.2, yy - cy) < radius * wobble
    return blob & lung


def _narrow_window(folder: Path, share: float, centre_percentile: float) -> DecodedImage:
    """RG1 decoded by the product's decoder with a header window `share` of the data's
    range wide, centred at a percentile of its values."""
    import pydicom

    from cxrbatch.dicom.decode import decode_dataset

    path = folder / "RG1_UNCR.dcm"
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    ds.WindowCenter = float(np.percentile(values, centre_percentile))
    ds.WindowWidth = max(2.0, share * float(high - low))
    header = read_header(path)
    assert isinstance(header, InstanceHeader)
    return decode_dataset(ds, header)


def _voi_lut(folder: Path, steepness: float) -> DecodedImage:
    """RG1 with a VOI LUT (a steep sigmoid over the middle of the data) in the header."""
    import pydicom
    from pydicom.dataset import Dataset

    from cxrbatch.dicom.decode import decode_dataset

    path = folder / "RG1_UNCR.dcm"
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64)
    first, last = int(values.min()), int(values.max())
    centre = float(np.percentile(values, 50))
    spread = steepness * float(np.percentile(values, 95) - np.percentile(values, 5))
    entries = np.arange(first, last + 1, dtype=np.float64)
    lut = np.round(4095 / (1 + np.exp(-(entries - centre) / max(1.0, spread)))).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [len(lut) if len(lut) < 65536 else 0, first, 12]
    item.LUTData = lut.tolist()
    ds.VOILUTSequence = [item]
    header = read_header(path)
    assert isinstance(header, InstanceHeader)
    return decode_dataset(ds, header)


def portable_cases(folder: Path | None = None) -> list[Case]:
    """RG1 as portable and ICU films come: each family over a range (module docstring)."""
    folder = folder or pydicom_data_folder()
    image = _decoded(folder / "RG1_UNCR.dcm")
    right, left = reference_masks(image.pixels.shape)
    base = Case("original", image, right, left)

    def fam(case: Case, family: str) -> Case:
        return replace(case, family=family)

    cases: list[Case] = []
    for factor in (1.05, 1.10, 1.15, 1.20, 1.25):
        cases.append(fam(_warp(base, f"magnified{factor:.2f}", _magnify(factor)), "magnified"))
    for degrees in (-15, -12, -9, 9, 12, 15):
        cases.append(fam(_warp(base, f"rotated{degrees:+d}", _rotate(degrees)), "rotated"))
    for share in (0.10, 0.15, 0.20, 0.25, 0.30):
        cut = _warp(base, f"bases-cut{share:.2f}", _crop_rows(0.0, share))
        cases.append(fam(cut, "bases cropped"))
    for share in (0.05, 0.10, 0.15):
        cut = _warp(base, f"apices-cut{share:.2f}", _crop_rows(share, 0.0))
        cases.append(fam(cut, "apices cropped"))
    for share, centre in ((0.05, 50), (0.05, 30), (0.10, 50), (0.20, 40), (0.40, 60)):
        windowed = _narrow_window(folder, share, centre)
        cases.append(
            Case(f"window{share:.2f}@p{centre}", windowed, right, left, "narrow header window")
        )
    for steepness in (0.05, 0.15):
        cases.append(Case(f"voi-lut{steepness:.2f}", _voi_lut(folder, steepness), right, left,
                          "narrow header window"))  # fmt: skip
    for index, (share, side) in enumerate(
        ((0.2, "left"), (0.35, "left"), (0.5, "left"), (0.6, "right"), (0.7, "left"))
    ):
        lung = left if side == "left" else right
        region = effusion_region(lung, share)
        cases.append(
            _opacity(base, f"effusion-{side}{share:.2f}", "effusion", region, 0.85, 100 + index)
        )
    for index, side in enumerate(("right", "left")):
        lung = right if side == "right" else left
        region = _consolidation_region(lung, 200 + index)
        cases.append(
            _opacity(base, f"consolidation-{side}-base", "consolidation", region, 0.7, 200 + index)
        )
    for degrees in (0, 8):
        flipped = _warp(
            _warp(base, "tmp", _rotate(degrees)) if degrees else base,
            f"mirrored-wrong{degrees:+d}",
            lambda a, _i: a[:, ::-1],
        )
        # The film is mirrored but its header still says L\F: by anatomy the lung on the
        # image's left is now the patient's left.
        cases.append(replace(flipped, family="mirrored, orientation wrong", sides_wrong=True))
    return cases


def portable_phantom_cases(count: int, size: int = 1024, seed: int = 0) -> Iterator[Case]:
    """The portable families made from hard phantoms, `count` films in turn over them;
    the effusion and consolidation are drawn into the phantom's lung field (whose
    reference is the whole field, fluid included)."""
    kinds = ("magnified", "rotated", "bases cropped", "apices cropped", "effusion",
             "consolidation", "mirrored, orientation wrong")  # fmt: skip
    for index in range(count):
        number = seed * 1_000_003 + 700_000 + index
        phantom = make_hard_phantom(number, (size, size))
        base = _phantom_case(f"phantom-{index:03d}", phantom)
        # The phantom's own effusion fluid is outside its reference; put it back in, as the
        # lung field the portable families score against.
        kind = kinds[index % len(kinds)]
        rng = np.random.default_rng(number)
        if kind == "magnified":
            factor = float(rng.uniform(1.10, 1.25))
            case = _warp(base, f"p{index:03d}-magnified{factor:.2f}", _magnify(factor))
        elif kind == "rotated":
            degrees = float(rng.choice([-1, 1]) * rng.uniform(9, 15))
            case = _warp(base, f"p{index:03d}-rotated{degrees:+.0f}", _rotate(degrees))
        elif kind == "bases cropped":
            share = float(rng.uniform(0.15, 0.30))
            case = _warp(base, f"p{index:03d}-bases-cut{share:.2f}", _crop_rows(0.0, share))
        elif kind == "apices cropped":
            share = float(rng.uniform(0.05, 0.15))
            case = _warp(base, f"p{index:03d}-apices-cut{share:.2f}", _crop_rows(share, 0.0))
        elif kind == "effusion":
            share = float(rng.uniform(0.2, 0.7))
            side = ("right", "left")[index % 2]
            lung = base.right_lung if side == "right" else base.left_lung
            region = effusion_region(lung, share)
            case = _opacity(base, f"p{index:03d}-effusion-{side}{share:.2f}", kind, region,
                            0.85, number)  # fmt: skip
        elif kind == "consolidation":
            side = ("right", "left")[index % 2]
            lung = base.right_lung if side == "right" else base.left_lung
            region = _consolidation_region(lung, number)
            case = _opacity(base, f"p{index:03d}-consolidation-{side}", kind, region, 0.7, number)
        else:
            case = replace(
                _warp(base, f"p{index:03d}-mirrored-wrong", lambda a, _i: a[:, ::-1]),
                sides_wrong=True,
            )
        yield replace(case, family=kind)


def not_chest_cases(folder: Path | None = None) -> list[Case]:
    """Films that are not frontal chest radiographs, labelled CR CHEST PA: no lungs to find
    (empty references); the gate must flag every one."""
    from pydicom.data import get_testdata_file

    folder = folder or pydicom_data_folder()
    paths = [
        ("tibia", folder / "RG3_UNCR.dcm"),
        ("ct-slice", Path(str(get_testdata_file("CT_small.dcm")))),
        ("mr-slice", folder / "MR2_UNCR.dcm"),
        ("us-frame", folder / "US1_UNCR.dcm"),
    ]
    cases = []
    for name, path in paths:
        try:
            image = _decoded(path)
        except Exception:  # a colour or multi-frame file the decoder refuses: not a case
            continue
        empty = np.zeros(image.pixels.shape, bool)
        cases.append(Case(name, image, empty, empty, "not a frontal chest"))
        rotated = _warp(Case(name, image, empty, empty), f"{name}-rotated90",
                        lambda a, _i: np.ascontiguousarray(np.rot90(a)))  # fmt: skip
        cases.append(replace(rotated, family="not a frontal chest"))
    return cases

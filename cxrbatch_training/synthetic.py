"""Synthetic chest radiograph phantoms with known lung masks and lesions.

A phantom is drawn in display form (higher = brighter): air outside the body, soft
tissue, two lungs (patient's right on the image's left in the default orientation),
heart, spine, ribs and clavicles, diaphragm domes, texture noise, and lesions of the five
study classes inside the lungs:

- Mass: one round opacity, 3-5 % of the image width in radius;
- Nodule: one to three small round opacities, 0.8-1.5 %;
- Pneumonia: patchy consolidation in a lower zone;
- Edema: bilateral perihilar haze with peripheral septal lines;
- Fibrosis: a reticular pattern in the peripheral lower zones.

An optional label-correlated artefact outside the lungs (a marker) serves the training
study's shortcut experiment. `write_study` stores a phantom as CR or DX DICOM in
MONOCHROME1 or MONOCHROME2, 8-16 bits, in several transfer syntaxes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from cxrbatch.config import CR_IMAGE_STORAGE, DX_FOR_PRESENTATION
from cxrbatch.models.bundle import LABELS

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}
UID_ROOT = "1.2.826.0.1.3680043.10.1411."  # cxrbatch synthetic data


@dataclass(frozen=True, eq=False)
class Phantom:
    image: np.ndarray  # float32 (rows, cols) in [0, 1], display sense
    right_lung: np.ndarray  # patient's right, bool
    left_lung: np.ndarray
    labels: dict[str, int]
    flipped: bool = False  # True: patient's right is on the image's RIGHT
    artefact: bool = False
    lesion_mask: np.ndarray | None = field(default=None)
    view_position: str = "PA"
    # What a hard phantom carries (make_hard_phantom), e.g. "breast shadows", "effusion right".
    features: tuple[str, ...] = ()


def _jitter(rng: np.random.Generator) -> Callable[[float], float]:
    """A draw uniform in (-s, s) for each call j(s)."""

    def j(spread: float) -> float:
        return float(rng.uniform(-spread, spread))

    return j


def _ellipse(
    shape: tuple[int, int],
    cx: float,
    cy: float,
    ax: float,
    ay: float,
    angle: float = 0.0,
    power: float = 2.0,
) -> np.ndarray:
    rows, cols = shape
    # Every such shape lies in its box |xr| <= ax, |yr| <= ay, so within this radius of
    # the centre: only that window is computed (the same per-pixel arithmetic as over the
    # whole image; the mask is equal, at a fraction of the cost for small shapes).
    reach = float(np.hypot(ax, ay))
    top, bottom = (
        max(int(np.floor((cy - reach) * rows)) - 1, 0),
        min(int(np.ceil((cy + reach) * rows)) + 2, rows),
    )
    left, right = (
        max(int(np.floor((cx - reach) * cols)) - 1, 0),
        min(int(np.ceil((cx + reach) * cols)) + 2, cols),
    )
    mask = np.zeros(shape, bool)
    if top >= bottom or left >= right:
        return mask
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32)
    x = xx / cols - cx
    y = yy / rows - cy
    c, s = np.cos(angle), np.sin(angle)
    xr, yr = c * x + s * y, -s * x + c * y
    mask[top:bottom, left:right] = (np.abs(xr / ax) ** power + np.abs(yr / ay) ** power) <= 1.0
    return mask


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = np.asarray(cv2.GaussianBlur(noise, (0, 0), sigma), dtype=np.float32)
    return np.asarray(noise / (noise.std() + 1e-6))


def _lungs(
    shape: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """Image-left and image-right lung masks (default orientation) and the heart ellipse."""
    j = _jitter(rng)
    image_left = _ellipse(
        shape, 0.31 + j(0.015), 0.47 + j(0.02), 0.135 + j(0.01), 0.30 + j(0.02), j(0.05), 2.4
    )
    image_right = _ellipse(
        shape, 0.69 + j(0.015), 0.48 + j(0.02), 0.135 + j(0.01), 0.31 + j(0.02), j(0.05), 2.4
    )
    heart = (0.565 + j(0.01), 0.66 + j(0.02), 0.14 + j(0.01), 0.12 + j(0.01))
    heart_mask = _ellipse(shape, *heart)
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    # Diaphragm domes cut the lung bases.
    for mask, cx, top in ((image_left, 0.31, 0.70), (image_right, 0.69, 0.72)):
        dome = top + j(0.02) + 0.5 * ((xx / cols - cx) ** 2) * 4.0
        mask &= (yy / rows) < dome + 0.06
    image_right &= ~heart_mask
    # Mediastinum keeps the lungs apart.
    image_left &= (xx / cols) < 0.455
    image_right &= (xx / cols) > 0.545
    return image_left, image_right, heart


def make_phantom(
    seed: int,
    size: tuple[int, int] = (1024, 1024),
    labels: dict[str, int] | None = None,
    flipped: bool = False,
    artefact: bool = False,
) -> Phantom:
    """One phantom. `labels` maps the five labels to 0/1; None draws them at random."""
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = {label: int(rng.random() < 0.25) for label in LABELS}
    shape = size
    rows, cols = shape
    img_left, img_right, heart = _lungs(shape, rng)
    lungs = img_left | img_right
    body = _ellipse(shape, 0.5, 0.55, 0.47, 0.56)
    image = np.full(shape, 0.04, np.float32)
    image[body] = 0.62
    image += 0.04 * _smooth_noise(rng, shape, rows / 30) * body
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    # Lungs: dark, with vascular texture brighter towards the hila.
    hila = np.exp(-(((xx / cols - 0.5) / 0.18) ** 2 + ((yy / rows - 0.5) / 0.2) ** 2))
    lung_value = 0.18 + 0.10 * hila + 0.03 * _smooth_noise(rng, shape, rows / 200)
    image = np.where(lungs, lung_value, image)
    # Spine, heart.
    spine = (np.abs(xx / cols - 0.5) < 0.045) & body
    image[spine] = np.maximum(image[spine], 0.78)
    heart_mask = _ellipse(shape, *heart)
    image[heart_mask] = np.maximum(image[heart_mask], 0.66)
    # Ribs: arcs across the thorax, brighter where they overlie the lungs.
    ribs = np.zeros(shape, np.float32)
    for k in range(10):
        y0 = 0.20 + 0.058 * k
        for side in (-1, 1):
            curve = y0 + 0.9 * ((xx / cols - 0.5 - side * 0.02) ** 2) - 0.02 * side * 0
            band = np.abs(yy / rows - curve) < 0.008
            ribs[band & (np.sign(xx / cols - 0.5) == side) & body] = 0.14
    ribs = np.asarray(cv2.GaussianBlur(ribs, (0, 0), rows / 400), dtype=np.float32)
    image += ribs
    # Clavicles.
    for side in (-1, 1):
        clav = _ellipse(shape, 0.5 + side * 0.17, 0.16, 0.16, 0.012, side * -0.25)
        image[clav] = np.maximum(image[clav], 0.8)
    lesions = np.zeros(shape, np.float32)
    lung_points = np.argwhere(lungs)

    def random_lung_point(margin: float) -> tuple[float, float]:
        for _ in range(200):
            y, x = lung_points[rng.integers(len(lung_points))]
            r = int(margin * cols)
            if lungs[max(0, y - r) : y + r, max(0, x - r) : x + r].mean() > 0.95:
                return x / cols, y / rows
        y, x = lung_points[rng.integers(len(lung_points))]
        return x / cols, y / rows

    if labels.get("Mass"):
        radius = rng.uniform(0.03, 0.05)
        cx, cy = random_lung_point(radius)
        lesions += 0.38 * _ellipse(shape, cx, cy, radius, radius * cols / rows)
    if labels.get("Nodule"):
        for _ in range(int(rng.integers(1, 4))):
            radius = rng.uniform(0.008, 0.015)
            cx, cy = random_lung_point(radius)
            lesions += 0.32 * _ellipse(shape, cx, cy, radius, radius * cols / rows)
    if labels.get("Pneumonia"):
        side_mask = img_left if rng.random() < 0.5 else img_right
        lower = side_mask & (yy / rows > 0.45)
        patches = _smooth_noise(rng, shape, rows / 60) > 0.3
        lesions += 0.28 * (lower & patches)
    if labels.get("Edema"):
        haze = np.exp(
            -(((np.abs(xx / cols - 0.5) - 0.12) / 0.10) ** 2 + ((yy / rows - 0.52) / 0.14) ** 2)
        )
        lesions += 0.18 * haze * lungs
        lines = (np.abs(np.sin(yy / rows * 180.0)) > 0.97) & (np.abs(xx / cols - 0.5) > 0.27)
        lesions += 0.10 * (lines & lungs & (yy / rows > 0.55))
    if labels.get("Fibrosis"):
        reticular = np.abs(_smooth_noise(rng, shape, rows / 300)) < 0.25
        peripheral = (np.abs(xx / cols - 0.5) > 0.22) & (yy / rows > 0.4)
        lesions += 0.16 * (reticular & peripheral & lungs)
    lesions = np.asarray(cv2.GaussianBlur(lesions, (0, 0), rows / 512), dtype=np.float32)
    image += lesions * lungs
    if artefact:
        # A bright lead marker in the upper outer corner, outside the lungs.
        image[_ellipse(shape, 0.08, 0.08, 0.025, 0.025)] = 0.97
    image += 0.01 * rng.standard_normal(shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    right, left = img_left, img_right  # default: patient's right on the image's left
    if flipped:
        image, right, left = image[:, ::-1].copy(), right[:, ::-1].copy(), left[:, ::-1].copy()
    return Phantom(image, right, left, dict(labels), flipped, artefact, (lesions > 0.02) & lungs)


def _uid(seed_text: str) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[seed_text])


def to_dataset(
    phantom: Phantom,
    study_seed: str,
    *,
    modality: str = "CR",
    bits: int = 12,
    monochrome: str = "MONOCHROME2",
    view_position: str | None = "PA",
    body_part: str | None = "CHEST",
    instance: int = 1,
    patient_name: str = "PHANTOM^SYNTHETIC",
    patient_id: str = "SYN-0001",
) -> Dataset:
    """A CR or DX (for presentation) dataset carrying the phantom."""
    rows, cols = phantom.image.shape
    maximum = (1 << bits) - 1
    stored = np.round(phantom.image.astype(np.float64) * maximum)
    if monochrome == "MONOCHROME1":
        stored = maximum - stored
    dtype = np.uint8 if bits <= 8 else np.uint16
    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_FOR_PRESENTATION
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(_uid(f"{study_seed}/sop/{instance}"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(f"{study_seed}/study")
    ds.SeriesInstanceUID = _uid(f"{study_seed}/series/{modality}")
    today = dt.date(2026, 1, 1)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    # An accession number per study, as a RIS gives one (SH: at most 16 characters).
    ds.AccessionNumber = "SYN" + hashlib.sha256(ds.StudyInstanceUID.encode()).hexdigest()[:8]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.Modality = modality
    ds.Manufacturer = "cxrbatch synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SeriesDescription = "SYNTHETIC PHANTOM"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view_position is not None:
        ds.ViewPosition = view_position
    ds.PatientOrientation = ["R", "F"] if phantom.flipped else ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if modality == "CR" else ["ORIGINAL", "PRIMARY", ""]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "IDENTITY" if monochrome == "MONOCHROME2" else "INVERSE"
        ds.ImagerPixelSpacing = [0.2, 0.2]
        ds.PixelSpacing = [0.2, 0.2]
        ds.DetectorType = "DIRECT"
        ds.BurnedInAnnotation = "NO"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.Laterality = ""
        ds.AcquisitionContextSequence = []
        ds.AnatomicRegionSequence = []
        ds.ImagerPixelSpacing = [0.2, 0.2]
        ds.DetectorType = "DIRECT"
        ds.LossyImageCompression = "00"
    else:
        ds.PixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = monochrome
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = maximum / 2
    ds.WindowWidth = maximum + 1
    ds.PixelData = stored.astype(dtype).tobytes()
    # DX For Presentation with MONOCHROME1 needs INVERSE; its PLS is set above.
    if modality == "DX" and monochrome == "MONOCHROME1":
        # Display = inverse of stored: keep the phantom right-side-up for viewers.
        ds.PresentationLUTShape = "INVERSE"
    return ds


def encode(ds: Dataset, transfer_syntax: str = "explicit") -> bytes:
    """The Part 10 bytes of a dataset in one of TRANSFER_SYNTAXES (compressing if needed)."""
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    ds = ds.copy()
    if uid.is_compressed:
        ds.compress(uid, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = uid
    buffer = io.BytesIO()
    ds.save_as(
        buffer,
        implicit_vr=uid == ImplicitVRLittleEndian,
        little_endian=True,
        enforce_file_format=True,
    )
    return buffer.getvalue()


def save(ds: Dataset, path: Path, transfer_syntax: str = "explicit") -> Path:
    """Write a dataset in one of TRANSFER_SYNTAXES (compressing when needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(ds, transfer_syntax))
    return path


@dataclass(frozen=True)
class GeneratedStudy:
    study_instance_uid: str
    path: Path
    truth_path: Path | None
    labels: dict[str, int]


def write_study(
    out_dir: Path,
    index: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (1024, 1024),
    truth_dir: Path | None = None,
    transfer_syntax: str = "explicit",
    modality: str = "CR",
    bits: int = 12,
    monochrome: str = "MONOCHROME2",
    flipped: bool = False,
    labels: dict[str, int] | None = None,
    artefact: bool = False,
) -> GeneratedStudy:
    """Generate one phantom study (one frontal image) and its truth masks (npz)."""
    phantom = make_phantom(seed * 100_003 + index, size, labels, flipped, artefact)
    ds = to_dataset(
        phantom,
        f"{seed}/{index}",
        modality=modality,
        bits=bits,
        monochrome=monochrome,
        patient_name=f"PHANTOM^NUMBER{index}",
        patient_id=f"SYN-{seed:03d}-{index:05d}",
    )
    path = save(ds, out_dir / f"phantom_{index:05d}" / "image.dcm", transfer_syntax)
    truth_path = None
    if truth_dir is not None:
        truth_dir.mkdir(parents=True, exist_ok=True)
        truth_path = truth_dir / f"{ds.StudyInstanceUID}.npz"
        np.savez_compressed(
            truth_path,
            right_lung=phantom.right_lung,
            left_lung=phantom.left_lung,
            labels=np.array([phantom.labels[label] for label in LABELS]),
        )
    return GeneratedStudy(str(ds.StudyInstanceUID), path, truth_path, phantom.labels)


# Variants cycled by `write_studies` so that a batch covers the decoding paths.
VARIANTS: tuple[dict[str, Any], ...] = (
    {"modality": "CR", "bits": 12, "monochrome": "MONOCHROME2", "transfer_syntax": "explicit"},
    {"modality": "DX", "bits": 14, "monochrome": "MONOCHROME2", "transfer_syntax": "j2k"},
    {"modality": "CR", "bits": 10, "monochrome": "MONOCHROME1", "transfer_syntax": "rle"},
    {
        "modality": "CR",
        "bits": 16,
        "monochrome": "MONOCHROME2",
        "transfer_syntax": "implicit",
        "flipped": True,
    },
    {"modality": "DX", "bits": 8, "monochrome": "MONOCHROME2", "transfer_syntax": "jpegls"},
    {"modality": "CR", "bits": 12, "monochrome": "MONOCHROME1", "transfer_syntax": "deflated"},
)


def write_studies(
    out_dir: Path,
    count: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (1024, 1024),
    truth_dir: Path | None = None,
) -> list[GeneratedStudy]:
    return [
        write_study(
            out_dir, i, seed=seed, size=size, truth_dir=truth_dir, **VARIANTS[i % len(VARIANTS)]
        )
        for i in range(count)
    ]


def read_truth(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["right_lung"], data["left_lung"]


# ---------------------------------------------------------------------------------------
# Hard phantoms: what makes real films hard for lung segmentation.


def _chaikin(points: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Corner-cutting smoothing of a closed polygon (N, 2)."""
    for _ in range(iterations):
        following = np.roll(points, -1, axis=0)
        points = np.stack([0.75 * points + 0.25 * following, 0.25 * points + 0.75 * following], 1)
        points = points.reshape(-1, 2)
    return points


def _fill(shape: tuple[int, int], points_uv: np.ndarray) -> np.ndarray:
    rows, cols = shape
    pts = np.round(points_uv * np.array([cols, rows]) * 8).astype(np.int32)
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=3)
    return canvas.astype(bool)


def _lung_outline(
    rng: np.random.Generator, mid: float, side: int, dome: float, cp_drop: float
) -> np.ndarray:
    """A lung field outline (u, v) on one side of `mid` (side -1 = image left), as in the
    SCR convention: apex, costal margin down to the costophrenic angle, diaphragm dome,
    medial (mediastinal) border. The heart is cut out afterwards."""
    j = _jitter(rng)
    med = 0.045 + j(0.015)  # half-width of the mediastinum
    lat = 0.38 + j(0.04)  # costal margin, from the midline
    top = 0.11 + j(0.04)
    cp = dome + cp_drop
    offsets = [
        (med + 0.07, top),  # apex
        (med + 0.01, top + 0.05),
        (med, top + 0.15),
        (med + j(0.01), dome - 0.08),
        (med + 0.02, dome + 0.01),  # cardiophrenic angle
        (med + 0.10, dome - 0.01 + j(0.01)),  # dome
        (lat - 0.10, dome + 0.3 * cp_drop),
        (lat - 0.01, cp),  # costophrenic angle
        (lat - 0.005, cp - 0.01),
        (lat + j(0.01), dome - 0.12),
        (lat - 0.01 + j(0.01), 0.42),
        (lat - 0.05, 0.26 + j(0.02)),
        (med + 0.17, top + 0.02),
    ]
    uv = np.array([(mid + side * du, v) for du, v in offsets])
    return _chaikin(uv, 2)


def _draw_curve(canvas: np.ndarray, points_uv: np.ndarray, value: float, thickness: int) -> None:
    rows, cols = canvas.shape
    pts = np.round(points_uv * np.array([cols, rows])).astype(np.int32)
    cv2.polylines(canvas, [pts], False, value, max(1, thickness), lineType=cv2.LINE_AA)


def make_hard_phantom(
    seed: int, size: tuple[int, int] = (1024, 1024), white_out: str | None = None
) -> Phantom:
    """A phantom made hard on purpose for lung segmentation, with the lung field as ground
    truth in the JSRT/SCR convention (heart and mediastinum excluded, costophrenic angles
    and apices included; an effusion's fluid is not aerated lung and is excluded).

    Each draws at random: PA or AP (a larger heart, scapulae over the lungs); heart size and
    position; hemidiaphragms at different heights; sharp or blunted costophrenic angles
    (effusion); hila and vessels; posterior ribs, clavicles and scapulae over the lung
    fields; breast shadows over the lower zones; a gastric air bubble under the left dome
    (a dark field that is not lung); masses and consolidation inside the lungs; devices
    (ECG electrodes and leads, a central line, an endotracheal tube, a pacemaker and its
    lead); a side marker; collimation borders; patient rotation; under- or over-exposure;
    noise; and the patient's right on either side of the image. `features` lists them.

    `white_out` ("right" or "left", the patient's side) fills that whole hemithorax with
    fluid (a massive effusion, or the opaque hemithorax after a pneumonectomy): no lung
    field is left there to find, and its ground truth is empty.
    """
    if white_out not in (None, "right", "left"):
        raise ValueError(f"white_out must be 'right', 'left' or None, not {white_out!r}")
    rng = np.random.default_rng(seed)
    rows, cols = size
    shape = size
    j = _jitter(rng)
    features: list[str] = []
    view = "AP" if rng.random() < 0.35 else "PA"
    features.append(view)
    mid = 0.5 + j(0.03)
    right_dome = 0.64 + j(0.05)  # the patient's right (image left) usually sits higher
    left_dome = right_dome + 0.02 + j(0.05)
    if abs(left_dome - right_dome) > 0.04:
        features.append("hemidiaphragms at different heights")
    outlines = {
        "image_left": _lung_outline(rng, mid, -1, right_dome, 0.07 + j(0.03)),
        "image_right": _lung_outline(rng, mid, 1, left_dome, 0.07 + j(0.03)),
    }
    lungs = {k: _fill(shape, v) for k, v in outlines.items()}
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    u, v = xx / cols, yy / rows
    # Heart: cardiothoracic ratio 0.40-0.60 (AP magnifies it), mostly to the patient's left.
    ctr = float(rng.uniform(0.40, 0.56)) + (0.05 if view == "AP" else 0.0)
    if ctr > 0.55:
        features.append("cardiomegaly")
    heart_w = ctr * 0.76
    heart_cx = mid + heart_w / 6 + j(0.02)  # a third of it right of the midline
    heart = _ellipse(shape, heart_cx, left_dome - 0.03, heart_w / 2, 0.11 + j(0.02), j(0.15)) & (
        v < max(right_dome, left_dome) + 0.05
    )
    for key in lungs:
        lungs[key] &= ~heart
    # Effusion: fluid with a meniscus fills one (or both) costophrenic angle(s).
    fluid = np.zeros(shape, bool)
    for key, dome, name in (
        ("image_left", right_dome, "right"),
        ("image_right", left_dome, "left"),
    ):
        if rng.random() < 0.25:
            level = dome + float(rng.uniform(-0.06, 0.03))
            lateral = np.abs(u - mid)
            meniscus = level - 0.25 * (lateral - 0.25).clip(0, None)
            fluid |= lungs[key] & (v > meniscus)
            features.append(f"effusion {name}")
        if white_out == name:
            fluid |= lungs[key]
            features.append(f"{name} hemithorax whited out")
    for key in lungs:
        lungs[key] &= ~fluid
    either = lungs["image_left"] | lungs["image_right"]

    # Body, soft tissue, abdomen.
    body = _ellipse(shape, mid, 0.56, 0.47 + j(0.02), 0.60, 0.0, 2.6)
    body |= _ellipse(shape, mid, 0.22, 0.52, 0.15)  # shoulders
    tissue = 0.55 + j(0.05)
    image = np.where(body, tissue, 0.05 + j(0.03)).astype(np.float32)
    image += 0.04 * _smooth_noise(rng, shape, rows / 25) * body
    # Below the domes: liver and abdomen, clearly denser than lung (as on films), and the
    # heart a little denser than the chest wall.
    dome_line = np.where(u < mid, right_dome, left_dome) + 0.02
    below = cv2.GaussianBlur(((v > dome_line) & body).astype(np.float32), (0, 0), rows / 200)
    image += float(rng.uniform(0.12, 0.2)) * np.asarray(below)
    image[heart] += float(rng.uniform(0.1, 0.18))
    # Lungs: a base density that rises towards the bases (soft tissue in front of them).
    lung_base = float(rng.uniform(0.18, 0.40))
    gradient = float(rng.uniform(0.04, 0.16)) * np.clip((v - 0.3) / 0.4, 0, 1)
    hila_map = np.zeros(shape, np.float32)
    for side in (-1, 1):
        hila_map += np.exp(-(((u - mid - side * 0.11) / 0.05) ** 2 + ((v - 0.44) / 0.07) ** 2))
    lung_value = lung_base + gradient + 0.16 * hila_map
    lung_value += 0.03 * _smooth_noise(rng, shape, rows / 150)
    image = np.where(either, lung_value, image)
    # Vessels: branching from the hila, thinner and fainter outwards.
    vessels = np.zeros(shape, np.float32)
    for side in (-1, 1):
        for _ in range(int(rng.integers(8, 14))):
            angle = float(rng.uniform(-2.6, 0.6)) if side > 0 else float(rng.uniform(2.5, 5.7))
            x0, y0 = mid + side * 0.10, 0.44 + j(0.03)
            pts = [(x0, y0)]
            for step in range(6):
                angle += j(0.3)
                length = 0.035 * (1.0 - step * 0.08)
                x0, y0 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
                pts.append((x0, y0))
            _draw_curve(vessels, np.array(pts), 0.10, max(1, round(cols / 300)))
    vessels = np.asarray(cv2.GaussianBlur(vessels, (0, 0), cols / 700), np.float32)
    image += vessels * either
    # Lesions inside the lungs: masses (as RG1's) and consolidation.
    points = np.argwhere(either)
    if rng.random() < 0.5:
        count = int(rng.integers(1, 6))
        for _ in range(count):
            y, x = points[rng.integers(len(points))]
            r = float(rng.uniform(0.02, 0.05))
            blob = _ellipse(shape, x / cols, y / rows, r, r * cols / rows)
            image[blob & either] += float(rng.uniform(0.15, 0.35))
        features.append(f"{count} mass(es)")
    if rng.random() < 0.25:
        key = "image_left" if rng.random() < 0.5 else "image_right"
        patches = _smooth_noise(rng, shape, rows / 40) > 0.0
        weight = np.clip((v - 0.45 - 0.05 * _smooth_noise(rng, shape, rows / 20)) / 0.1, 0, 1)
        image += float(rng.uniform(0.1, 0.22)) * weight * (lungs[key] & patches)
        features.append("lower-zone consolidation")
    image[fluid] = tissue + 0.06
    # Bones: spine, posterior ribs with a bright cortex, clavicles, scapulae.
    spine = (np.abs(u - mid) < 0.04) & body
    image[spine] = np.maximum(image[spine], 0.74 + j(0.04))
    ribs = np.zeros(shape, np.float32)
    rib_value = float(rng.uniform(0.08, 0.18))
    for rib in range(10):
        y0 = 0.15 + 0.062 * rib + j(0.005)
        for side in (-1, 1):
            t = np.linspace(0.03, 0.42, 40)
            arc = np.stack([mid + side * t, y0 - 0.05 + 0.55 * (t - 0.12) ** 2 + 0.02 * rib * t], 1)
            _draw_curve(ribs, arc, rib_value, max(2, round(rows * 0.018)))
            _draw_curve(ribs, arc, rib_value * 0.6, max(1, round(rows * 0.004)))
    ribs = np.asarray(cv2.GaussianBlur(ribs, (0, 0), rows / 500), np.float32)
    image += ribs * body
    clavicle_v = 0.15 + (-0.03 if view == "AP" else 0.0) + j(0.02)
    for side in (-1, 1):
        clav = _ellipse(shape, mid + side * 0.17, clavicle_v, 0.17, 0.013, side * -0.2 + j(0.1))
        image[clav] = np.maximum(image[clav], image[clav] + 0.2)
    if view == "AP" or rng.random() < 0.3:
        for side in (-1, 1):
            scap = _ellipse(shape, mid + side * 0.36, 0.32, 0.07, 0.13, side * 0.3, 2.0)
            image[scap & body] += 0.1
        features.append("scapulae over the lungs")
    # Breast shadows over the lower zones.
    if rng.random() < 0.45:
        density = float(rng.uniform(0.08, 0.25))
        for side, dome in ((-1, right_dome), (1, left_dome)):
            breast = _ellipse(shape, mid + side * 0.27, dome + 0.02, 0.2, 0.16, 0.0, 2.2)
            soft = cv2.GaussianBlur(breast.astype(np.float32), (0, 0), cols / 80)
            image += density * np.asarray(soft) * body
        features.append("breast shadows")
    # Gastric bubble under the patient's left dome: dark, not lung.
    if rng.random() < 0.5:
        bubble = _ellipse(shape, mid + 0.17 + j(0.04), left_dome + 0.07, 0.06, 0.04)
        bubble &= ~either
        image[bubble] = lung_base + 0.02
        features.append("gastric bubble")
    # Devices.
    hardware = np.zeros(shape, np.float32)
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(3, 6))):
            cx, cy = mid + j(0.35), float(rng.uniform(0.15, 0.75))
            cv2.circle(hardware, (round(cx * cols), round(cy * rows)), round(0.012 * cols), 0.6, -1)
            lead = np.array([(cx, cy), (cx + j(0.2), cy + 0.15), (cx + j(0.3), 1.0)])
            _draw_curve(hardware, _chaikin(lead, 0)[:3], 0.5, max(1, round(cols / 350)))
        features.append("ECG electrodes and leads")
    if rng.random() < 0.3:
        line = np.array(
            [(mid + 0.3, 0.12), (mid + 0.12, 0.17), (mid + 0.04, 0.25), (mid + 0.03, 0.4)]
        )
        _draw_curve(hardware, line, 0.5, max(1, round(cols / 300)))
        features.append("central line")
    if rng.random() < 0.2:
        _draw_curve(hardware, np.array([(mid, 0.0), (mid + 0.005, 0.27)]), 0.35, round(cols / 80))
        features.append("endotracheal tube")
    if rng.random() < 0.2:
        px, py = mid + 0.25 + j(0.04), 0.2 + j(0.03)
        x0, y0 = round((px - 0.04) * cols), round((py - 0.03) * rows)
        x1, y1 = x0 + round(0.08 * cols), y0 + round(0.06 * rows)
        cv2.rectangle(hardware, (x0, y0), (x1, y1), 0.9, -1)
        lead = np.array([(px, py), (mid + 0.1, 0.3), (heart_cx, left_dome - 0.05)])
        _draw_curve(hardware, lead, 0.7, max(1, round(cols / 250)))
        features.append("pacemaker")
    image = np.maximum(image, hardware) if hardware.any() else image
    # Patient rotation (the whole film, truth along).
    right_key, left_key = "image_left", "image_right"
    truth = {k: lungs[k] for k in (right_key, left_key)}
    if rng.random() < 0.5:
        degrees = float(rng.uniform(-10, 10))
        matrix = cv2.getRotationMatrix2D((cols / 2, rows / 2), degrees, 1.0)
        image = np.asarray(
            cv2.warpAffine(
                image, matrix, (cols, rows), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            ),
            np.float32,
        )
        for k in truth:
            warped = cv2.warpAffine(
                truth[k].astype(np.uint8), matrix, (cols, rows), flags=cv2.INTER_NEAREST
            )
            truth[k] = warped.astype(bool)
        features.append(f"rotated {degrees:+.0f} deg")
    # Side marker, collimation (unexposed = bright), exposure, noise.
    flipped = bool(rng.random() < 0.3)
    if rng.random() < 0.5:
        edges = rng.uniform(0.0, 0.08, 4)
        t, b = round(edges[0] * rows), round(edges[1] * rows)
        lft, rgt = round(edges[2] * cols), round(edges[3] * cols)
        image[:t] = 0.97
        image[rows - b :] = 0.97
        image[:, :lft] = 0.97
        image[:, cols - rgt :] = 0.97
        for k in truth:
            truth[k][:t] = truth[k][rows - b :] = False
            truth[k][:, :lft] = truth[k][:, cols - rgt :] = False
        features.append("collimation borders")
    image = np.clip(image, 0.0, 1.0)
    gamma = float(np.exp(rng.uniform(np.log(0.55), np.log(1.8))))
    if abs(np.log(gamma)) > 0.3:
        features.append("under-exposed" if gamma > 1 else "over-exposed")
    image = np.asarray(image**gamma, np.float32)
    sigma = float(rng.uniform(0.005, 0.04))
    image = image + sigma * rng.standard_normal(shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    right, left = truth[right_key], truth[left_key]
    if flipped:
        image, right, left = image[:, ::-1].copy(), right[:, ::-1].copy(), left[:, ::-1].copy()
        features.append("patient's right on the image's right")
    # A side marker reads the right way round: drawn after any flip, on the side it names.
    marker_x = 0.06 if rng.random() < 0.5 else 0.88
    letter = "R" if (marker_x < 0.5) != flipped else "L"
    scale = cols / 400
    marker = np.zeros(shape, np.uint8)  # OpenCV draws text on 8-bit images only
    cv2.putText(
        marker,
        letter,
        (round(marker_x * cols), round(0.1 * rows)),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        255,
        max(1, round(scale * 2)),
    )
    image = np.where(marker > 0, 0.95, image).astype(np.float32)
    features.append("side marker")
    labels = dict.fromkeys(LABELS, 0)
    return Phantom(image, right, left, labels, flipped, False, None, view, tuple(features))

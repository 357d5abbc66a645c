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
import io
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
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    x = xx / cols - cx
    y = yy / rows - cy
    c, s = np.cos(angle), np.sin(angle)
    xr, yr = c * x + s * y, -s * x + c * y
    return (np.abs(xr / ax) ** power + np.abs(yr / ay) ** power) <= 1.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = np.asarray(cv2.GaussianBlur(noise, (0, 0), sigma), dtype=np.float32)
    return noise / (noise.std() + 1e-6)


def _lungs(
    shape: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """Image-left and image-right lung masks (default orientation) and the heart ellipse."""
    j = lambda s: float(rng.uniform(-s, s))  # noqa: E731
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
    ds.AccessionNumber = ""
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

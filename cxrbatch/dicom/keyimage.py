"""Key image for viewers without SEG support: a Secondary Capture (highdicom) of the
radiograph with the lung contours and the scores burned in, marked NOT FOR DIAGNOSTIC USE.

The radiograph (display form, at most KEY_IMAGE_SIZE px on its long side) keeps its
orientation; a text band above it carries the disclaimer, the synthetic-training warning
where it applies, the triage and the scores. BurnedInAnnotation is YES. The models (name,
version, weights SHA-256) are in DerivationDescription and the Contributing Equipment.
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

import cxrbatch
from cxrbatch.dicom.seg import MANUFACTURER, NOT_FOR_DIAGNOSIS, processing_equipment
from cxrbatch.domain import Findings, ImageResult, ModelRef

KEY_IMAGE_SIZE = 1024
SERIES_NUMBER = 9903
# BGR is not used: the array is RGB as DICOM stores it.
RIGHT_COLOUR = (255, 160, 0)  # orange
LEFT_COLOUR = (0, 200, 255)  # light blue
TEXT_COLOUR = (255, 255, 255)
WARNING_COLOUR = (255, 80, 80)


def _scores_line(role: str, findings: Findings) -> str:
    scores = "  ".join(f"{label} {p:.2f}" for label, p in findings.probabilities.items())
    return f"{role}: {scores}  | No Finding {findings.no_finding_score:.2f}"


def text_lines(
    item: ImageResult, models: tuple[ModelRef, ...]
) -> list[tuple[str, tuple[int, int, int]]]:
    """The lines burned into the band, with their colours."""
    lines: list[tuple[str, tuple[int, int, int]]] = [
        (f"cxrbatch algorithm output - {NOT_FOR_DIAGNOSIS}", WARNING_COLOUR)
    ]
    if any(m.synthetic_training_data for m in models):
        warning = "MODEL TRAINED ON SYNTHETIC DATA - scores are not clinically meaningful"
        lines.append((warning, WARNING_COLOUR))
    screening = item.screening
    if screening is not None and screening.triage is not None:
        lines.append(
            (
                f"Screening triage: {screening.triage.value.upper()} (No Finding "
                f"{screening.no_finding_score:.2f}, threshold {screening.threshold:.2f})",
                TEXT_COLOUR,
            )
        )
    qc = item.segmentation.qc
    if qc is not None and not qc.passed:
        lines.append(
            ("NEEDS REVIEW: segmentation failed QC (masked models not run):", WARNING_COLOUR)
        )
        lines.extend(("  " + failure, WARNING_COLOUR) for failure in qc.failures)
    if item.findings is not None:
        lines.append((_scores_line("Findings", item.findings), TEXT_COLOUR))
    if item.findings is None and screening is None and item.qc_reason is None:
        lines.append(("Segmentation only: no classifier configured", TEXT_COLOUR))
    lines.append(("Contours: patient's right lung (orange), left lung (blue)", TEXT_COLOUR))
    return lines


def contour_picture(
    pixels: np.ndarray, right_lung: np.ndarray, left_lung: np.ndarray, max_size: int
) -> np.ndarray:
    """The radiograph (uint8 grey) at most `max_size` pixels on its long side, RGB, with
    the patient's right lung contoured in orange and the left in blue, each lettered (the
    key image and the web app's overlays)."""
    rows, cols = pixels.shape
    scale = min(1.0, max_size / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    grey = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA) if scale < 1 else pixels
    picture = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    thickness = max(2, size[0] // 400)
    for mask, colour, letter in (
        (right_lung, RIGHT_COLOUR, "R"),
        (left_lung, LEFT_COLOUR, "L"),
    ):
        small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, colour, thickness, lineType=cv2.LINE_AA)
        ys, xs = np.nonzero(small)
        if len(xs):
            cv2.putText(
                picture,
                letter,
                (int(xs.mean()), int(ys.mean())),
                cv2.FONT_HERSHEY_SIMPLEX,
                size[0] / 700,
                colour,
                thickness,
                cv2.LINE_AA,
            )
    return picture


def render(item: ImageResult, models: tuple[ModelRef, ...]) -> np.ndarray:
    """The key image's RGB pixels (rows, columns, 3) uint8."""
    segmentation = item.segmentation
    picture = contour_picture(
        item.image.pixels, segmentation.right_lung, segmentation.left_lung, KEY_IMAGE_SIZE
    )
    size = (picture.shape[1], picture.shape[0])
    lines = text_lines(item, models)
    font_scale = max(0.35, size[0] / 2000)
    line_height = int(32 * font_scale) + 8
    band = np.zeros((line_height * len(lines) + 8, size[0], 3), dtype=np.uint8)
    for index, (text, colour) in enumerate(lines):
        cv2.putText(
            band,
            text,
            (6, line_height * (index + 1)),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            colour,
            1,
            cv2.LINE_AA,
        )
    return np.concatenate([band, picture], axis=0)


def build_key_image(
    source: Dataset,
    item: ImageResult,
    models: tuple[ModelRef, ...],
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
) -> Dataset:
    """A Secondary Capture Image in the source's study (patient and study copied)."""
    described = "; ".join(
        f"{m.name} {m.version} sha256={m.sha256}"
        + (" [SYNTHETIC TRAINING DATA]" if m.synthetic_training_data else "")
        for m in models
    )
    orientation = source.get("PatientOrientation")
    known = bool(orientation) and len(orientation) == 2
    # highdicom wants an orientation for a PATIENT image; without the source's, the one
    # the sides were drawn by (the display convention) is given and then emptied again.
    drawn = ("L", "F") if item.image.image_left_is_patient_right else ("R", "F")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=render(item, models),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=tuple(orientation) if known else drawn,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[processing_equipment("cxrbatch key image")],
        manufacturer_model_name="cxrbatch key image",
        software_versions=f"cxrbatch {cxrbatch.__version__}",
    )
    if not known:
        sc.PatientOrientation = []  # General Image Type 2C: unknown, as in the source
    sc.ImageType = ["DERIVED", "SECONDARY"]
    # What was processed is a chest: an unpaired body part, so no (Type 2C) Laterality.
    sc.BodyPartExamined = "CHEST"
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.SeriesDescription = f"cxrbatch key images - ALGORITHM - {NOT_FOR_DIAGNOSIS}"[:64]
    sc.DerivationDescription = f"Lung contours and scores by {described}"[:1024]
    sc.ImageComments = (
        f"Algorithm output for research and triage support. {NOT_FOR_DIAGNOSIS}. {described}"
    )[:10240]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue = codes.DCM.SourceImageForImageProcessingOperation.value
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = codes.DCM.SourceImageForImageProcessingOperation.meaning
    reference.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [reference]
    return sc

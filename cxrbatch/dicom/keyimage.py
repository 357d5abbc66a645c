"""Key image, what every viewer shows: a Secondary Capture (highdicom) of the radiograph
with the lung contours, the finding maps and the scores burned in, marked NOT FOR
DIAGNOSTIC USE.

The radiograph (display form, at most KEY_IMAGE_SIZE px on its long side) keeps its
orientation; a text band above it carries a headline legible on a PACS thumbnail (the
triage or the flagged labels, and AI OUTPUT - NOT FOR DIAGNOSIS), then the disclaimer, the
synthetic-training warning where it applies, the triage and the findings against their
thresholds (cxrbatch/dicom/captions.py). BurnedInAnnotation is YES. The models (name,
version, weights SHA-256) are in DerivationDescription and the Contributing Equipment.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

import cxrbatch
from cxrbatch.dicom.captions import Caption, caption
from cxrbatch.dicom.contours import LEFT_COLOUR, REGION_COLOUR, RIGHT_COLOUR, as_u8
from cxrbatch.dicom.seg import MANUFACTURER, NOT_FOR_DIAGNOSIS, processing_equipment
from cxrbatch.domain import FindingMap, ImageResult, ModelRef

KEY_IMAGE_SIZE = 1024
SERIES_NUMBER = 9903
TEXT_COLOUR = (255, 255, 255)
WARNING_COLOUR = (255, 80, 80)
CALM_COLOUR = (120, 230, 120)
FONT = cv2.FONT_HERSHEY_SIMPLEX
# The headline's letters are this fraction of the picture's width high: about 8 pixels on
# a 128-pixel PACS thumbnail (bench/viewer_objects.py looks at one).
HEADLINE_HEIGHT = 0.065
MAP_FLOOR = 0.2  # activation below this fraction of a map's peak is not tinted


def _fit_scale(text: str, width: int, height: int, thickness: int) -> float:
    """The font scale at which `text` is `height` pixels high, or narrower than `width`."""
    (w, h), _ = cv2.getTextSize(text, FONT, 1.0, thickness)
    return min(height / max(h, 1), (width - 12) / max(w, 1))


def detail_scale(width: int) -> float:
    """The font scale of the band's detail lines on a picture `width` pixels wide."""
    return max(0.35, width / 2000)


def wrapped(text: str, width: int, scale: float) -> list[str]:
    """`text` in lines that each fit `width` pixels at `scale` (the band's margins kept),
    broken between words, continuation lines indented under the first. A long QC reason
    would otherwise run off the picture's edge, and with it what the reason means.
    textwrap breaks by characters, the font's letters are not all as wide: the line
    length starts from the text's mean letter width and shrinks until every line fits."""
    room = width - 12

    def pixels(line: str) -> int:
        return int(cv2.getTextSize(line, FONT, scale, 1)[0][0])

    whole = pixels(text)
    if whole <= room:
        return [text]
    indent = " " * (len(text) - len(text.lstrip()) + 4)
    chars = max(10, len(text) * room // whole)
    while True:
        lines = textwrap.wrap(text, chars, subsequent_indent=indent, break_on_hyphens=False)
        if chars <= 10 or all(pixels(line) <= room for line in lines):
            return lines
        chars -= max(1, chars // 20)


def _tint(picture: np.ndarray, maps: Sequence[FindingMap], scale: float) -> None:
    """Blend the finding maps (their maximum) over `picture` in a jet colour map, and
    outline and name each map's region."""
    shape = picture.shape[:2]
    activation = np.zeros(shape, dtype=np.float32)
    for finding in maps:
        activation = np.maximum(activation, finding.on_image(shape, scale))
    coloured = cv2.applyColorMap(np.round(activation * 255).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = np.where(activation >= MAP_FLOOR, 0.25 + 0.35 * activation, 0.0)[..., None]
    blended = picture.astype(np.float32) * (1 - alpha) + coloured * alpha
    picture[...] = np.round(blended).astype(np.uint8)
    thickness = max(1, shape[1] // 500)
    for finding in maps:
        region = finding.region(shape, scale).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            continue
        cv2.drawContours(picture, contours, -1, REGION_COLOUR, thickness, lineType=cv2.LINE_AA)
        x, y, _, _ = cv2.boundingRect(max(contours, key=cv2.contourArea))
        cv2.putText(
            picture, f"{finding.label} {finding.probability:.2f}", (x, max(y - 4, 12)),
            FONT, shape[1] / 1600, REGION_COLOUR, thickness, cv2.LINE_AA,
        )  # fmt: skip


def contour_picture(
    pixels: np.ndarray,
    right_lung: np.ndarray,
    left_lung: np.ndarray,
    max_size: int,
    maps: Sequence[FindingMap] = (),
) -> np.ndarray:
    """The radiograph (uint8 grey) at most `max_size` pixels on its long side, RGB, with
    the patient's right lung contoured in orange and the left in blue, each lettered, and
    the finding maps tinted over it (the key image and the web app's overlays)."""
    rows, cols = pixels.shape
    scale = min(1.0, max_size / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    grey = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA) if scale < 1 else pixels
    picture = cv2.cvtColor(np.ascontiguousarray(grey), cv2.COLOR_GRAY2RGB)
    if maps:
        _tint(picture, maps, scale)
    draw_lungs(picture, right_lung, left_lung)
    return picture


def draw_lungs(picture: np.ndarray, right_lung: np.ndarray, left_lung: np.ndarray) -> None:
    """Contour the patient's right lung in orange and the left in blue, each lettered, on
    `picture` (RGB, or RGBA drawn opaque), the masks resized to it: the key image, the web
    app's overlays and its viewer's lung layer draw the same."""
    rows, cols = picture.shape[:2]
    size = (cols, rows)
    thickness = max(2, cols // 400)
    alpha = (255,) if picture.shape[2] == 4 else ()
    for mask, colour, letter in (
        (right_lung, RIGHT_COLOUR, "R"),
        (left_lung, LEFT_COLOUR, "L"),
    ):
        paint = (*colour, *alpha)
        small = cv2.resize(as_u8(mask), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, paint, thickness, lineType=cv2.LINE_AA)
        moments = cv2.moments(small, binaryImage=True)  # the centroid, as pixel means
        if moments["m00"]:
            centre = (int(moments["m10"] / moments["m00"]), int(moments["m01"] / moments["m00"]))
            cv2.putText(picture, letter, centre, FONT, cols / 700, paint, thickness, cv2.LINE_AA)


def _band(width: int, caption: Caption, legend: list[str]) -> np.ndarray:
    """The text above the picture: the headline and the warning in letters a thumbnail
    keeps legible, then the details."""
    big = max(12, round(width * HEADLINE_HEIGHT))
    heavy = max(2, big // 12)
    warning = "AI OUTPUT - NOT FOR DIAGNOSIS"
    headline_colour = WARNING_COLOUR if caption.headline_warning else CALM_COLOUR
    big_lines = [(caption.headline, headline_colour, big), (warning, WARNING_COLOUR, big * 2 // 3)]
    small_scale = detail_scale(width)
    small_height = int(32 * small_scale) + 8
    details = [
        (part, WARNING_COLOUR if line.warning else TEXT_COLOUR)
        for line in caption.lines
        for part in wrapped(line.text, width, small_scale)
    ]
    details += [
        (part, TEXT_COLOUR) for text in legend for part in wrapped(text, width, small_scale)
    ]
    top = sum(round(h * 1.5) for _, _, h in big_lines)
    band = np.zeros((top + small_height * len(details) + 8, width, 3), dtype=np.uint8)
    y = 0
    for text, colour, height in big_lines:
        y += round(height * 1.5)
        scale = _fit_scale(text, width, height, heavy)
        cv2.putText(band, text, (6, y - height // 4), FONT, scale, colour, heavy, cv2.LINE_AA)
    for index, (text, colour) in enumerate(details):
        cv2.putText(
            band, text, (6, top + small_height * (index + 1)), FONT, small_scale, colour, 1,
            cv2.LINE_AA,
        )  # fmt: skip
    return band


def render(item: ImageResult, models: tuple[ModelRef, ...]) -> np.ndarray:
    """The key image's RGB pixels (rows, columns, 3) uint8."""
    segmentation = item.segmentation
    picture = contour_picture(
        item.image.pixels,
        segmentation.right_lung,
        segmentation.left_lung,
        KEY_IMAGE_SIZE,
        item.finding_maps,
    )
    legend = ["Contours: patient's right lung (orange), left lung (blue)"]
    if item.finding_maps:
        model = item.finding_maps[0].model
        synthetic = " - SYNTHETIC MODEL" if model.synthetic_training_data else ""
        legend.append(
            "Colour: where the classifier found each flagged label (Grad-CAM), yellow "
            f"outline at half its peak{synthetic}"
        )
    return np.concatenate([_band(picture.shape[1], caption(item, models), legend), picture])


def build_key_image(
    source: Dataset,
    item: ImageResult,
    models: tuple[ModelRef, ...],
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
) -> Dataset:
    """A Secondary Capture Image in the source's study (patient and study copied).

    Parameters
    ----------
    source: the radiograph's header; item: its result (image, masks, findings, maps).
    models: the models that ran, named with version, hash and any synthetic training data
        on the image and in its header.
    series_instance_uid, sop_instance_uid, instance_number: the new object's identity.

    Raises
    ------
    ValueError: values highdicom refuses in the source (e.g. a patient orientation that is
        not two values).
    """
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

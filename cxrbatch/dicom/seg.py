"""DICOM Segmentation of the right and left lung, built with highdicom.

Encoding (`output.seg_encoding`): BINARY packs 8 pixels a byte across the whole frame; a
frame whose width is not a multiple of 8 then starts mid-byte, which some DICOMweb servers
cannot cut out of the object (Orthanc 1.10: "Bad number of columns for a black-and-white
image", so OHIF loading from it gets no frame). "auto" writes BINARY where Columns is a
multiple of 8 and otherwise FRACTIONAL (OCCUPANCY, Maximum Fractional Value 1: the same
0/1 masks a byte a pixel), which every reader tested reads as the same label map
(docs/conformance.md).
"""

from __future__ import annotations

from typing import Literal

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import cxrbatch
from cxrbatch.dicom import codes
from cxrbatch.dicom.contours import LEFT_COLOUR, RIGHT_COLOUR
from cxrbatch.dicom.iod_lookup import memoize_iod_lookups
from cxrbatch.domain import LungSegmentation, ModelRef

SegEncoding = Literal["auto", "binary", "fractional"]

# Every writer of an output imports this module: highdicom's IOD lookups are cached from
# here on (iod_lookup.py: a pure function of its tables, about 4 % of a study's host side).
memoize_iod_lookups()

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
MANUFACTURER = "cxrbatch"


def processing_equipment(
    model_name: str,
    software_versions: str | list[str] | None = None,
    description: str = f"Algorithm output. {NOT_FOR_DIAGNOSIS}",
) -> hd.ContributingEquipment:
    """A Contributing Equipment item naming cxrbatch (or one of its models) as the
    processing equipment of an output."""
    from pydicom.sr.codedict import codes as sr_codes

    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=sr_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_name[:64],
        software_versions=software_versions or f"cxrbatch {cxrbatch.__version__}",
        contribution_description=description[:64],
    )


def algorithm_identification(model: ModelRef, strategy: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=f"{model.name} {strategy}"[:64],
        family=codes.ALGORITHM_FAMILY,
        version=model.version[:64],
        source=MANUFACTURER,
        parameters={"weights_sha256": model.sha256},
    )


SPACING_ATTRIBUTES = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")


def spacing_and_source(ds: Dataset) -> tuple[tuple[float, float], str] | None:
    """The first of SPACING_ATTRIBUTES whose two values are positive numbers, and its
    keyword; None when none is."""
    for keyword in SPACING_ATTRIBUTES:
        value = ds.get(keyword)
        try:
            spacing = (float(value[0]), float(value[1])) if value is not None else None
        except (TypeError, ValueError, IndexError):
            spacing = None
        if spacing and spacing[0] > 0 and spacing[1] > 0 and all(np.isfinite(spacing)):
            return spacing, keyword
    return None


def valid_pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """PixelSpacing (or ImagerPixelSpacing, NominalScannedPixelSpacing) when both values
    are positive numbers."""
    found = spacing_and_source(ds)
    return None if found is None else found[0]


# The plane the SEG declares for a projection radiograph (its own Frame of Reference):
# the cosines viewers assume for an image without an Image Plane module, as the CR/DX
# source is (cornerstone, and so OHIF, give such an image 1\0\0 and 0\1\0), so that
# the SEG lies in its source's plane in their model. It says nothing about the patient:
# the film's anatomical directions are its PatientOrientation, copied to the SEG.
# docs/conformance.md has why not the cosines PatientOrientation would give.
PROJECTION_PLANE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
NOMINAL_SLICE_THICKNESS = 1.0


def planar_header(source: Dataset) -> tuple[Dataset, str]:
    """A copy of `source` that gives highdicom the plane to put in the SEG (Frame of
    Reference, Pixel Measures, Plane Orientation and Position): the source's own where it
    has a Frame of Reference; else a new Frame of Reference for the film with
    PROJECTION_PLANE, the first pixel at (0, 0, 0), and the source's pixel spacing (or 1 mm
    when it gives none). Also, in words, where the spacing came from."""
    header = Dataset(dict(source.items()))
    for keyword in SPACING_ATTRIBUTES:
        if keyword in header:
            del header[keyword]  # replaced below; a corrupt value must not stop the SEG
    found = spacing_and_source(source)
    if "FrameOfReferenceUID" in source and "ImageOrientationPatient" in source:
        if found is not None:
            header.PixelSpacing = list(found[0])
        return header, (
            f"the source's Frame of Reference; Pixel Measures from its {found[1]}"
            if found
            else "the source's Frame of Reference; it gives no valid pixel spacing"
        )
    header.FrameOfReferenceUID = hd.UID()
    header.PositionReferenceIndicator = ""
    header.ImageOrientationPatient = list(PROJECTION_PLANE)
    header.ImagePositionPatient = [0.0, 0.0, 0.0]
    # A projection has no slice; dciodvfy (the macro's Type 1C in a SEG with a Frame of
    # Reference) and highdicom's reader ask for one: a nominal 1 mm, said in ImageComments.
    header.SliceThickness = NOMINAL_SLICE_THICKNESS
    if found is not None:
        header.PixelSpacing = list(found[0])
        why = f"Pixel Measures from the source's {found[1]}"
        if found[1] == "ImagerPixelSpacing":
            why += " (at the detector: not corrected for geometric magnification)"
    else:
        header.PixelSpacing = [1.0, 1.0]
        why = "Pixel Measures 1\\1 mm: the source gives no valid pixel spacing (pixel units)"
    why += f"; slice thickness {NOMINAL_SLICE_THICKNESS:g} mm nominal (a projection has none)"
    return header, f"a Frame of Reference of its own for the film; {why}"


def build_seg(
    source: Dataset,
    segmentation: LungSegmentation,
    model: ModelRef,
    series_instance_uid: str,
    sop_instance_uid: str,
    encoding: SegEncoding = "auto",
) -> Dataset:
    """A SEG with segment 1 = right lung and segment 2 = left lung (patient sides), BINARY
    or FRACTIONAL as `encoding` says (module docstring).

    Parameters
    ----------
    source: the radiograph's header (a reference header: one value where the IOD has one).
    segmentation: the patient's right and left lung masks at the source's full resolution,
        with their QC verdict (a failed one titles the series NEEDS REVIEW).
    model: the segmenter, named with version and weight hash in the algorithm
        identification of both segments.
    series_instance_uid, sop_instance_uid: the new object's UIDs.
    encoding: "binary", "fractional" or "auto" (module docstring).

    Raises
    ------
    ValueError: masks of another size than the source's Rows x Columns, or values highdicom
        refuses in the source (the pipeline fails the image's outputs with the reason).
    """
    rows, columns = int(source.Rows), int(source.Columns)
    if segmentation.right_lung.shape != (rows, columns):
        raise ValueError(
            f"lung masks of {segmentation.right_lung.shape} for an image of {(rows, columns)}"
        )
    algorithm = algorithm_identification(model, "auto-box lungs")
    description = f"Algorithm output ({model.name}). {NOT_FOR_DIAGNOSTIC_USE_SHORT}"
    if not segmentation.qc_passed:  # the reasons are in the SR and result.json
        description = f"NEEDS REVIEW: lung masks failed QC. {NOT_FOR_DIAGNOSTIC_USE_SHORT}"
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.ANATOMICAL_STRUCTURE,
            segmented_property_type=code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=f"{label} (cxrbatch)",
            display_color=hd.color.CIELabColor.from_rgb(*colour),
        )
        for number, label, code, colour in (
            (1, "Right lung", codes.RIGHT_LUNG, RIGHT_COLOUR),
            (2, "Left lung", codes.LEFT_LUNG, LEFT_COLOUR),
        )
    ]
    fractional = encoding == "fractional" or (encoding == "auto" and int(source.Columns) % 8 != 0)
    right, left = segmentation.right_lung, segmentation.left_lung
    # Integer masks for either encoding: highdicom stores a 0/1 integer segment as the
    # FRACTIONAL value itself (Maximum Fractional Value 1), the same bytes a float array
    # gives after its np.unique range check and rounding (a tenth of the SEG's time).
    if (right & left).any():
        pixel_array = np.stack([right, left], axis=-1)[None].astype(np.uint8)
    else:
        # Disjoint lungs (as the segmenter makes them): the label map 1 = right, 2 = left
        # gives highdicom the same segments and spares it an overlap check over a 4-D
        # stack (a tenth of a second per 2500 px image).
        pixel_array = right.astype(np.uint8)
        pixel_array[left] = 2
        pixel_array = pixel_array[None]
    planar, plane_note = planar_header(source)
    seg = hd.seg.Segmentation(
        source_images=[planar],
        pixel_array=pixel_array,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.FRACTIONAL
            if fractional
            else hd.seg.SegmentationTypeValues.BINARY
        ),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.OCCUPANCY,
        max_fractional_value=1,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=9901,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="cxrbatch lung segmentation",
        software_versions=f"cxrbatch {cxrbatch.__version__}",
        device_serial_number="0",
        content_description=description[:64],
        content_label="LUNGS",
        content_creator_name="cxrbatch^algorithm",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
    )
    # General Image module: the film's anatomical directions, copied from the source.
    orientation = source.get("PatientOrientation")
    seg.PatientOrientation = list(orientation) if orientation else ""
    seg.ImageComments = f"Plane: {plane_note}."[:10240]
    seg.SeriesDescription = f"cxrbatch lungs - ALGORITHM - {NOT_FOR_DIAGNOSIS}"[:64]
    return seg


NOT_FOR_DIAGNOSTIC_USE_SHORT = "Not for diagnostic use."

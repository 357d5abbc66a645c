"""DICOM Segmentation (BINARY) of the right and left lung, built with highdicom."""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import cxrbatch
from cxrbatch.dicom import codes
from cxrbatch.domain import LungSegmentation, ModelRef

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


def valid_pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """PixelSpacing (or ImagerPixelSpacing) when both values are positive numbers."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            spacing = (float(value[0]), float(value[1])) if value is not None else None
        except (TypeError, ValueError, IndexError):
            spacing = None
        if spacing and spacing[0] > 0 and spacing[1] > 0 and all(np.isfinite(spacing)):
            return spacing
    return None


def build_seg(
    source: Dataset,
    segmentation: LungSegmentation,
    model: ModelRef,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> Dataset:
    """A BINARY SEG with segment 1 = right lung and segment 2 = left lung (patient sides)."""
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
        )
        for number, label, code in (
            (1, "Right lung", codes.RIGHT_LUNG),
            (2, "Left lung", codes.LEFT_LUNG),
        )
    ]
    right, left = segmentation.right_lung, segmentation.left_lung
    if (right & left).any():
        pixel_array = np.stack([right, left], axis=-1)[None]
    else:
        # Disjoint lungs (as the segmenter makes them): the label map 1 = right, 2 = left
        # gives highdicom the same BINARY SEG and spares it an overlap check over a 4-D
        # stack (a tenth of a second per 2500 px image).
        pixel_array = right.astype(np.uint8)
        pixel_array[left] = 2
        pixel_array = pixel_array[None]
    # highdicom would copy (and parse) the source's spacing into Pixel Measures, which are
    # removed below anyway: a corrupt spacing value must not stop the SEG.
    spacing_free = copy.copy(source)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        if keyword in spacing_free:
            delattr(spacing_free, keyword)
    seg = hd.seg.Segmentation(
        source_images=[spacing_free],
        pixel_array=pixel_array.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
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
    # No Pixel Measures: a projection radiograph has no frame of reference, and the SEG maps
    # pixel for pixel onto its source, whose spacing stays the one reference. highdicom
    # copies the source's PixelSpacing, which is often invalid (zero, as in the RG1 export)
    # and, without the Type 1C SliceThickness that a projection lacks, makes the SEG
    # unreadable by highdicom itself. The SR reports lung areas in mm2 where the source's
    # spacing is valid.
    for group in seg.SharedFunctionalGroupsSequence:
        if "PixelMeasuresSequence" in group:
            del group.PixelMeasuresSequence
    # General Image module: Type 2C without a frame of reference; copied from the source.
    orientation = source.get("PatientOrientation")
    seg.PatientOrientation = list(orientation) if orientation else ""
    seg.SeriesDescription = f"cxrbatch lungs - ALGORITHM - {NOT_FOR_DIAGNOSIS}"[:64]
    return seg


NOT_FOR_DIAGNOSTIC_USE_SHORT = "Not for diagnostic use."

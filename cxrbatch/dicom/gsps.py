"""Grayscale Softcopy Presentation State (highdicom) over the original film: for PACS and
viewers that show neither SEG nor SR, and for those that keep the radiograph itself on
screen and draw a presentation state's annotations on it.

Graphic layers (each with its recommended display colour):
- RIGHT LUNG, LEFT LUNG: each lung's border, a closed POLYLINE in the image's pixels;
- FINDINGS: the region of each finding map (the classifier's evidence for a label at or
  above its threshold: activation at half its peak, cxrbatch/models/heatmaps.py), named
  with its probability against its threshold;
- TEXT: a few lines in the display's top left corner (cxrbatch/dicom/captions.py): the
  headline, NOT FOR DIAGNOSTIC USE, the synthetic-training warning where it applies, the
  triage and the top findings against their thresholds;
- OUTLINES: the same lung and region borders once more as an overlay plane (group 6000,
  one bit a pixel), for viewers that show a presentation state's overlays but not its
  graphics (dcmtk renders presentation states this way: dcmp2pgm writes the activated
  overlays, never the graphic or text annotations). The lines lie under the graphics.
The VOI is the window the film was decoded with (the header's, or the data's 0.5-99.5
percentile one), with the polarity of its Photometric Interpretation (MONOCHROME1:
Presentation LUT Shape INVERSE), so the film looks as on the key image.
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import cxrbatch
from cxrbatch.dicom.captions import caption
from cxrbatch.dicom.contours import (
    LEFT_COLOUR,
    REGION_COLOUR,
    RIGHT_COLOUR,
    Borders,
    LungBorders,
)
from cxrbatch.dicom.seg import MANUFACTURER, NOT_FOR_DIAGNOSIS, processing_equipment
from cxrbatch.domain import ImageResult, ModelRef

SERIES_NUMBER = 9905
TEXT_LINES = 6  # the caption's first lines; the findings line lists at most 3 labels
TEXT_TOP, TEXT_LINE = 0.01, 0.035  # display units (0..1 of the displayed area)
MIN_REGION_PIXELS = 16  # finding-map islands smaller than this are not drawn


def _layer(
    name: str, order: int, description: str, rgb: tuple[int, int, int]
) -> hd.pr.GraphicLayer:
    return hd.pr.GraphicLayer(
        layer_name=name,
        order=order,
        description=description,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )


def _polylines(borders: Borders, min_area: float = 0.0) -> list[hd.pr.GraphicObject]:
    return [
        hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=line,
            units=hd.pr.AnnotationUnitsValues.PIXEL,
        )
        for line in borders.polylines(min_area=min_area)
    ]


OVERLAY_GROUP = 0x6000
OVERLAY_LAYER = "OUTLINES"


def _overlay(gsps: Dataset, shape: tuple[int, int], outlined: list[Borders], order: int) -> None:
    """The `outlined` borders as overlay plane OVERLAY_GROUP of `gsps` (Overlay Plane
    module, PS3.3 C.9.2) over an image of `shape`, shown in its own graphic layer at full
    brightness."""
    rows, columns = shape
    bits = np.zeros((rows, columns), dtype=np.uint8)
    for borders in outlined:
        cv2.drawContours(bits, borders.found, -1, 1, max(1, columns // 600))
    # Overlay Data (PS3.5 8.1.1): the bits in row order, the first pixel in the low bit,
    # padded to an even length. np.packbits directly: pydicom's pack_bits checks the
    # values and, for a length not a multiple of 8, pads by np.append with float64 zeros,
    # which copies the whole image as float64 first (5 ms of a 1955 x 1841 film).
    packed = np.packbits(bits.ravel(), bitorder="little").tobytes()
    group = OVERLAY_GROUP
    gsps.add_new((group, 0x0010), "US", rows)
    gsps.add_new((group, 0x0011), "US", columns)
    gsps.add_new((group, 0x0022), "LO", "lung and finding region borders (algorithm)")
    gsps.add_new((group, 0x0040), "CS", "G")
    gsps.add_new((group, 0x0050), "SS", [1, 1])
    gsps.add_new((group, 0x0100), "US", 1)
    gsps.add_new((group, 0x0102), "US", 0)
    gsps.add_new((group, 0x1001), "CS", OVERLAY_LAYER)  # Overlay Activation Layer
    gsps.add_new((group, 0x3000), "OW", packed + b"\x00" * (len(packed) % 2))
    layer = Dataset()
    layer.GraphicLayer = OVERLAY_LAYER
    layer.GraphicLayerOrder = order
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF
    layer.GraphicLayerDescription = "the borders again, as an overlay"
    gsps.GraphicLayerSequence.append(layer)


def _voi(item: ImageResult) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    window = item.image.display_window
    if window is None:
        return None
    center, width = window
    return [
        hd.pr.SoftcopyVOILUTTransformation(
            window_center=[round(center, 3)],
            window_width=[max(1.0, round(width, 3))],
            window_explanation=["as decoded by cxrbatch"],
        )
    ]


def build_presentation_state(
    source: Dataset,
    item: ImageResult,
    models: tuple[ModelRef, ...],
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    lung_borders: LungBorders | None = None,
) -> Dataset:
    """A GSPS on `source` with the lung contours, the finding regions and the text layer.

    Parameters
    ----------
    source: the radiograph's header; item: its result (masks, findings, finding maps).
    models: the models that ran (named in the text layer and the content description).
    series_instance_uid, sop_instance_uid, instance_number: the new object's identity.
    lung_borders: the lungs' borders where the caller found them already (the SR uses
        them too); found here otherwise.

    Raises
    ------
    ValueError: values highdicom refuses in the source (the pipeline fails the image's
        outputs with the reason).
    """
    segmentation = item.segmentation
    right_layer = _layer("RIGHT LUNG", 1, "patient's right lung (algorithm)", RIGHT_COLOUR)
    left_layer = _layer("LEFT LUNG", 2, "patient's left lung (algorithm)", LEFT_COLOUR)
    findings_layer = _layer(
        "FINDINGS", 3, "where the classifier found each flagged label", REGION_COLOUR
    )
    text_layer = _layer("TEXT", 4, "algorithm summary", (255, 255, 255))
    layers = [right_layer, left_layer]
    annotations = []
    # Each border found once, for its polylines and the overlay.
    if lung_borders is None:
        lung_borders = (Borders(segmentation.right_lung), Borders(segmentation.left_lung))
    outlined = list(lung_borders)
    for layer, borders in zip((right_layer, left_layer), outlined, strict=True):
        objects = _polylines(borders)
        if objects:
            annotations.append(
                hd.pr.GraphicAnnotation(
                    referenced_images=[source], graphic_layer=layer, graphic_objects=objects
                )
            )
    region_objects: list[hd.pr.GraphicObject] = []
    region_labels: list[hd.pr.TextObject] = []
    shape = segmentation.right_lung.shape
    for finding in item.finding_maps:
        region = finding.region(shape)
        borders = Borders(region)
        objects = _polylines(borders, MIN_REGION_PIXELS)
        if not objects:
            continue
        region_objects.extend(objects)
        outlined.append(borders)
        ys, xs = np.nonzero(region)
        label = f"{finding.label} {finding.probability:.2f} >= {finding.threshold:.2f}"
        if finding.model.synthetic_training_data:
            label += " (SYNTHETIC)"
        region_labels.append(
            hd.pr.TextObject(
                text_value=label,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                anchor_point=(float(xs.mean()), float(ys.min())),
                anchor_point_visible=False,
            )
        )
    if region_objects:
        layers.append(findings_layer)
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[source],
                graphic_layer=findings_layer,
                graphic_objects=region_objects,
                text_objects=region_labels,
            )
        )
    words = caption(item, models, limit=3)
    texts = [f"AI: {words.headline}", *(line.text for line in words.lines[: TEXT_LINES - 1])]
    layers.append(text_layer)
    annotations.append(
        hd.pr.GraphicAnnotation(
            referenced_images=[source],
            graphic_layer=text_layer,
            text_objects=[
                hd.pr.TextObject(
                    text_value=text,
                    units=hd.pr.AnnotationUnitsValues.DISPLAY,
                    bounding_box=(
                        0.01,
                        TEXT_TOP + TEXT_LINE * row,
                        0.99,
                        TEXT_TOP + TEXT_LINE * (row + 1),
                    ),
                    text_justification=hd.pr.TextJustificationValues.LEFT,
                )
                for row, text in enumerate(texts)
            ],
        )
    )
    inverse = str(source.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    plut = hd.PresentationLUTTransformation(
        presentation_lut_shape=(
            hd.PresentationLUTShapeValues.INVERSE
            if inverse
            else hd.PresentationLUTShapeValues.IDENTITY
        )
    )
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="cxrbatch presentation state",
        software_versions=f"cxrbatch {cxrbatch.__version__}",
        device_serial_number="0",
        content_label="CXRBATCH",
        content_description=f"Algorithm output. {NOT_FOR_DIAGNOSIS}"[:64],
        graphic_annotations=annotations,
        graphic_layers=layers,
        content_creator_name="cxrbatch^algorithm",
        voi_lut_transformations=_voi(item),
        presentation_lut_transformation=plut,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[
            processing_equipment("cxrbatch presentation state"),
            # Each model: name and version, and its weights' SHA-256 as software version.
            *(
                processing_equipment(
                    f"{m.name} {m.version}" + (" SYNTHETIC" if m.synthetic_training_data else ""),
                    [m.version[:64], m.sha256],
                )
                for m in models
            ),
        ],
    )
    _overlay(gsps, shape, outlined, order=len(layers) + 1)
    # What was processed is a chest, an unpaired body part: no (Type 2C) Laterality.
    gsps.BodyPartExamined = "CHEST"
    gsps.SeriesDescription = f"cxrbatch annotations - ALGORITHM - {NOT_FOR_DIAGNOSIS}"[:64]
    return gsps

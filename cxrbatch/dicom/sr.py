"""DICOM Comprehensive SR (TID 1500 Measurement Report) with the study's findings.

Per processed image:
- per classifier role (classifier, screening), one planar ROI group (TID 1410) whose
  region is the part of the film the network was given (a closed SCOORD POLYLINE around
  it), with each label's probability, its operating threshold and call (Present/Absent),
  the No Finding score (1 - max p) and, in screening mode, the triage category; its
  tracking identifier says in words what was flagged, which is what OHIF lists;
- per finding map (a label at or above its threshold), one planar ROI group around the
  region where the classifier found it (Grad-CAM at half its peak; the largest
  MAX_REGIONS islands), the label as finding, its probability and threshold;
- one planar ROI group (TID 1410) per lung with its border as a closed SCOORD POLYLINE on
  the source image, the lung as finding site, its area in mm2 when the source has a valid
  pixel spacing, and the segmentation quality gate's verdict on the pair (with the triage
  category needs-review when the masks failed it).
Every group has a region on the film: OHIF 3.13 reads `coords[0]` of every measurement
group of an SR it displays, and a group without one (a segment reference, a TID 1501
group) made it fail with "Cannot read properties of undefined (reading
'ReferencedSOPSequence')" and show nothing. The SEG is referenced from the evidence
(Current Requested Procedure Evidence Sequence).
The reasons of failed verdicts ("segmentation failed QC: ...") are TEXT items in TID 1500's
Qualitative Evaluations container (row 12), which highdicom does not build.
Every group carries the algorithm's name, version and weight hash (TID 1410's Algorithm
Identification); its measurements inherit it. TID 300's own Algorithm Identification is
for a measurement made by another algorithm than its group's: repeating the group's on
every measurement doubled the SR's content items (127 -> 67 for RG1 with both
classifiers) and the time to build it.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

import cxrbatch
from cxrbatch.dicom import codes
from cxrbatch.dicom.captions import called
from cxrbatch.dicom.contours import Borders, LungBorders, outlines
from cxrbatch.dicom.seg import MANUFACTURER, NOT_FOR_DIAGNOSIS, valid_pixel_spacing
from cxrbatch.domain import FindingMap, Findings, LungSegmentation, ModelRef

MAX_REGIONS = 2  # per finding map: its largest islands
MIN_REGION_PIXELS = 16


@dataclass(frozen=True, eq=False)
class SrImage:
    """What the SR says about one image."""

    source: Dataset
    seg: Dataset
    segmentation: LungSegmentation
    segmenter: ModelRef
    findings: Findings | None
    screening: Findings | None
    finding_maps: tuple[FindingMap, ...] = ()
    # The lungs' borders where the caller found them already (the presentation state's);
    # found here otherwise.
    lung_borders: LungBorders | None = None


def _algorithm(model: ModelRef) -> hd.sr.AlgorithmIdentification:
    name = model.name + (" [SYNTHETIC TRAINING DATA]" if model.synthetic_training_data else "")
    parameters = [f"weights_sha256={model.sha256}"]
    if model.mask_mode:
        parameters.append(f"mask_mode={model.mask_mode}")
    if model.synthetic_training_data:
        parameters.append("training_data=synthetic; outputs are not clinically meaningful")
    return hd.sr.AlgorithmIdentification(
        name=name[:64], version=model.version[:64], parameters=parameters
    )


def _significant(value: float) -> float:
    """A probability to 6 significant digits (not 6 decimals: 0.00000031 stays itself
    rather than 0.0, which OHIF shows as an empty value)."""
    return float(f"{value:.6g}")


def _rectangle(top: float, left: float, height: float, width: float) -> np.ndarray:
    """A closed POLYLINE (column, row points) around a rectangle of the film."""
    corners = [(left, top), (left + width, top), (left + width, top + height), (left, top + height)]
    return np.array([*corners, corners[0]], dtype=np.float64)


def _region(item: SrImage, line: np.ndarray) -> hd.sr.ImageRegion:
    """A closed POLYLINE on the source image: every group's region (module docstring)."""
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=line,
        source_image=hd.sr.SourceImageForRegion.from_source_image(item.source),
    )


def _finding_group(
    item: SrImage, findings: Findings, role: str, uid_seed: int
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    algorithm = _algorithm(findings.model)
    measurements = [
        hd.sr.Measurement(
            name=codes.finding_code(label),
            value=_significant(probability),
            unit=codes.UNIT_PROBABILITY,
        )
        for label, probability in findings.probabilities.items()
    ]
    measurements.append(
        hd.sr.Measurement(
            name=codes.NO_FINDING_SCORE,
            value=_significant(findings.no_finding_score),
            unit=codes.UNIT_PROBABILITY,
        )
    )
    # Each label with an operating threshold: the threshold, and the call it makes.
    evaluations = []
    for label, positive in findings.calls.items():
        measurements.append(
            hd.sr.Measurement(
                name=codes.threshold_code(label),
                value=round(findings.thresholds[label], 6),
                unit=codes.UNIT_PROBABILITY,
            )
        )
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=codes.finding_code(label), value=codes.PRESENT if positive else codes.ABSENT
            )
        )
    if findings.triage is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=codes.TRIAGE_CATEGORY, value=codes.TRIAGE_VALUES[findings.triage.value]
            )
        )
    flagged = called(findings)
    if findings.triage is not None:
        summary = findings.triage.value
    elif flagged:
        summary = "flagged " + ", ".join(flagged)
    else:
        summary = "nothing flagged" if findings.thresholds else "no thresholds"
    synthetic = " (SYNTHETIC)" if findings.model.synthetic_training_data else ""
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{role} image {uid_seed}: {summary}{synthetic}"
        ),
        # The part of the film the network was given.
        referenced_region=_region(
            item, _rectangle(*(findings.box or (0, 0, item.source.Rows, item.source.Columns)))
        ),
        finding_type=codes.CLASSIFICATION,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.CHEST)],
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


def _map_groups(
    item: SrImage, index: int
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """Each finding map's region(s): where the classifier found a label it flagged."""
    groups = []
    shape = (int(item.source.Rows), int(item.source.Columns))
    for finding in item.finding_maps:
        algorithm = _algorithm(finding.model)
        lines = outlines(finding.region(shape), min_area=MIN_REGION_PIXELS)[:MAX_REGIONS]
        synthetic = " (SYNTHETIC)" if finding.model.synthetic_training_data else ""
        for line in lines:
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=hd.UID(),
                        identifier=(
                            f"{finding.label} {finding.probability:.2f} >= "
                            f"{finding.threshold:.2f}: where found, image {index}{synthetic}"
                        ),
                    ),
                    referenced_region=_region(item, line),
                    finding_type=codes.finding_code(finding.label),
                    algorithm_id=algorithm,
                    measurements=[
                        hd.sr.Measurement(
                            name=codes.finding_code(finding.label),
                            value=_significant(finding.probability),
                            unit=codes.UNIT_PROBABILITY,
                        ),
                        hd.sr.Measurement(
                            name=codes.threshold_code(finding.label),
                            value=round(finding.threshold, 6),
                            unit=codes.UNIT_PROBABILITY,
                        ),
                    ],
                    qualitative_evaluations=[
                        hd.sr.QualitativeEvaluation(
                            name=codes.finding_code(finding.label), value=codes.PRESENT
                        )
                    ],
                )
            )
    return groups


def _lung_outline_groups(
    item: SrImage, index: int
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """Each lung's border as a planar ROI (TID 1410) on the source image: a closed SCOORD
    POLYLINE, the lung as finding site, its area (mm2, where the spacing is known) and the
    quality gate's verdict on the pair, so viewers that draw SR regions (OHIF) show the
    contours over the film. Where neither lung has a border, the verdict stands on a group
    around the whole film: every group has a region (module docstring)."""
    spacing = valid_pixel_spacing(item.source)
    evaluations = _qc_evaluations(item)
    groups = []
    right, left = item.segmentation.right_lung, item.segmentation.left_lung
    right_borders, left_borders = item.lung_borders or (Borders(right), Borders(left))
    for side, code, mask, borders in (
        ("right", codes.RIGHT_LUNG, right, right_borders),
        ("left", codes.LEFT_LUNG, left, left_borders),
    ):
        line = borders.polyline()
        if line is None:
            continue
        measurements = []
        if spacing is not None:
            area = float(np.count_nonzero(mask)) * spacing[0] * spacing[1]
            measurements.append(
                hd.sr.Measurement(name=codes.AREA, value=round(area, 1), unit=codes.UNIT_MM2)
            )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"{side} lung outline image {index}"
                ),
                referenced_region=_region(item, line),
                finding_type=code,
                finding_sites=[hd.sr.FindingSite(code)],
                algorithm_id=_algorithm(item.segmenter),
                measurements=measurements or None,
                qualitative_evaluations=evaluations or None,
            )
        )
    if not groups and evaluations:
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"lungs image {index}: no lung outline"
                ),
                referenced_region=_region(
                    item, _rectangle(0, 0, int(item.source.Rows), int(item.source.Columns))
                ),
                finding_type=codes.SEGMENTATION_QC,
                finding_sites=[hd.sr.FindingSite(codes.CHEST)],
                algorithm_id=_algorithm(item.segmenter),
                qualitative_evaluations=evaluations,
            )
        )
    return groups


def _qc_evaluations(item: SrImage) -> list[hd.sr.QualitativeEvaluation]:
    """The quality gate's verdict (and needs-review when it failed)."""
    qc = item.segmentation.qc
    if qc is None:
        return []
    evaluations = [
        hd.sr.QualitativeEvaluation(name=codes.SEGMENTATION_QC, value=codes.QC_VALUES[qc.passed])
    ]
    if not qc.passed:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=codes.TRIAGE_CATEGORY, value=codes.TRIAGE_VALUES["needs-review"]
            )
        )
    return evaluations


def _qc_reasons(items: list[SrImage]) -> hd.sr.ContainerContentItem | None:
    texts = [
        hd.sr.TextContentItem(
            name=codes.SEGMENTATION_QC,
            value=f"image {index} ({item.source.SOPInstanceUID}): {item.segmentation.qc.reason}",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for index, item in enumerate(items, start=1)
        if item.segmentation.qc is not None and item.segmentation.qc.reason
    ]
    if not texts:
        return None
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(texts)
    return container


def series_description(models: list[ModelRef], classified: bool, needs_review: bool = False) -> str:
    synthetic = any(m.synthetic_training_data for m in models)
    kind = "findings" if classified else "SEGMENTATION ONLY"
    if needs_review:
        kind = "NEEDS REVIEW"
    tag = "SYNTHETIC-TRAINED " if synthetic else ""
    return f"cxrbatch {kind} {tag}- {NOT_FOR_DIAGNOSIS}"[:64]


def build_sr(items: list[SrImage], series_instance_uid: str, sop_instance_uid: str) -> Dataset:
    """The study's Comprehensive SR (TID 1500 measurement report; module docstring).

    Parameters
    ----------
    items: per processed image, its header, its SEG, masks, segmenter, findings,
        screening and finding maps, in instance order.
    series_instance_uid, sop_instance_uid: the new object's UIDs.

    Raises
    ------
    ValueError: no image to report on, or values highdicom refuses in the sources.
    """
    if not items:
        raise ValueError("an SR reports on at least one processed image; none given")
    groups: list[object] = []
    models: list[ModelRef] = []
    for index, item in enumerate(items, start=1):
        models.append(item.segmenter)
        for findings, role in ((item.findings, "classifier"), (item.screening, "screening")):
            if findings is not None:
                models.append(findings.model)
                groups.append(_finding_group(item, findings, role, index))
        groups.extend(_map_groups(item, index))
        groups.extend(_lung_outline_groups(item, index))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(),
        name="cxrbatch",
        manufacturer_name=MANUFACTURER,
        model_name=f"cxrbatch {cxrbatch.__version__}",
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dcm_codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.PROCEDURE_CHEST_RADIOGRAPH,
        imaging_measurements=groups,  # type: ignore[arg-type]
    )
    reasons = _qc_reasons(items)
    if reasons is not None:
        report[0].ContentSequence.append(reasons)
    evidence = [item.source for item in items] + [item.seg for item in items]
    # highdicom's document constructor deep-copies the content it is given, parses the copy
    # back into content items and walks it for references and 3-D coordinates: about a
    # fifth of a study's host CPU on a GPU host, profiled (issue 37, docs/performance.md).
    # The tree was built by highdicom's templates above, so the constructor gets its root
    # container alone and the tree goes in after. Nothing it derives changes: the
    # evidence lists every source and SEG given (collect_evidence lists all evidence, not
    # only what the tree references), every image the tree references is a source given
    # here, and the tree has no 3-D coordinates. The returned dataset is complete; its
    # `.content` property holds the root alone (`hd.sr.srread` of the file has the tree).
    root = report[0]
    shell = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = []  # walked by the constructor: nothing to find
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=shell,
        series_instance_uid=series_instance_uid,
        series_number=9902,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.ContentSequence = root.ContentSequence
    classified = any(item.findings is not None or item.screening is not None for item in items)
    needs_review = reasons is not None
    sr.SeriesDescription = series_description(models, classified, needs_review)
    return sr

"""Withdrawing results already delivered: an IHE IOCM rejection note, a Key Object
Selection Document (highdicom) titled (113001, DCM, "Rejected for Quality Reasons"), in
the study of the objects it rejects, referencing each of them (content items and the
Current Requested Procedure Evidence Sequence).

A PACS that implements IOCM (IHE RAD TF-2 4.66/4.67) hides or deletes the referenced
objects once it stores the note; one that does not keeps them, and the note is one more
object in the study that says they are withdrawn (docs/conformance.md, deploy/OPERATIONS.md).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import cxrbatch
from cxrbatch.dicom.export import PATIENT_STUDY_TYPE2, carry_identity, reference_header
from cxrbatch.dicom.seg import MANUFACTURER, NOT_FOR_DIAGNOSIS, processing_equipment
from cxrbatch.domain import ModelRef

SERIES_NUMBER = 9904
REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # 113001 (CID 7010/7011)


def build_rejection(
    withdrawn: list[Dataset],
    models: tuple[ModelRef, ...],
    series_instance_uid: str,
    sop_instance_uid: str,
) -> Dataset:
    """The rejection note for `withdrawn` objects.

    Parameters
    ----------
    withdrawn: headers of the objects delivered before (`evidence`), all of one study.
    models: those of the outcome that supersedes them (named in Contributing Equipment).
    series_instance_uid, sop_instance_uid: the note's UIDs.

    Raises
    ------
    ValueError: nothing to withdraw, or objects of more than one study.
    """
    if not withdrawn:
        raise ValueError("a rejection note needs at least one object to reject")
    studies = {str(ds.StudyInstanceUID) for ds in withdrawn}
    if len(studies) != 1:
        raise ValueError(f"a rejection note rejects objects of one study, found {len(studies)}")
    received, withdrawn = withdrawn[0], [reference_header(ds) for ds in withdrawn]
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=withdrawn,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(),
                name="cxrbatch",
                manufacturer_name=MANUFACTURER,
                model_name=f"cxrbatch {cxrbatch.__version__}",
            ),
        ),
        description=(
            "Algorithm results withdrawn by cxrbatch: superseded by a newer outcome of the "
            f"study. {NOT_FOR_DIAGNOSIS}."
        )[:1024],
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=withdrawn,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        contributing_equipment=[
            processing_equipment("cxrbatch rejection note"),
            # The models whose newer outcome supersedes the withdrawn objects.
            *(
                processing_equipment(
                    m.name, [m.version[:64], m.sha256[:64]], "Model of the superseding outcome"
                )
                for m in models
            ),
        ],
    )
    note.SeriesDescription = f"cxrbatch withdrawn results - {NOT_FOR_DIAGNOSIS}"[:64]
    return carry_identity(note, received)


def evidence(objects: list[dict[str, str]], study: Dataset) -> list[Dataset]:
    """Headers of withdrawn objects (their files may be gone or rewritten): their UIDs, with
    the patient and study attributes of `study` (a current object of the same study)."""
    headers = []
    for item in objects:
        ds = Dataset()
        for keyword in PATIENT_STUDY_TYPE2:
            if keyword in study:
                setattr(ds, keyword, study.data_element(keyword).value)  # type: ignore[union-attr]
        ds.StudyInstanceUID = item["study"]
        ds.SeriesInstanceUID = item["series"]
        ds.SOPClassUID = item["sop_class"]
        ds.SOPInstanceUID = item["sop_instance"]
        headers.append(ds)
    return headers

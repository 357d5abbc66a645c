"""De-identified research export (`cxrbatch export-deid`): the current processed studies'
source images, SEG and SR, de-identified by the DICOM PS3.15 Annex E Basic Application
Level Confidentiality Profile, plus tables a research team and the training subsystem use.

    for each study (one dicognito Anonymizer for the whole export, keyed by `deid.key_env`):
        source images, SEG, SR  -> dicognito: UIDs, names, IDs, addresses, institution,
                                   station, dates replaced, the same way in every object,
                                   so the SEG's and SR's references still resolve
                                -> the Basic Profile's removals dicognito does not make
                                   (`_REMOVED`: descriptions, comments, free text, patient
                                   characteristics), private attributes removed
                                -> dates: shifted by one offset per key when
                                   deid.retain_modified_dates (Retain Longitudinal Temporal
                                   Information with Modified Dates, E.3.6), else dummies
                                -> PatientIdentityRemoved YES, DeidentificationMethod and its
                                   code sequence (113100, and 113107 with modified dates)
        OUT/dicom/<study>/<object>.dcm, OUT/images/<image>.png (what the training reads)
    OUT/labels.csv     the curation format (training/data.py): Image Index, Patient ID, one
                       column per label (left empty: reader labels, to be filled before
                       fine-tuning; model outputs are never training labels), split
    OUT/outcomes.csv   the de-identified outcome per image: triage, scores, probabilities
    MAPPING (optional, never inside OUT): original -> pseudonymous study UID, accession
                       number and patient ID, for re-identification by the site only

Key images (Secondary Captures) are not exported: their pixels carry burned-in text that
header de-identification cannot remove. Source images with burned-in annotations
(BurnedInAnnotation YES) are left out with the reason, for the same cause.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import hashlib
import io
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import cv2
import pydicom
from dicognito.anonymizer import Anonymizer
from pydicom.dataset import Dataset

from cxrbatch.config import DeidSettings
from cxrbatch.db import Sessions, repository
from cxrbatch.dicom.decode import decode_dataset
from cxrbatch.dicom.discover import read_header
from cxrbatch.dicom.export import write_dicom
from cxrbatch.domain import InstanceHeader, OutcomeStatus
from cxrbatch.errors import ConfigError
from cxrbatch.files import atomic_write
from cxrbatch.paths import StorageRoots, is_inside, resolve_stored, uid_path_component

log = logging.getLogger(__name__)

LABELS = ("Mass", "Nodule", "Pneumonia", "Edema", "Fibrosis", "No Finding")

# PS3.15 Table E.1-1 attributes with action X (or X/Z) that dicognito leaves alone: free
# text and patient characteristics. Attributes required by the SEG and SR IODs are not
# here (dicognito replaces those that identify). PatientSex (Z) is emptied.
_REMOVED = (
    "AcquisitionComments",
    "AdditionalPatientHistory",
    "AdmissionID",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "Arbitrary",
    "AuthorObserverSequence",
    "ContributionDescription",
    "CountryOfResidence",
    "CurrentPatientLocation",
    "DerivationDescription",
    "EthnicGroup",
    "FrameComments",
    "IdentifyingComments",
    "ImageComments",
    "InterpretationText",
    "MedicalAlerts",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientAge",
    "PatientComments",
    "PatientMotherBirthName",
    "PatientSize",
    "PatientState",
    "PatientWeight",
    "PatientAddress",
    "PatientBirthName",
    "PatientBirthTime",
    "PerformedProcedureStepDescription",
    "PregnancyStatus",
    "ProtocolName",
    "ReasonForTheRequestedProcedure",
    "RequestAttributesSequence",
    "RequestedProcedureDescription",
    "SeriesDescription",
    "SmokingStatus",
    "SpecialNeeds",
    "StudyComments",
    "StudyDescription",
    "TextComments",
    "TextString",
)
_EMPTIED = ("PatientSex",)
# Action D where the SEG's Enhanced General Equipment module requires a value (Type 1).
_DUMMIED = {"DeviceSerialNumber": "DEIDENTIFIED"}
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))


@dataclass
class Exported:
    studies: int = 0
    images: int = 0
    objects: int = 0
    left_out: list[str] = field(default_factory=list)


class Deidentifier:
    """One export's de-identification: every object through the same Anonymizer, so each
    original UID, ID and name maps to one pseudonym across sources, SEGs and SRs."""

    def __init__(self, settings: DeidSettings) -> None:
        key = os.environ.get(settings.key_env, "") if settings.key_env else ""
        if settings.key_env and not key:
            raise ConfigError(
                f"deid.key_env names {settings.key_env}, which is not set: set it, or leave "
                "deid.key_env empty for a fresh random key per export"
            )
        self.keyed = bool(key)
        # dicognito derives every pseudonym from the seed: the key must stay secret.
        self._anonymizer = Anonymizer(seed=key or secrets.token_hex(32))
        self.settings = settings

    def __call__(self, ds: Dataset) -> Dataset:
        ds = copy.deepcopy(ds)
        self._anonymizer.anonymize(ds)  # shifts dates by the key's offset
        if not self.settings.retain_modified_dates:
            _dummy_dates(ds)
        ds.remove_private_tags()
        for keyword in _REMOVED:
            for item in _datasets(ds):
                if keyword in item:
                    delattr(item, keyword)
        for keyword in _EMPTIED:
            if keyword in ds:
                ds.data_element(keyword).value = ""  # type: ignore[union-attr]
        for keyword, dummy in _DUMMIED.items():
            for item in _datasets(ds):
                if keyword in item:
                    item.data_element(keyword).value = dummy  # type: ignore[union-attr]
        ds.PatientIdentityRemoved = "YES"
        methods = [BASIC_PROFILE]
        if self.settings.retain_modified_dates:
            methods.append(MODIFIED_DATES)
        ds.DeidentificationMethod = "PS3.15 E.1 Basic Profile (cxrbatch, dicognito)" + (
            ", modified dates" if self.settings.retain_modified_dates else ""
        )
        ds.DeidentificationMethodCodeSequence = [
            _code(value, meaning) for value, meaning in methods
        ]
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self.settings.retain_modified_dates else "REMOVED"
        )
        return ds


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _datasets(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for element in list(ds):
        if element.VR == "SQ":
            for item in element.value:
                yield from _datasets(item)


def _dummy_dates(ds: Dataset) -> None:
    """Dates, times and date-times replaced by dummies (PS3.15 action D), everywhere."""

    def replace(_dataset: Dataset, element: pydicom.DataElement) -> None:
        if element.VR in DUMMY and element.value not in (None, ""):
            element.value = DUMMY[element.VR]

    ds.walk(replace)


def _split(pseudonymous_patient: str) -> str:
    """A patient's partition, stable for a pseudonym (a patient-level 70:15:15 split)."""
    fraction = int(hashlib.sha256(pseudonymous_patient.encode()).hexdigest()[:8], 16) / 2**32
    bound = 0.0
    for name, share in SPLITS:
        bound += share
        if fraction < bound:
            return name
    return SPLITS[-1][0]


def export(
    sessions: Sessions,
    roots: StorageRoots,
    settings: DeidSettings,
    out: Path,
    *,
    since: dt.datetime | None = None,
    triage: str | None = None,
    mapping: Path | None = None,
) -> Exported:
    """Write the de-identified export of the current processed outcomes to `out`."""
    if mapping is not None and is_inside(out.resolve(), mapping.resolve()):
        raise ConfigError(f"the mapping table {mapping} must be kept apart from the export {out}")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"the export folder {out} is not empty")
    deidentify = Deidentifier(settings)
    where = repository.OutcomeFilter(
        since=since, triage=triage, status=OutcomeStatus.PROCESSED.value
    )
    with sessions() as session:
        outcomes = repository.current_outcomes(session, where)
        studies = [_StudyRow.of(o, roots) for o in outcomes]
    out.mkdir(parents=True, exist_ok=True)
    done = Exported()
    labels: list[dict[str, object]] = []
    table: list[dict[str, object]] = []
    mapped: list[dict[str, str]] = []
    for study in studies:
        written = _export_study(study, deidentify, out, done)
        if written is None:
            continue
        done.studies += 1
        mapped.append(written.mapping)
        labels += written.labels
        table += written.outcomes
    _write_csv(out / "labels.csv", ["Image Index", "Patient ID", *LABELS, "split"], labels)
    outcome_columns = [
        "Image Index",
        "Patient ID",
        "study_instance_uid",
        "sop_instance_uid",
        "triage",
        "no_finding_score",
        "screening_no_finding_score",
        "synthetic_model",
        *[f"p_{label}" for label in LABELS[:-1]],
    ]
    _write_csv(out / "outcomes.csv", outcome_columns, table)
    if mapping is not None:
        _write_csv(
            mapping,
            [
                "original_study_instance_uid",
                "study_instance_uid",
                "original_accession_number",
                "accession_number",
                "original_patient_id",
                "patient_id",
            ],
            mapped,
        )
    readme = (
        "De-identified export by cxrbatch (DICOM PS3.15 Annex E Basic Application Level "
        "Confidentiality Profile"
        + (
            ", Retain Longitudinal Temporal Information with Modified Dates"
            if settings.retain_modified_dates
            else ""
        )
        + ").\nlabels.csv is in the training curation format with the label columns EMPTY: "
        "fill in reader labels before fine-tuning.\noutcomes.csv holds the model outputs "
        "(NOT FOR DIAGNOSTIC USE"
        + (
            "; a model was trained on SYNTHETIC data"
            if any(r["synthetic_model"] for r in table)
            else ""
        )
        + ").\n"
    )
    (out / "README.txt").write_text(readme)
    return done


@dataclass(frozen=True)
class _StudyRow:
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    triage: str | None
    no_finding_score: float | None
    screening_no_finding_score: float | None
    synthetic_model: bool
    images: tuple[tuple[str, Path | None, dict[str, float]], ...]  # sop uid, source, p
    objects: tuple[Path, ...]  # the SEGs and the SR

    @classmethod
    def of(cls, outcome: object, roots: StorageRoots) -> _StudyRow:
        from cxrbatch.db.models import Outcome

        assert isinstance(outcome, Outcome)
        outputs = outcome.outputs or {}
        objects = [resolve_stored(p, roots) for p in (outputs.get("seg") or {}).values()]
        if outputs.get("sr"):
            objects.append(resolve_stored(outputs["sr"], roots))
        images = []
        for image in outcome.images:
            if image.status != "processed":
                continue
            p = {f.label: f.probability for f in image.findings if f.role == "classifier"}
            source = resolve_stored(image.source_path, roots) if image.source_path else None
            images.append((image.sop_instance_uid, source, p))
        return cls(
            outcome.study.study_instance_uid,
            outcome.study.accession_number,
            outcome.study.patient_id,
            outcome.triage,
            outcome.no_finding_score,
            outcome.screening_no_finding_score,
            outcome.synthetic_model,
            tuple(images),
            tuple(objects),
        )


@dataclass(frozen=True)
class _Written:
    mapping: dict[str, str]
    labels: list[dict[str, object]]
    outcomes: list[dict[str, object]]


def _export_study(
    study: _StudyRow, deidentify: Deidentifier, out: Path, done: Exported
) -> _Written | None:
    sources: list[tuple[str, Dataset, InstanceHeader, dict[str, float]]] = []
    ds: Dataset
    for sop_uid, path, probabilities in study.images:
        header = read_header(path) if path is not None and path.exists() else None
        if not isinstance(header, InstanceHeader):
            done.left_out.append(f"image {sop_uid}: its source file is gone (retention)")
            continue
        ds = pydicom.dcmread(header.path)
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            done.left_out.append(f"image {sop_uid}: burned-in annotation")
            continue
        sources.append((sop_uid, ds, header, probabilities))
    if not sources:
        return None
    objects = []
    for path in study.objects:
        if path.exists():
            objects.append(pydicom.dcmread(path))
        else:
            done.left_out.append(f"study output {path.name}: the file is gone")
    first: Dataset | None = None
    labels: list[dict[str, object]] = []
    outcomes: list[dict[str, object]] = []
    for sop_uid, ds, header, probabilities in sources:
        clean = deidentify(ds)
        first = first or clean
        folder = out / "dicom" / uid_path_component(str(clean.StudyInstanceUID))
        write_dicom(folder / f"{uid_path_component(str(clean.SOPInstanceUID))}.dcm", clean)
        image_index = f"{uid_path_component(str(clean.SOPInstanceUID))}.png"
        pixels = decode_dataset(clean, header).pixels
        ok, png = cv2.imencode(".png", pixels)
        if not ok:
            raise OSError(f"image {sop_uid} cannot be encoded as PNG")
        _write_bytes(out / "images" / image_index, png.tobytes())
        patient = str(clean.get("PatientID", ""))
        labels.append(
            {
                "Image Index": image_index,
                "Patient ID": patient,
                **dict.fromkeys(LABELS, ""),
                "split": _split(patient),
            }
        )
        outcomes.append(
            {
                "Image Index": image_index,
                "Patient ID": patient,
                "study_instance_uid": str(clean.StudyInstanceUID),
                "sop_instance_uid": str(clean.SOPInstanceUID),
                "triage": study.triage,
                "no_finding_score": study.no_finding_score,
                "screening_no_finding_score": study.screening_no_finding_score,
                "synthetic_model": study.synthetic_model,
                **{f"p_{k}": v for k, v in probabilities.items()},
            }
        )
        done.images += 1
    for ds in objects:
        clean = deidentify(ds)
        folder = out / "dicom" / uid_path_component(str(clean.StudyInstanceUID))
        write_dicom(folder / f"{uid_path_component(str(clean.SOPInstanceUID))}.dcm", clean)
        done.objects += 1
    assert first is not None
    return _Written(
        {
            "original_study_instance_uid": study.study_instance_uid,
            "study_instance_uid": str(first.StudyInstanceUID),
            "original_accession_number": study.accession_number or "",
            "accession_number": str(first.get("AccessionNumber", "")),
            "original_patient_id": study.patient_id or "",
            "patient_id": str(first.get("PatientID", "")),
        },
        labels,
        outcomes,
    )


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def _write_csv(
    path: Path, columns: list[str], rows: list[dict[str, object]] | list[dict[str, str]]
) -> None:
    def write(handle: IO[bytes]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        handle.write(text.getvalue().encode())

    atomic_write(path, write)

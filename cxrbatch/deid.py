"""De-identified research export (`cxrbatch export-deid`): the current processed studies'
source images, SEG and SR, de-identified by the DICOM PS3.15 Annex E Basic Application
Level Confidentiality Profile, plus tables a research team and the training subsystem use.

    for each study (one dicognito Anonymizer for the whole export, keyed by `deid.key_env`):
        source images, SEG, SR  -> dicognito: UIDs, names, IDs, addresses, institution,
                                   station, dates replaced, the same way in every object,
                                   so the SEG's and SR's references still resolve
                                -> PS3.15 Table E.1-1 (DICOM 2026c, `table()`), attribute
                                   by attribute at any depth of sequences: X removed, Z
                                   emptied, D dummy, U a keyed new UID (dicognito's pseudonym
                                   stands for D, Z and U where it made one); composite
                                   actions keep what the exported IOD requires; curve and
                                   overlay groups (50xx, 60xx: burned-in text in their bits)
                                   and private attributes removed; Software Versions too
                                -> dates: shifted by one offset per key when
                                   deid.retain_modified_dates (Retain Longitudinal Temporal
                                   Information with Modified Dates, E.3.6), else the table's
                                   action (removed, emptied or a dummy)
                                -> PatientIdentityRemoved YES, DeidentificationMethod and its
                                   code sequence (113100, and 113107 with modified dates)
        OUT/dicom/<study>/<object>.dcm, OUT/images/<image>.png (what the training reads)
    OUT/labels.csv     the curation format (cxrbatch_training/data.py): Image Index, Patient ID, one
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
import functools
import hashlib
import hmac
import importlib
import io
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import cv2
import pydicom
from dicognito.anonymizer import Anonymizer
from pydicom import valuerep
from pydicom.dataset import Dataset

import cxrbatch
from cxrbatch.config import DeidSettings
from cxrbatch.db import Sessions, reads
from cxrbatch.dicom.decode import decode_dataset
from cxrbatch.dicom.discover import read_header
from cxrbatch.dicom.export import write_dicom
from cxrbatch.domain import InstanceHeader, OutcomeStatus
from cxrbatch.errors import ConfigError, one_line
from cxrbatch.files import atomic_write
from cxrbatch.paths import StorageRoots, is_inside, uid_path_component

log = logging.getLogger(__name__)

LABELS = ("Mass", "Nodule", "Pneumonia", "Edema", "Fibrosis", "No Finding")

# PS3.15 Table E.1-1, attribute by attribute, as transcribed from DICOM 2026c by
# dicom-anonymizer (Kitware; cross-checked against innolitics' independent transcription:
# the same attributes, 2026c adds 34 newer ones). Its actions: D dummy, Z empty, X remove,
# U new UID, and the composite ones (X/Z, X/D, X/Z/D, Z/D, X/Z/U*) that remove unless the
# object's IOD requires the attribute. Masks cover the curve (50xx) and overlay (60xx)
# groups.
TABLE_SOURCE = "dicomfields_2026c"
# Beyond the table: text that identifies a site's device, seen in real exports.
BEYOND_TABLE = {0x00181020: "X/D"}  # Software Versions (the source's; also in SEG/SR
# Contributing Equipment, copied there by highdicom)
# Attributes of the exported IODs (CR/DX image, SEG, Comprehensive 3D SR) that the table
# lists and the IOD requires at the top level: Type 1 get a dummy, Type 2 an empty value.
_TYPE1 = {
    0x00080023,  # Content Date (SEG, SR)
    0x00080033,  # Content Time
    0x00181000,  # Device Serial Number (SEG Enhanced General Equipment)
    0x00181020,  # Software Versions (SEG Enhanced General Equipment)
}
_TYPE2 = {
    0x00080020,  # Study Date
    0x00080030,  # Study Time
    0x00080050,  # Accession Number
    0x00080090,  # Referring Physician's Name
    0x00100010,  # Patient's Name
    0x00100020,  # Patient ID
    0x00100030,  # Patient's Birth Date
    0x00100040,  # Patient's Sex
    0x00200010,  # Study ID
    0x00081111,  # Referenced Performed Procedure Step Sequence (SR)
    0x0040A370,  # Referenced Request Sequence (SR)
}
# Kept, as cleaned (the Clean Structured Content / Graphics options): the content cxrbatch
# itself wrote into its SR and SEG (its items pass through the table like any other).
_CLEANED = {
    0x0040A730,  # Content Sequence (the SR's findings, made here)
    0x00700001,  # Graphic Annotation Sequence (made here)
}
_BURNED_IN_GROUPS = (0x5000, 0x6000)
# Type 1C attributes present only with another one that the table removes (PS3.3
# Clinical Trial Subject: the committee's name only with its approval number).
_PRESENT_ONLY_WITH = {0x00120081: 0x00120082}
# What an item of a reference sequence (Source Image, Referenced Image: X/Z/U*) keeps.
_REFERENCE = {
    "ReferencedSOPClassUID",
    "ReferencedSOPInstanceUID",
    "ReferencedFrameNumber",
    "ReferencedSegmentNumber",
    "PurposeOfReferenceCodeSequence",
    "SpatialLocationsPreserved",
}  # curves and overlays: whole repeating groups removed
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CLEAN_STRUCTURED_CONTENT = ("113104", "Clean Structured Content Option")
DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
_DATES = frozenset(DUMMY)
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
        seed = key or secrets.token_hex(32)
        self._anonymizer = Anonymizer(seed=seed)
        self._uid_key = hashlib.sha256(("uid:" + seed).encode()).digest()
        self.settings = settings

    def __call__(self, ds: Dataset, produced: bool = False) -> Dataset:
        """A de-identified copy of `ds`: dicognito's pseudonyms (the same in every object
        of the export), then Table E.1-1's action for every attribute it lists, at any
        depth; private attributes, curves and overlays removed; the profile recorded.
        `produced`: an object cxrbatch wrote (SEG, SR), whose structured content is its
        own and is kept (cleaned) where the table says D."""
        original = copy.deepcopy(ds)
        ds = copy.deepcopy(ds)
        _dates_that_parse(ds)
        self._anonymizer.anonymize(ds)  # shifts dates by the key's offset
        changed = _changed(original, ds)
        if produced:
            _uids_in_text(original, ds)
        ds.remove_private_tags()
        _apply_table(
            ds, changed, self.settings.retain_modified_dates, self._new_uid, produced, top=True
        )
        ds.PatientIdentityRemoved = "YES"
        methods = [BASIC_PROFILE]
        if self.settings.retain_modified_dates:
            methods.append(MODIFIED_DATES)
        methods.append(CLEAN_STRUCTURED_CONTENT)
        ds.DeidentificationMethod = "PS3.15 E.1 Basic Profile, Table E.1-1 (cxrbatch)" + (
            ", modified dates" if self.settings.retain_modified_dates else ""
        )
        ds.DeidentificationMethodCodeSequence = [
            _code(value, meaning) for value, meaning in methods
        ]
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self.settings.retain_modified_dates else "REMOVED"
        )
        return ds

    def _new_uid(self, uid: str) -> str:
        """A UID the table says to replace that dicognito left: a keyed one (the same in
        every object of the export, so references between them hold)."""
        digest = hmac.new(self._uid_key, uid.encode(), hashlib.sha256).hexdigest()
        return f"2.25.{int(digest[:30], 16)}"


def _dates_that_parse(ds: Dataset) -> None:
    """A date or time that is none (archives send "20261301", "1700000523") becomes the
    dummy: dicognito cannot shift it, and it tells nothing worth keeping."""
    parsers = {"DA": valuerep.DA, "TM": valuerep.TM, "DT": valuerep.DT}

    def fix(_dataset: Dataset, element: pydicom.DataElement) -> None:
        if element.VR not in parsers or element.value in (None, ""):
            return
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                parsers[element.VR](str(value))
        except ValueError:
            element.value = DUMMY[element.VR]

    ds.walk(fix)


def table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """PS3.15 Table E.1-1: {tag: action} and the masked entries (group, element, group
    mask, element mask, action), from dicom-anonymizer's transcription."""
    return _table()


@functools.cache
def _table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    module = importlib.import_module(
        f"dicomanonymizer.dicom_anonymization_databases.{TABLE_SOURCE}"
    )
    groups = {
        "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
        "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D",
        "X_Z_U_STAR_TAGS": "X/Z/U*",
    }  # fmt: skip
    tags: dict[int, str] = {}
    masks: list[tuple[int, int, int, int, str]] = []
    for name, action in groups.items():
        for entry in getattr(module, name):
            if len(entry) == 2:
                tags[(entry[0] << 16) | entry[1]] = action
            else:
                masks.append((entry[0], entry[1], entry[2], entry[3], action))
    tags.update(BEYOND_TABLE)
    return tags, masks


Where = tuple[int, ...]  # where an element is: tags and item numbers down to it


def _walk(ds: Dataset, path: Where = ()) -> Iterator[tuple[Where, pydicom.DataElement]]:
    for element in ds:
        here = (*path, int(element.tag))
        yield here, element
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                yield from _walk(item, (*here, index))


_TEXT = frozenset({"ST", "LT", "UT", "LO", "SH", "UC"})


def _uids_in_text(before: Dataset, after: Dataset) -> None:
    """Text cxrbatch wrote that names an instance by its UID (the SR's QC notes) names it
    by its new UID: dicognito replaces UIDs in UID attributes, not inside text."""
    old = {path: element.value for path, element in _walk(before) if element.VR == "UI"}
    mapping = {
        str(old[path]): str(element.value)
        for path, element in _walk(after)
        if element.VR == "UI" and path in old and old[path] != element.value
    }
    if not mapping:
        return
    for _, element in _walk(after):
        if element.VR in _TEXT and isinstance(element.value, str):
            for uid, new in mapping.items():
                if uid in element.value:
                    element.value = element.value.replace(uid, new)


def _changed(before: Dataset, after: Dataset) -> set[Where]:
    """Where dicognito replaced a value (a pseudonym, a new UID, a shifted date)."""
    old = {path: element.value for path, element in _walk(before) if element.VR != "SQ"}
    return {
        path
        for path, element in _walk(after)
        if element.VR != "SQ" and path in old and old[path] != element.value
    }


def _action(tag: int) -> str | None:
    tags, masks = table()
    found = tags.get(tag)
    if found is not None:
        return found
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gmask, emask, action in masks:
        if group & gmask == g and element & emask == e:
            return action
    return None


def _apply_table(
    ds: Dataset,
    changed: set[Where],
    modified_dates: bool,
    new_uid: Callable[[str], str],
    produced: bool,
    top: bool,
    path: Where = (),
) -> None:
    """Table E.1-1's action on every listed attribute of `ds` and of its items."""

    def inside(element: pydicom.DataElement, here: Where) -> None:
        for index, item in enumerate(element.value):
            _apply_table(item, changed, modified_dates, new_uid, produced, False, (*here, index))

    for element in list(ds):
        tag = int(element.tag)
        here = (*path, tag)
        if (tag >> 16) & 0xFF00 in _BURNED_IN_GROUPS:
            del ds[tag]  # a curve or overlay plane: its data, text and labels
            continue
        action = _action(tag)
        if action is None or (produced and tag in _CLEANED):
            if element.VR == "SQ":
                inside(element, here)
            continue
        if element.VR in _DATES and modified_dates and here in changed:
            continue  # the modified dates option: dicognito's shift kept
        resolved = _resolve(action, tag, top)
        pseudonym = here in changed and element.VR not in _DATES
        if resolved == "X":
            del ds[tag]
        elif pseudonym and resolved in ("D", "Z", "U"):
            continue  # dicognito's pseudonym is the dummy (consistent across objects)
        elif resolved == "Z" and element.VR in _DATES:
            element.value = DUMMY[element.VR]  # Z allows a dummy: dates stay readable
        elif resolved == "Z":
            element.value = [] if element.VR == "SQ" else ""
        elif resolved == "U":
            element.value = new_uid(str(element.value))
        elif element.VR == "SQ" and resolved == "U*":
            # References kept: each item holds only what points at the instance, its UIDs
            # replaced.
            for item in element.value:
                for kept in list(item):
                    if kept.keyword not in _REFERENCE:
                        del item[kept.tag]
            inside(element, here)
        elif element.VR == "SQ":  # D on someone else's sequence: an empty one
            element.value = []
        else:
            element.value = _dummy(element.VR, tag)
    for tag, condition in _PRESENT_ONLY_WITH.items():
        if tag in ds and condition not in ds:
            del ds[tag]


def _resolve(action: str, tag: int, top: bool) -> str:
    """One action of a composite one: X unless the IOD requires the attribute (top level:
    Type 1 gets D, Type 2 gets Z); X/Z/U*: kept, its UIDs replaced."""
    if "/" not in action:
        return action
    if action == "X/Z/U*":
        # References to other instances (Source Image, Referenced Image): kept, the UIDs
        # in their items replaced (U), so a SEG still points at its exported image.
        return "U*"
    options = action.split("/")
    if top and tag in _TYPE1 and "D" in options:
        return "D"
    if top and (tag in _TYPE2 or tag in _TYPE1) and "Z" in options:
        return "Z"
    if "X" in options:
        return "X"
    return "D" if top and tag in _TYPE1 else options[0]


def _dummy(vr: str, tag: int) -> object:
    if vr in DUMMY:
        return DUMMY[vr]
    if tag == 0x00181020:
        return f"cxrbatch {cxrbatch.__version__}"  # this software's, not the site's
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS", "SV", "UV"):
        return 0
    if vr == "UI":
        return "2.25.0"
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b""
    return "DEIDENTIFIED" if vr != "AS" else "000Y"


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


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
    where = reads.OutcomeFilter(since=since, triage=triage, status=OutcomeStatus.PROCESSED.value)
    with sessions() as session:
        studies = reads.exported_studies(session, where, roots)
    out.mkdir(parents=True, exist_ok=True)
    done = Exported()
    labels: list[dict[str, object]] = []
    table: list[dict[str, object]] = []
    mapped: list[dict[str, str]] = []
    for study in studies:
        files: list[Path] = []
        try:
            written = _export_study(study, deidentify, out, done, files)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # A header the de-identification cannot handle: that study is left out (the
            # files already written for it are removed), the export goes on.
            for path in files:
                path.unlink(missing_ok=True)
            done.left_out.append(f"study {study.study_instance_uid}: {one_line(exc)}")
            log.warning("study left out of the export: %s", one_line(exc))
            continue
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
class _Written:
    mapping: dict[str, str]
    labels: list[dict[str, object]]
    outcomes: list[dict[str, object]]


def _export_study(
    study: reads.ExportedStudy,
    deidentify: Deidentifier,
    out: Path,
    done: Exported,
    files: list[Path],
) -> _Written | None:
    """Write one study's de-identified objects and images (`files` lists what was written,
    so a failure part way can take them back)."""
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
        files.append(folder / f"{uid_path_component(str(clean.SOPInstanceUID))}.dcm")
        write_dicom(files[-1], clean)
        image_index = f"{uid_path_component(str(clean.SOPInstanceUID))}.png"
        pixels = decode_dataset(clean, header).pixels
        ok, png = cv2.imencode(".png", pixels)
        if not ok:
            raise OSError(f"image {sop_uid} cannot be encoded as PNG")
        files.append(out / "images" / image_index)
        _write_bytes(files[-1], png.tobytes())
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
        clean = deidentify(ds, produced=True)
        folder = out / "dicom" / uid_path_component(str(clean.StudyInstanceUID))
        files.append(folder / f"{uid_path_component(str(clean.SOPInstanceUID))}.dcm")
        write_dicom(files[-1], clean)
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

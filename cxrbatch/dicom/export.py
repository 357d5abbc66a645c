"""Writing a study's outputs atomically under OUT/<StudyInstanceUID>/.

Every file is written to a temporary name in the same folder, fsynced and renamed, so a
reader (or a crash) never sees a half-written file.

A queue worker writes into a staging folder of its attempt instead
(OUT/<StudyInstanceUID>/.staging-<attempt>-<nonce>/) and publishes the files into the
study's folder only while it holds the job's lease, in the transaction that records the
outcome (`cxrbatch.worker.QueueWorker.process_claim`): a worker whose lease was taken
over discards its staging folder and leaves nothing beside the new holder's outputs.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import valuerep
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from cxrbatch.domain import FindingMap, ModelRef, OutputFiles
from cxrbatch.errors import OutputError
from cxrbatch.files import atomic_write, fsync_dir
from cxrbatch.paths import inside, uid_path_component

# Type 2 attributes of the Patient and General Study modules that the SEG, SR, key image
# and rejection note copy from their source. Many archives omit them; an output must carry
# them (empty where unknown), and highdicom reads them without a default.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def reference_header(source: Dataset) -> Dataset:
    """A copy of a source header to build outputs from (the source is left as it is):
    missing Type 2 patient and study attributes present and empty (as the standard has it
    for unknown values); one that the builders would refuse, though archives send it (a
    PatientName with a backslash: several values where the IOD defines one; a StudyDate
    that is no date), given a value they accept: its first value, or empty.
    `carry_identity` puts the received values back afterwards."""
    # A new element table (Dataset(source) and copy.copy share the source's); elements
    # are replaced, never assigned to (that would change the source's element).
    header = Dataset(dict(source.items()))
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    implicit, little = source.original_encoding
    if implicit is not None and little is not None:
        header.set_original_encoding(implicit, little, source.original_character_set)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
            continue
        accepted = _accepted(header[keyword])
        if accepted is not None:
            del header[keyword]  # a new element: the source's keeps its values
            setattr(header, keyword, accepted)
    return header


def _accepted(element: DataElement) -> object | None:
    """A value the output builders accept in place of the received one, or None when the
    received one is fine."""
    if element.VM > 1:
        first: object = element.value[0]
        return first
    if element.keyword == "PatientSex" and str(element.value).strip() not in ("M", "F", "O", ""):
        return ""  # "U", "Unknown" ... are seen; the enumerated values are M, F, O
    if element.VR in ("DA", "TM") and element.value:
        try:
            (valuerep.DA if element.VR == "DA" else valuerep.TM)(str(element.value))
        except ValueError:
            return ""
    return None


def carry_identity(output: Dataset, source: Dataset) -> Dataset:
    """The output's patient and study attributes exactly as the source holds them where
    `reference_header` had to give the builders another value (value multiplicity and
    text kept as received): a PACS files an output with its source's patient and study
    only when they are identical."""
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword in source and keyword in output and _accepted(source[keyword]) is not None:
            setattr(output, keyword, copy.deepcopy(source[keyword].value))
    return output


def text(value: object) -> str:
    """A header value as text, as DICOM encodes it: several values joined by a backslash
    (never a Python list's repr); None is empty."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(text(v) for v in value)
    return str(value)


def study_dir(out_root: Path, study_instance_uid: str) -> Path:
    return inside(out_root, out_root / uid_path_component(study_instance_uid))


STAGING_PREFIX = ".staging-"


def staging_dir(out_root: Path, study_instance_uid: str, attempt: int) -> Path:
    """A new staging folder name for one attempt at a study (created by the first write)."""
    folder = study_dir(out_root, study_instance_uid)
    return folder / f"{STAGING_PREFIX}{attempt}-{uuid.uuid4().hex[:12]}"


def publish(outputs: OutputFiles | None, staging: Path) -> OutputFiles | None:
    """Move a staged attempt's files into the study's folder (each an atomic rename on
    one file system), remove the staging folder and any other attempt's leftovers (the
    caller holds the job, so they belong to workers that lost it). Returns the outputs
    at their published paths."""
    folder = staging.parent
    published = None if outputs is None else outputs.moved_to(folder)
    try:
        if outputs is not None and published is not None:
            staged = [*outputs.dicom_files(), *outputs.finding_map_files.values()]
            staged += [outputs.json_file] if outputs.json_file else []
            staged += [outputs.withdrawal.file] if outputs.withdrawal else []
            for path in staged:
                os.replace(path, folder / path.name)
            fsync_dir(folder)
    except OSError as exc:
        raise OutputError(f"Cannot publish the outputs into {folder.name}: {exc}") from exc
    for leftover in folder.glob(f"{STAGING_PREFIX}*") if folder.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)
    return published


def discard(staging: Path) -> None:
    """Remove a staged attempt that must not be published (its lease was lost)."""
    shutil.rmtree(staging, ignore_errors=True)


def write_dicom(path: Path, ds: Dataset) -> Path:
    return atomic_write(path, lambda handle: ds.save_as(handle, enforce_file_format=True))


def identity(ds: Dataset) -> dict[str, str]:
    """The UIDs of a DICOM output, as `deliveries.objects` keeps them (taken from the
    object the writer built: nothing is read back)."""
    return {
        "study": str(ds.StudyInstanceUID),
        "series": str(ds.SeriesInstanceUID),
        "sop_class": str(ds.SOPClassUID),
        "sop_instance": str(ds.SOPInstanceUID),
    }


def write_json(path: Path, document: dict[str, Any]) -> Path:
    text = json.dumps(document, indent=2, sort_keys=False).encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(text))


def write_maps(path: Path, maps: Sequence[FindingMap]) -> Path:
    """One image's finding maps for the web study page (`read_maps`): each activation as
    float16 at the network's input size, and what it says in a JSON header. Not DICOM and
    never sent: the DICOM objects carry the regions."""
    header = [
        {
            "label": m.label,
            "probability": m.probability,
            "threshold": m.threshold,
            "box": list(m.box),
            "model": m.model.as_dict(),
        }
        for m in maps
    ]
    arrays: dict[str, Any] = {
        f"map{i}": m.activation.astype(np.float16) for i, m in enumerate(maps)
    }
    arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    return atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))


def read_maps(path: Path) -> list[FindingMap]:
    """The finding maps `write_maps` wrote (ValueError or OSError when it cannot)."""
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(bytes(data["header"]).decode("utf-8"))
        return [
            FindingMap(
                label=str(entry["label"]),
                probability=float(entry["probability"]),
                threshold=float(entry["threshold"]),
                model=ModelRef.from_dict(entry["model"]),
                activation=data[f"map{i}"].astype(np.float32),
                box=tuple(int(v) for v in entry["box"]),  # type: ignore[arg-type]
            )
            for i, entry in enumerate(header)
        ]

"""Writing a study's outputs atomically under OUT/<StudyInstanceUID>/.

Every file is written to a temporary name in the same folder, fsynced and renamed, so a
reader (or a crash) never sees a half-written file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from cxrbatch.files import atomic_write
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
    """A copy of a source header to build outputs from: missing Type 2 patient and study
    attributes present and empty (as the standard has it for unknown values)."""
    header = copy.copy(source)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def study_dir(out_root: Path, study_instance_uid: str) -> Path:
    return inside(out_root, out_root / uid_path_component(study_instance_uid))


def write_dicom(path: Path, ds: Dataset) -> Path:
    return atomic_write(path, lambda handle: ds.save_as(handle, enforce_file_format=True))


def write_json(path: Path, document: dict[str, Any]) -> Path:
    text = json.dumps(document, indent=2, sort_keys=False).encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(text))

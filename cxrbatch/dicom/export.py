"""Writing a study's outputs atomically under OUT/<StudyInstanceUID>/.

Every file is written to a temporary name in the same folder, fsynced and renamed, so a
reader (or a crash) never sees a half-written file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from cxrbatch.files import atomic_write
from cxrbatch.paths import inside, uid_path_component


def study_dir(out_root: Path, study_instance_uid: str) -> Path:
    return inside(out_root, out_root / uid_path_component(study_instance_uid))


def write_dicom(path: Path, ds: Dataset) -> Path:
    return atomic_write(path, lambda handle: ds.save_as(handle, enforce_file_format=True))


def write_json(path: Path, document: dict[str, Any]) -> Path:
    text = json.dumps(document, indent=2, sort_keys=False).encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(text))

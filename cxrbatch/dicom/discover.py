"""Walk an input folder, read every file's header, group instances by study.

Nothing here raises on bad input: a file that cannot be used becomes a `RejectedFile`
with a human-readable reason, and the walk goes on.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from cxrbatch.dicom import export
from cxrbatch.dicom.identity import same_instance
from cxrbatch.domain import InstanceHeader, RejectedFile, StudyInput
from cxrbatch.errors import one_line
from cxrbatch.files import sha256_file

log = logging.getLogger(__name__)

# PS3.5 9.1: digits and dots, no leading zeros in components (tolerated), at most 64 chars.
_VALID_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "InstanceNumber",
    "AccessionNumber",
    "PatientID",
    "PatientName",
    "StudyDate",
]


MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
DICOMDIR_REASON = (
    "skipped: a DICOMDIR (media directory), not an instance; the files it lists are taken "
    "on their own"
)


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under `root` at any depth, in a stable order (a DICOMDIR too:
    `read_header` records it as skipped).

    Symbolic links are not followed (a link could point outside the export folder).
    """
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            yield path


def _text(value: object) -> str | None:
    """A header value as DICOM writes it (several values joined by a backslash), or None."""
    return export.text(value).strip() or None


def read_header(path: Path) -> InstanceHeader | RejectedFile:
    """Read one file's header; return why it is unusable instead of raising."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return RejectedFile(path, f"cannot stat file: {exc.strerror}")
    if size == 0:
        return RejectedFile(path, "empty file (0 bytes)")
    try:
        sha = sha256_file(path)
    except OSError as exc:
        return RejectedFile(path, f"cannot read file: {exc.strerror}")
    if path.name.upper() == "DICOMDIR":
        return RejectedFile(path, DICOMDIR_REASON, sha, quarantine=False)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=None)
    except InvalidDicomError:
        return RejectedFile(path, "not a DICOM file (no DICM preamble or readable data set)", sha)
    except Exception as exc:  # pydicom raises many types on corrupt headers
        # pydicom's messages may carry a whole traceback (tag_in_exception): one line only.
        return RejectedFile(path, f"unreadable DICOM header: {one_line(exc)}", sha)
    try:
        # Elements are decoded on first access: a corrupt one raises here, not at dcmread
        # (e.g. an unknown VR in the file meta: NotImplementedError).
        meta = getattr(ds, "file_meta", None)
        media_class = getattr(meta, "MediaStorageSOPClassUID", None)
        if media_class == MEDIA_STORAGE_DIRECTORY:
            return RejectedFile(path, DICOMDIR_REASON, sha, quarantine=False)
        values = {tag: _text(ds.get(tag)) for tag in _HEADER_TAGS}
        transfer_syntax = _text(getattr(meta, "TransferSyntaxUID", None))
    except Exception as exc:
        return RejectedFile(path, f"unreadable DICOM header element: {type(exc).__name__}", sha)
    missing = [
        t
        for t in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")
        if not values[t]
    ]
    if missing:
        return RejectedFile(
            path,
            f"DICOM header lacks required attribute(s) {', '.join(missing)}",
            sha,
            study_instance_uid=values["StudyInstanceUID"],
            sop_instance_uid=values["SOPInstanceUID"],
        )
    invalid = [
        t
        for t in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")
        if values[t] and (not _VALID_UID.match(str(values[t])) or len(str(values[t])) > 64)
    ]
    if invalid:
        return RejectedFile(path, f"invalid UID syntax in {', '.join(invalid)}", sha)
    number = values["InstanceNumber"]
    return InstanceHeader(
        path=path,
        sha256=sha,
        sop_instance_uid=str(values["SOPInstanceUID"]),
        sop_class_uid=str(values["SOPClassUID"]),
        study_instance_uid=str(values["StudyInstanceUID"]),
        series_instance_uid=values["SeriesInstanceUID"] or "",
        modality=(values["Modality"] or "").upper(),
        body_part_examined=values["BodyPartExamined"],
        view_position=(values["ViewPosition"] or None) and str(values["ViewPosition"]).upper(),
        transfer_syntax_uid=transfer_syntax or "",
        instance_number=int(number) if number and number.lstrip("-").isdigit() else None,
        accession_number=values["AccessionNumber"],
        patient_id=values["PatientID"],
        patient_name=values["PatientName"],
        study_date=_date(values["StudyDate"]),
    )


def _date(value: str | None) -> dt.date | None:
    """A DA value (YYYYMMDD); anything else (malformed, a range) is no date."""
    if value is None or len(value) != 8 or not value.isdigit():
        return None
    try:
        return dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def group_by_study(
    headers: Iterable[InstanceHeader],
) -> tuple[list[StudyInput], list[RejectedFile]]:
    """Group instances by StudyInstanceUID.

    The same SOPInstanceUID twice in one batch: a copy of the same data set (the same file,
    or the same content in another transfer syntax or from another writer:
    cxrbatch/dicom/identity.py) is dropped silently (recorded as a duplicate, not
    quarantined); different content under the same UID is a conflict, recorded and
    quarantined, and the first file seen is kept.
    """
    by_study: dict[str, dict[str, InstanceHeader]] = defaultdict(dict)
    duplicates: list[RejectedFile] = []
    for header in headers:
        seen = by_study[header.study_instance_uid].get(header.sop_instance_uid)
        if seen is None:
            by_study[header.study_instance_uid][header.sop_instance_uid] = header
            continue
        same = seen.sha256 == header.sha256 or same_instance(seen.path, header.path)
        duplicates.append(
            RejectedFile(
                header.path,
                "duplicate of an identical instance already in this batch"
                if same
                else "conflict: same SOPInstanceUID as another file with different content",
                header.sha256,
                quarantine=not same,
                study_instance_uid=header.study_instance_uid,
                sop_instance_uid=header.sop_instance_uid,
            )
        )
    studies = [
        StudyInput(uid, tuple(instances.values())) for uid, instances in sorted(by_study.items())
    ]
    return studies, duplicates


def discover(root: Path) -> tuple[list[StudyInput], list[RejectedFile]]:
    """Read every file under `root`: the studies found and the files rejected."""
    headers: list[InstanceHeader] = []
    rejected: list[RejectedFile] = []
    for path in iter_files(root):
        result = read_header(path)
        if isinstance(result, RejectedFile):
            log.info("rejected input file: %s", result.reason)
            rejected.append(result)
        else:
            headers.append(result)
    studies, duplicates = group_by_study(headers)
    return studies, rejected + duplicates

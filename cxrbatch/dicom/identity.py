"""Is a second file with a known SOPInstanceUID the same instance, or a conflict?

A file's SHA-256 covers its file meta header (transfer syntax, ImplementationClassUID of
whoever wrote it) and the encoding of every element, so the same data set exported to a
folder by one application and sent by C-STORE through another, or sent once in Explicit
and once in Implicit VR Little Endian, hashes differently. Identity is decided here by
content instead:

1. The data set without its file meta (group 0002) and without Pixel Data is hashed
   canonically: per element its tag and its value bytes as stored (the same in Implicit
   and Explicit VR Little Endian), sequences item by item, so VR headers, explicit or
   undefined lengths and the writer's file meta do not count.
2. Pixel Data: the stored bytes are compared when both files have the same transfer
   syntax; when the syntaxes differ, both are decoded and the pixel arrays compared
   (a lossless re-encoding is the same instance; a lossy one is not).

Equal on both = the same instance (a duplicate, dropped and counted); anything else is
a conflict (quarantined). A known file that can no longer be read (a read-only export
folder that was cleaned) cannot be compared: that is a conflict too, as before.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

PIXEL_DATA = 0x7FE00010


def _vr(element: Any, tag: Any) -> str:
    if element.VR:
        return str(element.VR)
    try:
        return str(dictionary_VR(tag))
    except KeyError:  # a private element read in Implicit VR
        return "UN"


def _update(digest: Any, ds: Dataset) -> None:
    for tag in sorted(ds.keys()):
        if tag.group == 0x0002 or tag == PIXEL_DATA:
            continue
        element = ds.get_item(tag)  # a raw element keeps its value bytes as stored
        digest.update(struct.pack("<I", int(tag)))
        if _vr(element, tag) == "SQ":
            items = ds[tag].value
            digest.update(struct.pack("<I", len(items)))
            for item in items:
                digest.update(b"\xfe\xff\x00\xe0")
                _update(digest, item)
            continue
        value = element.value
        raw = bytes(value) if isinstance(value, bytes | bytearray) else _encoded(ds, tag)
        digest.update(struct.pack("<I", len(raw)))
        digest.update(raw)


def _encoded(ds: Dataset, tag: int) -> bytes:
    """Value bytes of an element that pydicom already converted (Explicit VR LE)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_data_element(buffer, ds[tag])
    return bytes(buffer.getvalue()[8:])  # after the implicit VR tag + length header


def dataset_sha256(ds: Dataset) -> str:
    """The canonical hash of a data set without its file meta and Pixel Data."""
    digest = hashlib.sha256()
    _update(digest, ds)
    return digest.hexdigest()


def same_instance(known: Path, offered: Path) -> bool:
    """Whether two files hold the same data set (see the module docstring)."""
    try:
        a, b = pydicom.dcmread(known), pydicom.dcmread(offered)
    except Exception as exc:
        log.info("instances cannot be compared (%s): treated as different", type(exc).__name__)
        return False
    if dataset_sha256(a) != dataset_sha256(b):
        return False
    if ("PixelData" in a) != ("PixelData" in b):
        return False
    if "PixelData" not in a:
        return True
    syntax_a = getattr(a.file_meta, "TransferSyntaxUID", None)
    syntax_b = getattr(b.file_meta, "TransferSyntaxUID", None)
    if syntax_a == syntax_b:
        return bytes(a.PixelData) == bytes(b.PixelData)
    try:
        return bool(np.array_equal(a.pixel_array, b.pixel_array))
    except Exception as exc:
        log.info("pixel data cannot be decoded for comparison (%s)", type(exc).__name__)
        return False

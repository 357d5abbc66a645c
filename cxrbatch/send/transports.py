"""Transports that deliver DICOM files to a destination: C-STORE (DIMSE) and STOW-RS.

Both send every file of a delivery and raise `SendError` with the reason when any is not
acknowledged; the delivery is then retried as a whole (a PACS stores an identical SOP
instance again without harm).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from cxrbatch.config import Destination
from cxrbatch.dicom import status as dimse_status
from cxrbatch.errors import CxrBatchError

log = logging.getLogger(__name__)

# STOW-RS (PS3.18 10.5.3): FailedSOPSequence in the response lists what was not stored.
_FAILED_SOP_SEQUENCE = "00081198"


class SendError(CxrBatchError):
    """A destination did not acknowledge every object of a delivery."""


def send(destination: Destination, files: Sequence[Path], calling_ae_title: str) -> None:
    """Deliver `files` to `destination`; raises SendError with the reason otherwise."""
    datasets = [_read(path) for path in files]
    if destination.transport == "dimse":
        c_store(destination, datasets, calling_ae_title)
    else:
        stow_rs(destination, files)


def _read(path: Path) -> Dataset:
    try:
        return dcmread(path)
    except FileNotFoundError as exc:
        raise SendError(f"output file missing: {path.name}") from exc
    except (OSError, InvalidDicomError) as exc:
        raise SendError(f"output file unreadable: {path.name}: {exc}") from exc


def _client_ssl_context(destination: Destination) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if destination.tls_ca_certificates:
        try:
            context.load_verify_locations(destination.tls_ca_certificates)
        except (OSError, ssl.SSLError) as exc:
            raise SendError(f"TLS CA file cannot be used: {exc}") from exc
    return context


def c_store(destination: Destination, datasets: Sequence[Dataset], calling_ae_title: str) -> None:
    """One association, one C-STORE per data set."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_seconds
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (_client_ssl_context(destination), destination.host) if destination.tls else None
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        # pynetdicom reports a refused or timed-out connection as an abort, too.
        what = (
            "rejected by the peer"
            if assoc.is_rejected
            else "could not be established (no connection, or aborted by the peer)"
        )
        raise SendError(f"association with {where} {what}")
    refused: list[str] = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if "Status" in status else None
            if code is None:
                refused.append(f"{ds.Modality} {ds.SOPInstanceUID}: no response")
                break  # the association is gone
            if not dimse_status.stored(code):
                refused.append(f"{ds.Modality} {ds.SOPInstanceUID}: {dimse_status.describe(code)}")
    finally:
        if assoc.is_established:
            assoc.release()
    if refused:
        raise SendError(
            f"{where} stored {len(datasets) - len(refused)} of {len(datasets)} objects; "
            + "; ".join(refused[:3])
        )


def stow_rs(destination: Destination, files: Sequence[Path]) -> None:
    """One STOW-RS request (POST {url}/studies, multipart/related application/dicom)."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for path in files:
        parts.append(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
        )
    body = b"\r\n".join(parts) + f"\r\n--{boundary}--\r\n".encode()
    url = destination.url.rstrip("/") + "/studies"
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header(
        "Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}'
    )
    request.add_header("Accept", "application/dicom+json")
    if destination.username:
        password = os.environ.get(destination.password_env, "") if destination.password_env else ""
        token = base64.b64encode(f"{destination.username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = _client_ssl_context(destination) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(
            request, timeout=destination.timeout_seconds, context=context
        ) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        raise SendError(f"STOW-RS to {url}: HTTP {exc.code} {exc.reason}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise SendError(f"STOW-RS to {url}: {getattr(exc, 'reason', exc)}") from exc
    failed = _failed_sops(payload)
    if status not in (200, 202) or failed:
        raise SendError(
            f"STOW-RS to {url}: HTTP {status}, {failed} of {len(files)} objects not stored"
        )


def _failed_sops(payload: bytes) -> int:
    """The number of items in the response's FailedSOPSequence (0 when there is none)."""
    try:
        document = json.loads(payload or b"{}")
    except ValueError:
        return 0  # a non-JSON 200 answer: nothing reported as failed
    if isinstance(document, list):
        document = document[0] if document else {}
    failed = document.get(_FAILED_SOP_SEQUENCE, {}) if isinstance(document, dict) else {}
    return len(failed.get("Value", [])) if isinstance(failed, dict) else 0

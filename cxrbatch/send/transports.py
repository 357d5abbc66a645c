"""Transports that deliver results to a destination: DICOM files by C-STORE (DIMSE) or
STOW-RS; reports (cxrbatch/send/messages.py) by HL7 v2 over MLLP or a FHIR transaction.

Each raises `SendError` with the reason when the destination does not acknowledge all of a
delivery; the delivery is then retried as a whole (a PACS stores an identical SOP instance
again without harm; an HL7 receiver sees the same accession's result again; the FHIR
Bundle's conditional updates replace what an earlier attempt stored).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from cxrbatch.config import Destination, password_from
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


def _basic_auth(request: urllib.request.Request, destination: Destination) -> None:
    if destination.username:
        password = password_from(destination.password_env)
        token = base64.b64encode(f"{destination.username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")


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
    status, payload = _post(
        destination,
        url,
        body,
        f'multipart/related; type="application/dicom"; boundary={boundary}',
        "application/dicom+json",
        "STOW-RS to",
        lambda answer: answer[:300].decode("utf-8", "replace"),
    )
    failed = _failed_sops(payload)
    if status not in (200, 202) or failed:
        raise SendError(
            f"STOW-RS to {url}: HTTP {status}, {failed} of {len(files)} objects not stored"
        )


def _post(
    destination: Destination,
    url: str,
    body: bytes,
    content_type: str,
    accept: str,
    what: str,
    detail: Callable[[bytes], str],
) -> tuple[int, bytes]:
    """One HTTP POST (basic auth, TLS as configured): the status and the answer; SendError
    naming `what` and the URL for an HTTP error (with `detail` of its body) or no answer."""
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", content_type)
    request.add_header("Accept", accept)
    _basic_auth(request, destination)
    context = _client_ssl_context(destination) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(
            request, timeout=destination.timeout_seconds, context=context
        ) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        raise SendError(
            f"{what} {url}: HTTP {exc.code} {exc.reason}: {detail(exc.read())}"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise SendError(f"{what} {url}: {getattr(exc, 'reason', exc)}") from exc


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


# -- HL7 v2 over MLLP ---------------------------------------------------------------------------

# MLLP (HL7 v2 Minimal Lower Layer Protocol, HL7 2.5 appendix C): <VT> message <FS><CR>.
# Written here because the kept clients do not fit: python-hl7's MLLPClient has no timeout
# and returns whatever one recv() gives; hl7apy ships only a server.
MLLP_START, MLLP_END = b"\x0b", b"\x1c\x0d"
_ACCEPTED = ("AA", "CA")


def mllp_exchange(host: str, port: int, message: str, timeout: float) -> str:
    """Send one framed message and return the framed answer's text. SendError when the
    connection fails, is closed before a whole answer came, or the answer is not MLLP."""
    where = f"MLLP {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(MLLP_START + message.encode("utf-8") + MLLP_END)
            received = b""
            while MLLP_END not in received:
                chunk = connection.recv(65536)
                if not chunk:
                    raise SendError(f"{where} closed the connection before an ACK")
                received += chunk
                if len(received) > 1 << 20:
                    raise SendError(f"{where} answered over 1 MiB without an MLLP end")
    except TimeoutError as exc:
        raise SendError(f"{where}: no ACK within {timeout:g} s") from exc
    except OSError as exc:
        raise SendError(f"{where}: {exc}") from exc
    start = received.find(MLLP_START)
    if start < 0:
        raise SendError(f"{where} answered without an MLLP start block")
    return received[start + 1 : received.index(MLLP_END)].decode("utf-8", "replace")


def check_ack(answer: str, control_id: str, where: str) -> None:
    """The HL7 ACK must accept (MSA-1 AA or CA) the message with this control ID (MSA-2);
    SendError with the receiver's reason (MSA-3, ERR) otherwise."""
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    try:
        ack = parse_message(answer.replace("\n", "\r"), validation_level=2, find_groups=False)
        msa = ack.msa
        code, acked = str(msa.msa_1.value), str(msa.msa_2.value)
        text = str(msa.msa_3.value) if msa.msa_3 else ""
    except (HL7apyException, AttributeError, IndexError, ValueError) as exc:
        raise SendError(f"{where} answered something that is not an HL7 ACK: {exc}") from exc
    if acked != control_id:
        raise SendError(f"{where} acknowledged message {acked!r}, not {control_id!r}")
    if code not in _ACCEPTED:
        errors = [str(e.value) for e in ack.children if e.name == "ERR"]
        reason = "; ".join(filter(None, [text, *errors])) or "no reason given"
        raise SendError(f"{where} answered {code} (not accepted): {reason[:300]}")


def mllp(destination: Destination, message: str, control_id: str) -> None:
    where = f"MLLP {destination.host}:{destination.port}"
    answer = mllp_exchange(destination.host, destination.port, message, destination.timeout_seconds)
    check_ack(answer, control_id, where)


# -- FHIR ---------------------------------------------------------------------------------------


def fhir_transaction(destination: Destination, bundle: dict[str, object]) -> None:
    """POST a transaction Bundle to the FHIR base URL; every entry must answer 2xx."""
    url = destination.url.rstrip("/")
    status, payload = _post(
        destination,
        url,
        json.dumps(bundle).encode(),
        "application/fhir+json; charset=utf-8",
        "application/fhir+json",
        "FHIR",
        _operation_outcome,
    )
    try:
        answer = json.loads(payload)
        entries = answer.get("entry", [])
        statuses = [str(e.get("response", {}).get("status", "")) for e in entries]
    except (ValueError, AttributeError) as exc:
        raise SendError(f"FHIR {url}: HTTP {status}, the answer is not a Bundle") from exc
    refused = [s for s in statuses if not s.startswith("2")]
    if status not in (200, 201) or refused or len(statuses) != len(bundle["entry"]):  # type: ignore[arg-type]
        raise SendError(
            f"FHIR {url}: HTTP {status}, {len(refused)} of {len(statuses)} entries not "
            f"stored ({', '.join(refused[:3]) or 'answer without entries'})"
        )


def _operation_outcome(payload: bytes) -> str:
    """The diagnostics of a FHIR OperationOutcome answer, or the answer's start."""
    try:
        issues = json.loads(payload).get("issue", [])
        text = "; ".join(str(i.get("diagnostics") or i.get("code")) for i in issues)
    except (ValueError, AttributeError):
        text = ""
    return (text or payload[:300].decode("utf-8", "replace"))[:300]

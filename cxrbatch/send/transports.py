"""Transports that deliver results to a destination: DICOM files by C-STORE (DIMSE) or
STOW-RS (dicomweb-client); reports (cxrbatch/send/messages.py) by HL7 v2 over MLLP or a
FHIR transaction.

Each raises `SendError` with the reason when the destination does not acknowledge all of a
delivery; the delivery is then retried as a whole. One exception: a DICOM node that does not
take a kind of object at all (C-STORE: it rejects the SOP class's presentation context, or
answers 0x0122 "SOP Class not supported") is not sent that object again and again: the
others are delivered, and `send` returns what was not accepted (the delivery records it;
the destination's `objects` can leave that kind out). A node that takes none of them fails
the delivery (a PACS stores an identical SOP instance
again without harm; an HL7 receiver sees the same accession's result again; the FHIR
Bundle's conditional updates replace what an earlier attempt stored).

`Destination.timeout_seconds` bounds the whole exchange (cxrbatch/exchange.py): a peer that
trickles its answer or keeps an association busy is cut off at that deadline. HTTP
redirects are never followed: a 3xx answer is a failed attempt with its reason, and the
credentials go only to the configured origin.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from cxrbatch import exchange
from cxrbatch.config import Destination, password_from
from cxrbatch.dicom import status as dimse_status
from cxrbatch.domain import NotAccepted
from cxrbatch.errors import PeerError, printable

log = logging.getLogger(__name__)
SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 C.5: Refused: SOP Class not supported


class SendError(PeerError):
    """A destination did not acknowledge every object of a delivery."""


def send(
    destination: Destination, files: Sequence[Path], calling_ae_title: str
) -> list[NotAccepted]:
    """Deliver `files` to `destination` within its timeout; SendError with the reason
    otherwise. Returns the objects whose kind the destination does not accept."""
    datasets = [_read(path) for path in files]
    what = f"delivery to {destination.name}"
    with exchange.deadline(destination.timeout_seconds, what):
        if destination.transport == "dimse":
            return c_store(destination, datasets, calling_ae_title)
        stow_rs(destination, datasets)
        return []


def _read(path: Path) -> Dataset:
    try:
        return dcmread(path)
    except FileNotFoundError as exc:
        raise SendError(f"output file missing: {path.name}") from exc
    except (OSError, InvalidDicomError) as exc:
        raise SendError(f"output file unreadable: {path.name}: {exc}") from exc


def _session(destination: Destination) -> exchange.BoundedSession:
    """The HTTP session of one delivery: basic auth, TLS verified, no redirects."""
    password = password_from(destination.password_env) if destination.username else None
    try:
        return exchange.http_session(
            destination.username, password, destination.tls_ca_certificates
        )
    except OSError as exc:
        raise SendError(f"TLS CA file cannot be used: {exc}") from exc


def _client_ssl_context(destination: Destination) -> Any:
    try:
        return exchange.bounded_ssl_context(destination.tls_ca_certificates)
    except OSError as exc:
        raise SendError(f"TLS CA file cannot be used: {exc}") from exc


def c_store(
    destination: Destination, datasets: Sequence[Dataset], calling_ae_title: str
) -> list[NotAccepted]:
    """One association, one C-STORE per data set (aborted at the current deadline); the
    objects whose SOP class the peer does not accept are skipped and returned."""
    ae = AE(ae_title=calling_ae_title)
    timeout = exchange.seconds_left(destination.timeout_seconds)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
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
    accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
    not_accepted = [
        NotAccepted(str(ds.SOPInstanceUID), f"{ds.Modality}: SOP class {ds.SOPClassUID} rejected")
        for ds in datasets
        if str(ds.SOPClassUID) not in accepted
    ]
    try:
        with exchange.association_deadline(assoc):
            for ds in datasets:
                if str(ds.SOPClassUID) not in accepted:
                    continue
                status = assoc.send_c_store(ds)
                code = int(status.Status) if "Status" in status else None
                if code is None:
                    bound = exchange.expired()
                    refused.append(
                        f"{ds.Modality} {ds.SOPInstanceUID}: "
                        + (bound.message if bound else "no response")
                    )
                    break  # the association is gone
                if code == SOP_CLASS_NOT_SUPPORTED:
                    reason = f"{ds.Modality}: {dimse_status.describe(code)}"
                    not_accepted.append(NotAccepted(str(ds.SOPInstanceUID), reason))
                elif not dimse_status.stored(code):
                    refused.append(
                        f"{ds.Modality} {ds.SOPInstanceUID}: {dimse_status.describe(code)}"
                    )
    finally:
        if assoc.is_established:
            assoc.release()
    if refused or len(not_accepted) == len(datasets):
        reasons = refused + [n.reason for n in not_accepted]
        raise SendError(
            f"{where} stored {len(datasets) - len(reasons)} of {len(datasets)} objects; "
            + "; ".join(reasons[:3])
        )
    return not_accepted


def stow_rs(destination: Destination, datasets: Sequence[Dataset]) -> None:
    """One STOW-RS request (dicomweb-client's store_instances: POST {url}/studies,
    multipart/related application/dicom); every instance must be stored."""
    from dicomweb_client.api import DICOMwebClient

    session = _session(destination)
    answers: list[requests.Response] = []
    session.hooks["response"].append(lambda response, *args, **kwargs: answers.append(response))
    url = destination.url.rstrip("/")
    client = DICOMwebClient(url, session=session, timeout=destination.timeout_seconds)
    client.set_http_retry_params(retry=False)  # the delivery queue retries, with backoff
    what = f"STOW-RS to {url}/studies"
    try:
        stored = client.store_instances(list(datasets))
    except Exception as exc:  # requests' errors, a redirect, the deadline, a bad answer
        raise SendError(exchange.http_failure(exc, what)) from exc
    finally:
        session.close()
    status = answers[-1].status_code if answers else 0
    failed = len(stored.get("FailedSOPSequence", []) or [])
    if status not in (200, 202) or failed:
        raise SendError(f"{what}: HTTP {status}, {failed} of {len(datasets)} objects not stored")


# -- HL7 v2 over MLLP ---------------------------------------------------------------------------

# MLLP (HL7 v2 Minimal Lower Layer Protocol, HL7 2.5 appendix C): <VT> message <FS><CR>.
# Written here because the kept clients do not fit: python-hl7's MLLPClient has no timeout
# and returns whatever one recv() gives; hl7apy ships only a server.
MLLP_START, MLLP_END = b"\x0b", b"\x1c\x0d"
_ACCEPTED = ("AA", "CA")


def mllp_exchange(host: str, port: int, message: str, timeout: float) -> str:
    """Send one framed message and return the framed answer's text, all within `timeout`
    seconds. SendError when the connection fails, is closed before a whole answer came,
    the answer is not MLLP, or the deadline passes."""
    where = f"MLLP {host}:{port}"
    with exchange.deadline(timeout, where) as bound:
        try:
            raw = socket.create_connection((host, port), timeout=bound.left())
            with exchange.adopt(raw) as connection:
                connection.sendall(MLLP_START + message.encode("utf-8") + MLLP_END)
                received = b""
                while MLLP_END not in received:
                    chunk = connection.recv(65536)
                    if not chunk:
                        raise SendError(f"{where} closed the connection before an ACK")
                    received += chunk
                    if len(received) > 1 << 20:
                        raise SendError(f"{where} answered over 1 MiB without an MLLP end")
        except TimeoutError as exc:  # DeadlineExceeded is one, and a socket timeout
            raise SendError(
                f"{where}: no complete ACK within its total deadline of {timeout:g} s"
            ) from exc
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
    """POST a transaction Bundle to the FHIR base URL; every entry must answer 2xx, all
    within the destination's timeout."""
    url = destination.url.rstrip("/")
    what = f"FHIR {url}"
    session = _session(destination)
    with exchange.deadline(destination.timeout_seconds, what):
        try:
            response = session.post(
                url,
                data=json.dumps(bundle).encode(),
                headers={
                    "Content-Type": "application/fhir+json; charset=utf-8",
                    "Accept": "application/fhir+json",
                },
                timeout=destination.timeout_seconds,
            )
            status, payload = response.status_code, response.content
        except Exception as exc:  # requests' errors, a redirect, the deadline
            raise SendError(exchange.http_failure(exc, what)) from exc
        finally:
            session.close()
    if status >= 400:
        raise SendError(f"{what}: HTTP {status} {response.reason}: {_operation_outcome(payload)}")
    try:
        answer = json.loads(payload)
        entries = answer.get("entry", [])
        statuses = [str(e.get("response", {}).get("status", "")) for e in entries]
    except (ValueError, AttributeError) as exc:
        raise SendError(f"{what}: HTTP {status}, the answer is not a Bundle") from exc
    refused = [s for s in statuses if not s.startswith("2")]
    if status not in (200, 201) or refused or len(statuses) != len(bundle["entry"]):  # type: ignore[arg-type]
        raise SendError(
            f"{what}: HTTP {status}, {len(refused)} of {len(statuses)} entries not "
            f"stored ({', '.join(refused[:3]) or 'answer without entries'})"
        )


def _operation_outcome(payload: bytes) -> str:
    """The diagnostics of a FHIR OperationOutcome answer, or the answer's start."""
    try:
        issues = json.loads(payload).get("issue", [])
        text = "; ".join(str(i.get("diagnostics") or i.get("code")) for i in issues)
    except (ValueError, AttributeError):
        text = ""
    return printable(text or payload[:300].decode("utf-8", "replace"), 300)

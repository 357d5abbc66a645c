"""Peers written for the tests: an HL7 MLLP listener (answers AA, AE or drops the
connection, as told) and a FHIR endpoint that validates every posted Bundle with
fhir.resources (R4B models) and answers 200 or an error, as told; and peers that misbehave
on purpose: HTTP servers that redirect to another origin, trickle or never answer, an MLLP
peer that trickles, a Q/R SCP that answers "pending" forever or sends studies nobody asked
for."""

from __future__ import annotations

import json
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hl7apy.parser import parse_message

START, END = b"\x0b", b"\x1c\x0d"


class MllpListener:
    """`mode`: "ack" (AA), "nak" (AE with a reason) or "drop" (close without answering).
    Every message received is parsed and validated by hl7apy and kept in `messages`."""

    def __init__(self, port: int, mode: str = "ack") -> None:
        self.mode = mode
        self.messages: list[Any] = []
        self.raw: list[str] = []
        self.invalid: list[str] = []  # messages hl7apy did not validate as HL7 2.5
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = b""
                while END not in data:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                text = data[data.index(START) + 1 : data.index(END)].decode("utf-8")
                message = parse_message(text, validation_level=2, find_groups=True)
                if not message.validate():
                    listener.invalid.append(text)
                listener.raw.append(text)
                listener.messages.append(message)
                if listener.mode == "drop":
                    return  # the connection closes with no answer
                control = message.msh.msh_10.value
                code = "AA" if listener.mode == "ack" else "AE"
                ack = (
                    f"MSH|^~\\&|RIS|HOSP|CXRBATCH||20261203120000||ACK^R01^ACK|A{control}|P|2.5\r"
                    f"MSA|{code}|{control}|{'' if code == 'AA' else 'unknown accession'}\r"
                )
                self.request.sendall(START + ack.encode() + END)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FhirEndpoint:
    """POST / takes a transaction Bundle. `status`: 200 answers a transaction-response
    with one 201 per entry; any other code answers an OperationOutcome with that code.
    Every Bundle is validated with fhir.resources (Bundle and each entry's own resource
    class) and its internal references must resolve; a Bundle that fails is answered 400."""

    def __init__(self, port: int, status: int = 200) -> None:
        self.status = status
        self.bundles: list[dict[str, Any]] = []
        self.invalid: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    document = json.loads(body)
                    validate_bundle(document)
                except Exception as exc:
                    endpoint.invalid.append(str(exc))
                    self._answer(400, _outcome(f"invalid: {exc}"))
                    return
                endpoint.bundles.append(document)
                if endpoint.status != 200:
                    self._answer(endpoint.status, _outcome("server unavailable"))
                    return
                entries = [{"response": {"status": "201 Created"}} for _ in document["entry"]]
                self._answer(
                    200,
                    {"resourceType": "Bundle", "type": "transaction-response", "entry": entries},
                )

            def _answer(self, code: int, document: dict[str, Any]) -> None:
                payload = json.dumps(document).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/fhir"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }


def validate_bundle(document: dict[str, Any]) -> None:
    """fhir.resources validation of the Bundle and of each entry as its own resource type;
    every reference to another entry (urn:uuid) must name one of the Bundle's fullUrls."""
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(document)
    if document.get("type") != "transaction":
        raise ValueError(f"Bundle type {document.get('type')!r}, not transaction")
    urls = {entry["fullUrl"] for entry in document["entry"]}
    for entry in document["entry"]:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        for reference in resource.get("result", []):
            if reference["reference"] not in urls:
                raise ValueError(f"unresolved reference {reference['reference']}")


# -- misbehaving peers ------------------------------------------------------------------------


class CapturingServer:
    """Another origin: records every request (method, path, headers) and answers 200 with a
    FHIR-like transaction-response, so a client that follows a redirect here would believe
    it delivered."""

    def __init__(self, port: int) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        captured = self.requests

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                captured.append((self.command, self.path, dict(self.headers.items())))
                payload = json.dumps({"resourceType": "Bundle", "entry": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HostileHttp:
    """An HTTP peer that misbehaves as told (`mode`):

    redirect   302 to `location` (another origin) for every request
    trickle    a complete 200 answer, one byte every `interval` seconds
    silent     reads the request and never answers
    error      400 with a body holding CR LF and a forged log line
    """

    def __init__(
        self, port: int, mode: str, location: str = "", interval: float = 0.5, status: int = 302
    ) -> None:
        self.mode = mode
        self.seen: list[tuple[str, dict[str, str]]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _read_body(self) -> None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        self.rfile.read(size + 2)
                        if size == 0:
                            break
                else:
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:
                self._read_body()
                peer.seen.append((self.command, dict(self.headers.items())))
                if peer.mode == "redirect":
                    self.send_response(status)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif peer.mode == "error":
                    body = b"bad request\r\n2026-12-03 INFO forged: delivery sent\r\n"
                    self.send_response(400)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif peer.mode == "trickle":
                    body = json.dumps({"resourceType": "Bundle", "entry": []}).encode()
                    answer = (
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    for byte in answer:
                        try:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(interval)
                else:  # silent
                    time.sleep(3600)

            do_GET = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HostileMllp:
    """An MLLP peer that reads the message, then trickles a valid ACK one byte every
    `interval` seconds (`mode="trickle"`) or never answers (`mode="silent"`)."""

    def __init__(self, port: int, mode: str, interval: float = 0.5) -> None:
        self.received = 0
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = b""
                while END not in data:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                peer.received += 1
                if mode == "silent":
                    time.sleep(3600)
                    return
                text = data[data.index(START) + 1 : data.index(END)].decode("utf-8")
                control = text.split("\r")[0].split("|")[9]
                ack = (
                    f"MSH|^~\\&|RIS|HOSP|CXRBATCH||20261203120000||ACK^R01^ACK|A{control}|P|2.5\r"
                    f"MSA|AA|{control}\r"
                )
                for byte in START + ack.encode() + END:
                    try:
                        self.request.sendall(bytes([byte]))
                    except OSError:
                        return
                    time.sleep(interval)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HostileQueryRetrieve:
    """A Q/R SCP (pynetdicom) over a small archive of data sets that misbehaves as told:

    modes         what it does
    ------------  ---------------------------------------------------------------------
    "find-forever"  the STUDY-level C-FIND answers "pending" every 0.1 s, forever
    "move-forever"  C-MOVE / C-GET send the series' instance again and again, a
                    "pending" answer after each, forever
    "foreign"       C-MOVE / C-GET send, besides the series asked for, an instance of
                    another patient's study (`foreign`)
    "many"          the STUDY-level C-FIND matches `many` studies (made-up UIDs)

    `moves` maps the move destination AE title to (host, port). `cancelled` counts the
    C-CANCELs seen; `stores` the sub-operation statuses the requester answered."""

    def __init__(
        self,
        port: int,
        archive: list[Any],
        modes: set[str],
        moves: dict[str, tuple[str, int]] | None = None,
        foreign: Any = None,
        many: int = 5000,
        ae_title: str = "HOSTILE",
    ) -> None:
        from pynetdicom import AE, StoragePresentationContexts, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        )

        self.modes = modes
        self.cancelled = 0
        self.stores: list[int] = []
        self.archive = archive
        peer = self

        def matches(identifier: Any) -> list[Any]:
            level = identifier.QueryRetrieveLevel
            found = []
            for ds in peer.archive:
                if level != "STUDY" and ds.StudyInstanceUID != identifier.StudyInstanceUID:
                    continue
                if level == "IMAGE" and ds.SeriesInstanceUID != identifier.SeriesInstanceUID:
                    continue
                answer = pydicom_dataset()
                answer.QueryRetrieveLevel = level
                answer.StudyInstanceUID = ds.StudyInstanceUID
                if level in ("SERIES", "IMAGE"):
                    answer.SeriesInstanceUID = ds.SeriesInstanceUID
                    answer.Modality = ds.Modality
                if level == "IMAGE":
                    answer.SOPInstanceUID = ds.SOPInstanceUID
                key = (answer.StudyInstanceUID, answer.get("SeriesInstanceUID"),
                       answer.get("SOPInstanceUID"))  # fmt: skip
                if key not in {(a.StudyInstanceUID, a.get("SeriesInstanceUID"),
                                a.get("SOPInstanceUID")) for a in found}:  # fmt: skip
                    found.append(answer)
            return found

        def find(event: Any) -> Any:
            identifier = event.identifier
            if identifier.QueryRetrieveLevel == "STUDY" and "find-forever" in peer.modes:
                while True:
                    if event.is_cancelled:
                        peer.cancelled += 1  # and goes on regardless
                    answer = pydicom_dataset()
                    answer.QueryRetrieveLevel = "STUDY"
                    answer.StudyInstanceUID = peer.archive[0].StudyInstanceUID
                    yield 0xFF00, answer
                    time.sleep(0.1)
            if identifier.QueryRetrieveLevel == "STUDY" and "many" in peer.modes:
                for index in range(many):
                    if event.is_cancelled:
                        peer.cancelled += 1
                        yield 0xFE00, None
                        return
                    answer = pydicom_dataset()
                    answer.QueryRetrieveLevel = "STUDY"
                    answer.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1411.9.{index + 1}"
                    yield 0xFF00, answer
                    # pynetdicom's reactor sends OR reads once per loop and sends first: a
                    # handler that outruns its own sending never reads the C-CANCEL. A PACS
                    # that answers at its disk's pace reads it between answers.
                    time.sleep(0.002)
                return
            for answer in matches(identifier):
                yield 0xFF00, answer

        def retrieved(identifier: Any) -> list[Any]:
            return [
                ds
                for ds in peer.archive
                if ds.StudyInstanceUID == identifier.StudyInstanceUID
                and ds.SeriesInstanceUID == identifier.SeriesInstanceUID
            ]

        def sub_operations(identifier: Any) -> Any:
            wanted = retrieved(identifier)
            if "move-forever" in peer.modes:
                yield 65535
                while True:
                    yield 0xFF00, wanted[0]
            sending = wanted + ([foreign] if "foreign" in peer.modes and foreign else [])
            yield len(sending)
            for ds in sending:
                yield 0xFF00, ds

        def move(event: Any) -> Any:
            title = event.move_destination
            title = title.decode() if isinstance(title, bytes) else str(title)
            destination = (moves or {}).get(title.strip())
            if destination is None:
                yield None, None
                return
            yield destination
            yield from sub_operations(event.identifier)

        def get(event: Any) -> Any:
            yield from sub_operations(event.identifier)

        ae = AE(ae_title=ae_title)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, scu_role=False, scp_role=True)
            ae.add_requested_context(context.abstract_syntax)
        self.server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[(evt.EVT_C_FIND, find), (evt.EVT_C_MOVE, move), (evt.EVT_C_GET, get)],
        )
        self.port = port

    def stop(self) -> None:
        self.server.shutdown()


def pydicom_dataset() -> Any:
    from pydicom.dataset import Dataset

    return Dataset()

"""Local peers for the report transports: an HL7 MLLP listener (answers AA, AE or drops
the connection, as told) and a FHIR endpoint that validates every posted Bundle with
fhir.resources (R4B models) and answers 200 or an error, as told."""

from __future__ import annotations

import json
import socketserver
import threading
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

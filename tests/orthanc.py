"""A real Orthanc PACS for tests: the Debian package, loopback only, its own temporary
storage, the DICOMweb plugin on. Tests that need it fail in CI when it is missing (CI
installs it) and are skipped elsewhere with the reason."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import tool

DICOMWEB_PLUGINS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/plugins/libOrthancDicomWeb.so"),
)


def orthanc_executable() -> str:
    return tool(
        "Orthanc",
        skip_reason="Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)",
        ci_reason="Orthanc (Debian packages orthanc, orthanc-dicomweb) is required in CI",
    )


class Orthanc:
    """One Orthanc process. `modalities` maps a name to (AE title, host, port) of the
    nodes it may talk to; only those may store into it (by AE title and host)."""

    ae_title = "ORTHANC"

    def __init__(
        self, root: Path, dicom_port: int, http_port: int, modalities: dict[str, tuple]
    ) -> None:
        self.root = root
        self.dicom_port = dicom_port
        self.http_port = http_port
        root.mkdir(parents=True, exist_ok=True)
        plugins = [str(p) for p in DICOMWEB_PLUGINS if p.exists()][:1]
        config = {
            "Name": "cxrbatch-test-pacs",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                name: {"AET": aet, "Host": host, "Port": port, "AllowStore": True}
                for name, (aet, host, port) in modalities.items()
            },
            "Plugins": plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.log = root / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.dicomweb = bool(plugins)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen(
            [orthanc_executable(), str(self.config)],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited: {self.log.read_text()[-2000:]}")
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        self.stop()  # not left running (on its ports) after the test fails
        raise AssertionError(f"Orthanc did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(request, timeout=120) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, document: Any) -> Any:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        return json.loads(self.request("POST", path, body))

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a file over REST; returns Orthanc's answer (ID, ParentStudy, ...)."""
        return dict(self.post("/instances", path.read_bytes()))

    def study_id(self, study_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_instance_uid.encode())
        return next((f["ID"] for f in found if f["Type"] == "Study"), None)

    def instance_files(self, study_id: str) -> list[bytes]:
        return [
            self.request("GET", f"/instances/{item['ID']}/file")
            for item in self.get(f"/studies/{study_id}/instances")
        ]

    def echo(self, modality: str) -> bool:
        try:
            self.request("POST", f"/modalities/{modality}/echo", b"{}")
            return True
        except urllib.error.HTTPError:
            return False

"""OHIF Viewer (npm `@ohif/app`, its prebuilt `dist/`) in front of a test Orthanc, for the
viewer tests: one origin serves OHIF's files and proxies /dicom-web to Orthanc's DICOMweb
(as a hospital's reverse proxy does), with an app-config pointing OHIF at it.

OHIF is not a Python package: CI fetches the pinned build with `npm pack` (.ci/run) and
names its dist folder in CXRBATCH_OHIF_DIST. Tests that need it fail in CI without it and
are skipped elsewhere with the reason."""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.conftest import unavailable

OHIF_VERSION = "3.13.2"
TYPES = {
    ".js": "application/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
}


def ohif_dist() -> Path:
    folder = os.environ.get("CXRBATCH_OHIF_DIST", "")
    if folder and (Path(folder) / "index.html").is_file():
        return Path(folder)
    message = (
        f"OHIF {OHIF_VERSION} is not available: `npm pack @ohif/app@{OHIF_VERSION}`, "
        "extract it and set CXRBATCH_OHIF_DIST to its package/dist (.ci/run does)"
    )
    unavailable(message, message)


def app_config(root: str) -> str:
    """OHIF's configuration: one DICOMweb source at `root` (same origin). Multi-frame
    objects (the SEG) are loaded frame by frame, which Orthanc's DICOMweb serves."""
    return f"""window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  investigationalUseDialog: {{ option: 'never' }},
  defaultDataSourceName: 'orthanc',
  dataSources: [{{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {{
      friendlyName: 'test Orthanc',
      name: 'orthanc',
      wadoUriRoot: '{root}',
      qidoRoot: '{root}',
      wadoRoot: '{root}',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video,pdf',
      loadMultiframeAsPart10: false,
      bulkDataURI: {{ enabled: true, relativeResolution: 'studies' }},
      omitQuotationForMultipartRequest: true,
    }},
  }}],
}};
"""


class OhifServer:
    """OHIF's dist at http://127.0.0.1:PORT/, /dicom-web/... proxied to `dicomweb`."""

    def __init__(self, dist: Path, dicomweb: str) -> None:
        self.dist, self.dicomweb = dist, dicomweb.rstrip("/")
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                return

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path.startswith("/dicom-web/"):
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, app_config(f"{server.url}/dicom-web").encode(), ".js")
                else:
                    file = (server.dist / path.lstrip("/")).resolve()
                    if not (file.is_file() and server.dist.resolve() in file.parents):
                        file = server.dist / "index.html"  # the single-page app's routes
                    self._send(200, file.read_bytes(), file.suffix)

            def _proxy(self) -> None:
                target = server.dicomweb + self.path[len("/dicom-web") :]
                headers = {"Accept": self.headers.get("Accept", "*/*")}
                request = urllib.request.Request(target, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        body, status = answer.read(), answer.status
                        kind = answer.headers.get("Content-Type", "application/octet-stream")
                except urllib.error.HTTPError as exc:
                    body, status = exc.read(), exc.code
                    kind = exc.headers.get("Content-Type", "text/plain")
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _send(self, status: int, body: bytes, suffix: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", TYPES.get(suffix, "application/octet-stream"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OhifServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

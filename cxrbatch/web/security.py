"""Response headers every page, file and API answer of the web app carries.

Content-Security-Policy   scripts, styles and images from this origin only (no inline
                          script or style: the templates have none), no framing, no
                          plugins, forms posting back here only
X-Frame-Options DENY      the same for browsers without frame-ancestors
X-Content-Type-Options    nosniff: a DICOM or CSV download is never run as a page
Referrer-Policy           no-referrer: study URLs (UIDs) never leave in a Referer
Cache-Control             no-store on everything but the static style sheet and
                          scripts: pages, CSV, files and overlays carry patient data
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
STATIC_PREFIX = "/static/"

_ALWAYS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """ASGI middleware: the headers above on every HTTP response (errors included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith(STATIC_PREFIX)
        cache = b"public, max-age=3600" if static else b"no-store"

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in {name for name, _ in _ALWAYS} | {b"cache-control"}
                ]
                message["headers"] = [*headers, *_ALWAYS, (b"cache-control", cache)]
            await send(message)

        await self.app(scope, receive, with_headers)

"""The web app as a careless operator and a hostile user meet it: security headers on every
route, a page number past the end, control and bidi characters from headers in the HTML,
`cxrbatch web-password` output that is valid TOML whatever the name, `cxrbatch serve` on a
port in use, and a reverse proxy that adds X-Forwarded-For in front of a real uvicorn."""

from __future__ import annotations

import base64
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bench.web_data import populate
from cxrbatch.cli import app as cli
from cxrbatch.config import Settings
from cxrbatch.site import Site
from cxrbatch.web.app import create_app
from cxrbatch.web.security import CONTENT_SECURITY_POLICY
from tests.test_scp import _free_port


@pytest.fixture()
def site(tmp_path: Path) -> Site:
    out = tmp_path / "out"
    out.mkdir()
    populate(f"sqlite:///{out / 'cxrbatch.sqlite'}", 12, seed=5)
    return Site.at(Settings(), out)


def _client(site: Site, **web: object) -> TestClient:
    settings = site.settings.model_copy(update={"web": site.settings.web.model_copy(update=web)})
    return TestClient(create_app(site.with_settings(settings)))


def _uid(site: Site) -> str:
    with sqlite3.connect(site.out_dir / "cxrbatch.sqlite") as db:
        return str(db.execute("SELECT study_instance_uid FROM studies LIMIT 1").fetchone()[0])


def test_every_route_sends_the_security_headers(site: Site) -> None:
    client = _client(site)
    uid = _uid(site)
    paths = {
        "/", "/?page=2", "/worklist.csv", f"/studies/{uid}", f"/studies/{uid}/files/json",
        f"/studies/{uid}/files/sr", f"/studies/{uid}/overlay/1.2.png", "/operations",
        "/healthz", "/readyz", "/metrics", "/studies/9.9.9", "/no/such/route",
        "/static/app.css", "/api/v1/studies", f"/api/v1/studies/{uid}", "/openapi.json",
    }  # fmt: skip
    # Every GET route of the app is among them (a new route must be added here).
    # (The routes of its routers, as its OpenAPI schema lists them: FastAPI keeps an
    # included router as one entry of app.routes.)
    routed = set(create_app(site).openapi()["paths"])
    assert {"/", "/studies/{uid}", "/api/v1/studies", "/metrics"} <= routed
    for template in routed:
        assert any(
            p.split("?")[0] == template
            or (template.count("{") and p.startswith(template.split("{")[0]))
            for p in paths
        ), template
    for path in sorted(paths):
        answer = client.get(path)
        headers = answer.headers
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "'unsafe-inline'" not in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY", path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "no-referrer", path
        expected = "public, max-age=3600" if path.startswith("/static/") else "no-store"
        assert headers["cache-control"] == expected, path
    page = client.get("/").text
    assert "<script" not in page and "<style" not in page and "style=" not in page


def test_a_cursor_nobody_wrote_is_refused_and_a_stale_one_still_pages(site: Site) -> None:
    client = _client(site, page_size=10)
    first = client.get("/")
    following = re.search(r'href="/\?[^"]*after=([\w-]+)"', first.text)
    assert following is not None
    cursor = following.group(1)
    second = client.get(f"/?after={cursor}")
    assert second.status_code == 200 and second.text.count('class="study"') == 2
    forged = base64.urlsafe_b64encode(b'["screening","x",1,2,3]').decode().rstrip("=")
    other = base64.urlsafe_b64encode(b'["recorded","2026-01-01T00:00:00",1]').decode()
    for bad in ("x", "%00", "a" * 300, forged, other.rstrip("=")):
        answer = client.get("/", params={"after": bad})
        assert answer.status_code == 400, bad
        assert "cursor" in answer.text
    assert client.get("/", params={"after": "a" * 401}).status_code == 422
    # A cursor from a page read earlier still pages after the rows change (keyset: it
    # names a place in the order, not an offset).
    with sqlite3.connect(site.out_dir / "cxrbatch.sqlite") as db:
        db.execute("DELETE FROM outcomes WHERE id = (SELECT min(id) FROM outcomes)")
    assert client.get(f"/?after={cursor}").status_code == 200


def test_control_and_bidi_characters_from_headers_are_shown_as_escapes(site: Site) -> None:
    uid = _uid(site)
    with sqlite3.connect(site.out_dir / "cxrbatch.sqlite") as db:
        db.execute(
            "UPDATE outcomes SET reason = ? WHERE study_id = "
            "(SELECT id FROM studies WHERE study_instance_uid = ?)",
            ("evil\u202eRIGHT-TO-LEFT\x00NUL\x1bESC", uid),
        )
    client = _client(site)
    for path in ("/", f"/studies/{uid}"):
        html = client.get(path).text
        assert "\u202e" not in html and "\x00" not in html and "\x1b" not in html, path
        assert "evil\\u202eRIGHT-TO-LEFT\\x00NUL\\x1bESC" in html, path


@pytest.mark.parametrize(
    "name", ['reader "quoted"', "back\\slash", "x" * 120, "Müller-Lüdenscheidt \u00e9", "tab\tname"]
)
def test_web_password_prints_an_entry_that_parses_as_toml(name: str) -> None:
    result = CliRunner().invoke(
        cli, ["web-password", name], input="pw one two\npw one two\n", env={"COLUMNS": "40"}
    )
    assert result.exit_code == 0, result.output
    text = result.stdout[result.stdout.index("[[web.users]]") :]
    parsed = tomllib.loads(text)
    (user,) = parsed["web"]["users"]
    assert user["name"] == name
    assert user["password_hash"].startswith("$argon2id$")
    assert all(len(line) < 200 for line in text.splitlines()) or len(name) >= 120


def _cxrbatch(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "cxrbatch.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def test_serve_on_a_port_in_use_is_one_line_and_exit_2(site: Site) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        process = _cxrbatch("serve", "--out", str(site.out_dir), "--port", str(port))
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, (stdout, stderr)
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    assert "web app on" not in stdout


def test_a_reverse_proxy_adding_x_forwarded_for_keeps_trusted_header_users(
    site: Site, tmp_path: Path
) -> None:
    """The supported set-up (deploy/OPERATIONS.md): a TLS reverse proxy on the same host
    authenticates the user, sets X-Remote-User and adds X-Forwarded-For. cxrbatch serve
    (real uvicorn) must trust the header from the proxy's address whatever
    X-Forwarded-For says, and only from there."""
    config = tmp_path / "site.toml"
    config.write_text(
        '[web]\ntrusted_proxy_header = "X-Remote-User"\ntrusted_proxies = ["127.0.0.1"]\n'
    )
    port = _free_port()
    process = _cxrbatch(
        "serve", "--out", str(site.out_dir), "--config", str(config), "--port", str(port)
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(base + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        proxied = {"X-Remote-User": "dr.house", "X-Forwarded-For": "10.20.30.40"}
        page = httpx.get(base + "/", headers=proxied, timeout=10)
        assert page.status_code == 200 and "dr.house" in page.text
        # A forged X-Forwarded-For does not make a request come from the proxy, and without
        # the user header nobody is signed in.
        assert httpx.get(base + "/", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 401
    finally:
        process.terminate()
        process.communicate(timeout=60)
    with sqlite3.connect(site.out_dir / "cxrbatch.sqlite") as db:
        users = {row[0] for row in db.execute("SELECT user FROM audit_events")}
    assert users == {"dr.house"}

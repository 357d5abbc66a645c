"""The results web app over HTTP (FastAPI's TestClient): every page and filter, the CSV,
overlays, downloads, /metrics parsed by prometheus_client, /healthz and /readyz (also with
the database gone), authentication and its refusals, the audit trail, and no patient data
in the log or for anonymous users."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from bench.web_data import populate
from cxrbatch import pipeline
from cxrbatch.batch import run_batch
from cxrbatch.cli import app as cli
from cxrbatch.config import Settings, WebSettings, WebUser
from cxrbatch.errors import ConfigError
from cxrbatch.site import Site
from cxrbatch.web.app import create_app
from cxrbatch.web.auth import check_binding, hash_password
from cxrbatch_training.synthetic import write_studies
from tests.conftest import chromium_executable

SECRET_NAME = "WEBTEST^SECRET"  # the phantoms' PatientName is replaced by this
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def processed(
    tmp_path_factory: pytest.TempPathFactory,
    classified_models: tuple[Settings, pipeline.Models],
) -> Site:
    """Three phantom studies processed with the tiny (synthetic) classifier and screening
    bundles, key images on."""
    configured, loaded = classified_models
    root = tmp_path_factory.mktemp("web")
    studies = write_studies(root / "in", 3, seed=91, size=(256, 256))
    import pydicom

    for study in studies:  # a patient name to look for in the log and the pages
        ds = pydicom.dcmread(study.path)
        ds.PatientName = SECRET_NAME
        ds.save_as(study.path)
    settings = configured.model_copy(
        update={"output": configured.output.model_copy(update={"key_image": True})}
    )
    site = Site.at(settings, root / "out")
    summary = run_batch(root / "in", site, models=loaded)
    assert sum(summary.studies.values()) == 3
    return site


def _client(site: Site, **web: object) -> TestClient:
    settings = site.settings.model_copy(update={"web": site.settings.web.model_copy(update=web)})
    return TestClient(create_app(site.with_settings(settings)))


def _audit(site: Site) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(site.out_dir / "cxrbatch.sqlite") as db:
        return list(db.execute("SELECT user, action, study_instance_uid FROM audit_events"))


def _uids(site: Site) -> list[str]:
    with sqlite3.connect(site.out_dir / "cxrbatch.sqlite") as db:
        return [r[0] for r in db.execute("SELECT study_instance_uid FROM studies")]


def test_worklist_filters_sorts_and_shows_no_patient_data_anonymously(
    processed: Site, caplog: pytest.LogCaptureFixture
) -> None:
    client = _client(processed)
    with caplog.at_level(logging.INFO):
        page = client.get("/")
    assert page.status_code == 200
    html = page.text
    assert "NOT FOR DIAGNOSTIC USE" in html and "SYNTHETIC" in html
    assert html.count('class="study"') == 3
    assert SECRET_NAME not in html and "SYN-" not in html  # anonymous: no patient data
    for query, expected in (
        ("?triage=abnormal", None),
        ("?status=processed", 3),
        ("?status=failed", 0),
        ("?label=mass&min_probability=0", 3),  # labels in any case
        ("?label=Mass&min_probability=1", 0),
        ("?from=2999-01-01", 0),
        ("?sort=recorded", 3),
        ("?sort=study_date", 3),
        ("?sort=no_finding", 3),
    ):
        filtered = client.get("/" + query)
        assert filtered.status_code == 200, query
        if expected is not None:
            assert filtered.text.count('class="study"') == expected, query
    assert client.get("/?status=bogus").status_code == 400
    unknown = client.get("/?label=Cancer")
    assert unknown.status_code == 400 and "Mass, Nodule" in unknown.text
    for record in caplog.records:
        assert SECRET_NAME not in record.getMessage()


def test_study_page_overlays_downloads_and_audit(processed: Site) -> None:
    client = _client(processed)
    uid = _uids(processed)[0]
    page = client.get(f"/studies/{uid}")
    assert page.status_code == 200
    html = page.text
    assert 'class="overlay"' in html and 'class="findings"' in html
    assert "Segmentation QC: passed" in html and "SYNTHETIC" in html
    assert "weights SHA-256" in html and "/files/json" in html
    assert "/files/sr" not in html and "signed-in users only" in html  # anonymous
    sop = html.split("/overlay/")[1].split(".png")[0]
    for size in ("thumb", "large"):
        picture = client.get(f"/studies/{uid}/overlay/{sop}.png?size={size}")
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        assert picture.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((processed.out_dir / "_web_cache").rglob("*.png"))  # cached
    again = client.get(f"/studies/{uid}/overlay/{sop}.png?size=thumb")
    assert again.content == client.get(f"/studies/{uid}/overlay/{sop}.png").content
    assert client.get(f"/studies/{uid}/overlay/{sop}.png?size=huge").status_code == 400
    # Anonymous: the DICOM files carry patient identifiers and are refused; result.json
    # (no patient data) is served.
    for kind in ("sr", f"seg-{sop}", f"key-{sop}"):
        refused = client.get(f"/studies/{uid}/files/{kind}")
        assert refused.status_code == 403 and "patient identifiers" in refused.text, kind
        assert SECRET_NAME.encode() not in refused.content
    document = json.loads(client.get(f"/studies/{uid}/files/json").content)
    assert document["study_instance_uid"] == uid
    assert SECRET_NAME not in json.dumps(document) and "SYN-" not in json.dumps(document)
    assert client.get(f"/studies/{uid}/files/nothing").status_code == 404
    assert client.get("/studies/1.2.3.4.5").status_code == 404
    events = _audit(processed)
    assert ("anonymous", "study_viewed", uid) in events
    assert ("anonymous", "image_viewed", uid) in events  # the overlays show the radiograph
    assert sum(1 for e in events if e[1] == "file_downloaded") == 1


def test_csv_export_operations_health_and_metrics(processed: Site) -> None:
    client = _client(processed)
    exported = client.get("/worklist.csv?status=processed")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    lines = exported.text.strip().splitlines()
    assert lines[0].startswith("study_instance_uid,study_date") and len(lines) == 4
    assert "patient_name" not in lines[0]  # anonymous
    assert client.get("/worklist.csv?label=Cancer").status_code == 400
    assert ("anonymous", "worklist_exported", None) in _audit(processed)
    operations = client.get("/operations")
    assert (
        operations.status_code == 200
        and "Queue" in operations.text
        and "free MiB" in operations.text
    )
    assert client.get("/healthz").text == "ok"
    assert client.get("/readyz").status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    processed_count = next(
        s.value for s in families["cxrbatch_outcomes"].samples if s.labels["status"] == "processed"
    )
    assert processed_count == 3
    assert "cxrbatch_triage" in families and "cxrbatch_deliveries" in families
    stages = {s.labels["stage"] for s in families["cxrbatch_stage_seconds"].samples}
    assert "segment" in stages or stages  # per-stage histograms of the recorded timings


def test_authentication_refusals_and_patient_data_for_users(
    processed: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    users = (WebUser(name="reader", password_hash=hash_password(PASSWORD)),)
    client = _client(processed, users=users)
    assert client.get("/").status_code == 401
    assert client.get("/worklist.csv").status_code == 401
    assert client.get(f"/studies/{_uids(processed)[0]}").status_code == 401

    def basic(name: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{name}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    assert client.get("/", headers=basic("reader", "wrong")).status_code == 401
    assert client.get("/", headers=basic("nobody", PASSWORD)).status_code == 401
    page = client.get("/", headers=basic("reader", PASSWORD))
    assert page.status_code == 200 and SECRET_NAME in page.text  # authenticated: shown
    uid = _uids(processed)[1]
    study = client.get(f"/studies/{uid}", headers=basic("reader", PASSWORD))
    assert study.status_code == 200
    assert ("reader", "study_viewed", uid) in _audit(processed)
    # A signed-in user downloads the SEG and SR (with the patient's identity in them).
    sop = study.text.split("/overlay/")[1].split(".png")[0]
    for kind in ("sr", f"seg-{sop}"):
        got = client.get(f"/studies/{uid}/files/{kind}", headers=basic("reader", PASSWORD))
        assert got.status_code == 200 and got.content[128:132] == b"DICM", kind
        assert SECRET_NAME.encode() in got.content
    assert ("reader", "worklist_viewed", None) in _audit(processed)
    # /healthz and /metrics carry no patient data and stay open to the monitoring system.
    assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200

    proxied = _client(
        processed, trusted_proxy_header="X-Remote-User", trusted_proxies=("testclient",)
    )
    assert proxied.get("/", headers={"X-Remote-User": "dr.who"}).status_code == 200
    untrusted = _client(processed, trusted_proxy_header="X-Remote-User")  # not from testclient
    assert untrusted.get("/", headers={"X-Remote-User": "dr.who"}).status_code == 401
    # Patient data was on the pages (authenticated); none of it reached the log.
    for record in caplog.records:
        assert SECRET_NAME not in record.getMessage() and "SYN-" not in record.getMessage()


def test_the_app_refuses_other_addresses_without_authentication(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no authentication"):
        check_binding(WebSettings(), "0.0.0.0")
    check_binding(WebSettings(), "127.0.0.1")
    check_binding(WebSettings(trusted_proxy_header="X-Remote-User"), "0.0.0.0")
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, ["db", "upgrade", "--out", str(out)]).exit_code == 0
    refused = CliRunner().invoke(cli, ["serve", "--out", str(out), "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "no authentication is configured" in refused.output
    missing = CliRunner().invoke(cli, ["serve", "--out", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no results database" in missing.output


def test_readyz_says_when_the_database_is_gone_and_paging_holds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    populate(url, 25, seed=4)
    site = Site.at(Settings(), out)
    client = _client(site, page_size=10)
    pages = [client.get("/")]
    while (following := re.search(r'href="/\?[^"]*after=([\w-]+)"', pages[-1].text)) is not None:
        pages.append(client.get(f"/?after={following.group(1)}"))
    assert [p.text.count('class="study"') for p in pages] == [10, 10, 5]
    assert "25 studies" in pages[0].text and "previous" not in pages[0].text
    numbers = [re.findall(r'class="study"[^>]*>#(\d+)<', p.text) for p in pages]
    assert len({n for page in numbers for n in page}) == 25  # every study once
    # Back from the last page: the middle one again, the same rows in the same order.
    back = re.search(r'href="/\?[^"]*before=([\w-]+)"', pages[2].text)
    assert back is not None
    assert (
        re.findall(r'class="study"[^>]*>#(\d+)<', client.get(f"/?before={back.group(1)}").text)
        == numbers[1]
    )
    assert len(client.get("/worklist.csv").text.strip().splitlines()) == 26
    (out / "cxrbatch.sqlite").unlink()
    gone = client.get("/readyz")
    assert gone.status_code == 503 and "no results database" in gone.text
    assert client.get("/healthz").status_code == 200  # the process is alive


def test_cxrbatch_audit_lists_the_events(processed: Site) -> None:
    client = _client(processed)
    uid = _uids(processed)[2]
    assert client.get(f"/studies/{uid}").status_code == 200
    listed = CliRunner().invoke(
        cli, ["audit", "--out", str(processed.out_dir), "--format", "json", "--study", uid]
    )
    assert listed.exit_code == 0, listed.output
    events = json.loads(listed.stdout)
    assert events and all(e["study_instance_uid"] == uid for e in events)
    assert events[0]["action"] == "study_viewed" and events[0]["user"] == "anonymous"


ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@contextlib.contextmanager
def _served(site: Site) -> Iterator[str]:
    """The app for `site` on a loopback port, in a thread: its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(site), host="127.0.0.1", port=port, log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def _browser() -> Iterator[Any]:
    """Headless Chromium (Debian's, driven by playwright): a page 1400 x 1000."""
    from playwright.sync_api import sync_playwright

    executable = chromium_executable("browser test")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def test_a_real_browser_follows_the_worklist_to_a_study_with_its_overlay(processed: Site) -> None:
    """Headless Chromium opens the worklist, follows a study link and finds the overlay
    loaded and the findings table; screenshots of the three pages are kept in artifacts/
    (CI keeps them)."""
    ARTIFACTS.mkdir(exist_ok=True)
    with _served(processed) as base, _browser() as page:
        page.goto(f"{base}/")
        assert "NOT FOR DIAGNOSTIC USE" in page.content()
        page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)
        page.click("a.study >> nth=0")
        page.wait_for_selector("img.overlay")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
        widths = page.eval_on_selector_all("img.overlay", "els => els.map(e => e.naturalWidth)")
        assert widths and all(w > 0 for w in widths), widths
        assert page.locator("table.findings").count() >= 1
        page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)
        page.goto(f"{base}/operations")
        page.screenshot(path=str(ARTIFACTS / "operations.png"), full_page=True)
    assert (ARTIFACTS / "study.png").stat().st_size > 10_000


def test_the_viewer_serves_the_films_own_values_and_the_lung_layer(processed: Site) -> None:
    """/view/<sop>/: the Modality LUT values back to within one code step, the header's
    window, the contours on a transparent layer of the same size."""
    import cv2
    import numpy as np

    from cxrbatch.dicom.decode import modality_image
    from cxrbatch.dicom.discover import read_header
    from cxrbatch.domain import InstanceHeader

    client = _client(processed)
    uid = _uids(processed)[0]
    page = client.get(f"/studies/{uid}").text
    base = re.search(r'data-base="([^"]+)"', page)
    assert base is not None
    meta = client.get(base.group(1) + "view.json").json()
    raw = client.get(base.group(1) + "pixels")
    assert raw.headers["content-encoding"] == "gzip"
    codes = np.frombuffer(raw.content, dtype="<u2").reshape(meta["height"], meta["width"])
    values = meta["low"] + codes * (meta["high"] - meta["low"]) / 65535
    with sqlite3.connect(processed.out_dir / "cxrbatch.sqlite") as db:
        (stored,) = db.execute(
            "SELECT i.source_path FROM images i JOIN outcomes o ON o.id = i.outcome_id "
            "JOIN studies s ON s.id = o.study_id WHERE s.study_instance_uid = ? AND o.is_current",
            (uid,),
        ).fetchone()
    header = read_header(Path(stored))
    assert isinstance(header, InstanceHeader)
    truth = modality_image(header)
    assert values.shape == truth.values.shape  # 256 px phantoms: not scaled down
    step = (meta["high"] - meta["low"]) / 65535
    assert np.abs(values - truth.values).max() <= step
    assert meta["window_source"] in ("header", "percentile 0.5-99.5")
    if truth.window is not None:
        assert (meta["window"]["center"], meta["window"]["width"]) == truth.window
    layer = cv2.imdecode(
        np.frombuffer(client.get(base.group(1) + "lungs.png").content, np.uint8),
        cv2.IMREAD_UNCHANGED,
    )
    assert layer is not None and layer.shape == (meta["height"], meta["width"], 4)
    drawn = layer[..., 3] > 0
    assert 0.005 < drawn.mean() < 0.2  # contours, not filled areas
    assert client.get(base.group(1) + "other").status_code == 404
    assert ("anonymous", "image_viewed", uid) in _audit(processed)


def test_a_reader_windows_zooms_and_hides_the_lungs_in_a_real_browser(processed: Site) -> None:
    """The study page's viewer in headless Chromium: the film drawn, the lung layer toggled,
    window/level by right-drag, zoom by the wheel, reset by double-click; screenshots in
    artifacts/ (looked at: study-viewer*.png)."""
    ARTIFACTS.mkdir(exist_ok=True)
    with _served(processed) as base, _browser() as page:
        page.goto(f"{base}/studies/{_uids(processed)[0]}")
        page.wait_for_selector(".viewer.ready[data-state]", timeout=30_000)
        viewer = page.locator(".viewer").first
        canvas = viewer.locator("canvas")

        def shown() -> str:
            return str(canvas.evaluate("c => c.toDataURL()"))

        def state() -> dict[str, Any]:
            return dict(json.loads(viewer.get_attribute("data-state") or "{}"))

        def settle() -> None:
            page.wait_for_timeout(150)  # the next animation frame draws

        first = shown()
        assert state()["lungs"] is True and state()["zoom"] == 1
        page.screenshot(path=str(ARTIFACTS / "study-viewer.png"), full_page=True)
        viewer.locator("button[data-action=lungs]").click()
        settle()
        assert state()["lungs"] is False and shown() != first
        box = canvas.bounding_box()
        assert box is not None
        middle = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        before = state()
        page.mouse.move(*middle)
        page.mouse.down(button="right")
        page.mouse.move(middle[0] + 120, middle[1] - 60, steps=4)
        page.mouse.up(button="right")
        settle()
        after = state()
        assert after["width"] > before["width"] and after["center"] > before["center"]
        windowed = shown()
        assert windowed != first
        page.mouse.wheel(0, -300)
        settle()
        assert state()["zoom"] > 1
        viewer.locator("button[data-action=lungs]").click()
        settle()
        page.screenshot(path=str(ARTIFACTS / "study-viewer-zoomed.png"), full_page=True)
        canvas.dblclick()
        settle()
        reset = state()
        assert reset["zoom"] == 1 and reset["width"] == before["width"]
        assert shown() == first
    assert (ARTIFACTS / "study-viewer.png").stat().st_size > 10_000


def test_watch_writes_the_metrics_textfile_for_node_exporter(tmp_path: Path) -> None:
    """A site's Prometheus sees a running daemon without the web app: `watch` rewrites a
    textfile-collector file with the same figures plus its worker count."""
    from cxrbatch import daemon

    (tmp_path / "out").mkdir()
    populate(f"sqlite:///{tmp_path / 'out' / 'cxrbatch.sqlite'}", 4, seed=2)
    textfile = tmp_path / "textfile" / "cxrbatch.prom"
    base = Settings()
    settings = base.model_copy(
        update={"metrics": base.metrics.model_copy(update={"textfile": str(textfile)})}
    )
    service = daemon.Service(Site.at(settings, tmp_path / "out"), 1, None)
    try:
        service._metrics_if_due()
    finally:
        service.database.close()
    families = {f.name: f for f in text_string_to_metric_families(textfile.read_text())}
    assert families["cxrbatch_daemon_workers"].samples[0].value == 0
    processed = [
        s.value for s in families["cxrbatch_outcomes"].samples if s.labels["status"] == "processed"
    ]
    assert processed == [4]


def test_watch_serves_the_app_beside_the_daemon_by_config(tmp_path: Path) -> None:
    """web.with_watch: the daemon's ingest process serves the app in a thread."""
    import socket
    import time

    import httpx

    from cxrbatch import daemon

    (tmp_path / "out").mkdir()
    populate(f"sqlite:///{tmp_path / 'out' / 'cxrbatch.sqlite'}", 3, seed=3)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = Settings()
    settings = base.model_copy(
        update={"web": base.web.model_copy(update={"with_watch": True, "port": port})}
    )
    service = daemon.Service(Site.at(settings, tmp_path / "out"), 1, None)
    server = service._start_web()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and page.text.count('class="study"') == 3
    finally:
        server.should_exit = True
        service.database.close()


def test_csv_cells_that_look_like_formulas_are_neutralised() -> None:
    from cxrbatch.web.pages import _cells

    assert _cells(["=HYPERLINK(1)", "+1", "-2", "@x", "\tx", "ok", 0.5, None]) == [
        "'=HYPERLINK(1)", "'+1", "'-2", "'@x", "'\tx", "ok", 0.5, None,
    ]  # fmt: skip

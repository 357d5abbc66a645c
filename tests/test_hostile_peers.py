"""Deliveries against peers that misbehave on purpose (tests/peers.py): a FHIR server and a
DICOMweb server that redirect to another origin, HTTP and MLLP peers that trickle their
answer one byte every 0.5 s or never answer, a PACS that holds a C-STORE, a server whose
error body carries CR LF. Each delivery ends within its total deadline as a failed attempt
with the reason; credentials never reach the other origin; nothing is counted as sent."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from sqlalchemy import select

from cxrbatch import exchange, pipeline
from cxrbatch.config import Destination, Settings
from cxrbatch.db import models as tables
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.ingest.spool import Spool, Taken
from cxrbatch.send.sender import Sender
from cxrbatch.send.transports import SendError, fhir_transaction, mllp, send
from cxrbatch.site import Site
from cxrbatch.worker import QueueWorker
from cxrbatch_training.synthetic import write_study
from tests.peers import CapturingServer, HostileHttp, HostileMllp
from tests.test_scp import _free_port

DEADLINE = 2.0
# A trickling peer's answer is ~100 bytes at 2 bytes/s: about 50 s without a total deadline.
SLACK = 1.5

BUNDLE = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {}}]}


def _object_file(tmp_path: Path) -> Path:
    from cxrbatch_training.synthetic import make_phantom, save, to_dataset

    ds = to_dataset(make_phantom(7, (64, 64)), "77/0", instance=1)
    return save(ds, tmp_path / "obj.dcm")


@pytest.fixture()
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PEER_PASSWORD", "s3cret-p4ss")
    return "s3cret-p4ss"


@pytest.mark.parametrize("transport", ["fhir", "stow-rs"])
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_attempt_and_the_password_stays_home(
    tmp_path: Path, password: str, transport: str, status: int
) -> None:
    other = CapturingServer(_free_port())
    hostile = HostileHttp(
        _free_port(), "redirect", location=other.url + "/elsewhere", status=status
    )
    destination = Destination(
        name="peer",
        transport=transport,  # type: ignore[arg-type]
        url=hostile.url + "/base",
        username="cxrbatch",
        password_env="PEER_PASSWORD",
        timeout_seconds=5,
    )
    try:
        with pytest.raises(SendError, match=rf"HTTP {status} redirecting to .*not followed"):
            if transport == "fhir":
                fhir_transaction(destination, BUNDLE)
            else:
                send(destination, [_object_file(tmp_path)], "CXRBATCH")
    finally:
        other.stop()
        hostile.stop()
    assert other.requests == []  # nothing reached the other origin, no credentials
    assert len(hostile.seen) == 1 and hostile.seen[0][1]["Authorization"].startswith("Basic ")


@pytest.mark.parametrize("mode", ["trickle", "silent"])
def test_http_peers_that_trickle_or_never_answer_end_at_the_deadline(
    tmp_path: Path, mode: str
) -> None:
    hostile = HostileHttp(_free_port(), mode)
    fhir = Destination(name="ehr", transport="fhir", url=hostile.url, timeout_seconds=DEADLINE)
    stow = fhir.model_copy(update={"name": "pacs", "transport": "stow-rs"})
    try:
        for attempt in (lambda: fhir_transaction(fhir, BUNDLE),
                        lambda: send(stow, [_object_file(tmp_path)], "CXRBATCH")):  # fmt: skip
            started = time.monotonic()
            with pytest.raises(SendError, match="total deadline of 2 s"):
                attempt()
            assert time.monotonic() - started < DEADLINE + SLACK
    finally:
        hostile.stop()


@pytest.mark.parametrize("mode", ["trickle", "silent"])
def test_mllp_peers_that_trickle_or_never_answer_end_at_the_deadline(mode: str) -> None:
    hostile = HostileMllp(_free_port(), mode)
    ris = Destination(
        name="ris", transport="hl7-mllp", host="127.0.0.1", port=hostile.port,
        timeout_seconds=DEADLINE,
    )  # fmt: skip
    message = "MSH|^~\\&|CXRBATCH||RIS||20261203120000||ORU^R01^ORU_R01|CTRL1|P|2.5\r"
    started = time.monotonic()
    try:
        with pytest.raises(SendError, match="no complete ACK within its total deadline of 2 s"):
            mllp(ris, message, "CTRL1")
    finally:
        hostile.stop()
    assert time.monotonic() - started < DEADLINE + SLACK
    assert hostile.received == 1


def test_a_pacs_holding_a_c_store_is_cut_off_at_the_deadline(tmp_path: Path) -> None:
    release = threading.Event()

    def hold(event: evt.Event) -> int:
        release.wait(60)
        return 0x0000

    obj = _object_file(tmp_path)
    scp = AE(ae_title="SLOWPACS")
    scp.add_supported_context(pydicom.dcmread(obj).SOPClassUID)
    port = _free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, hold)]
    )
    pacs = Destination(
        name="pacs", ae_title="SLOWPACS", host="127.0.0.1", port=port, timeout_seconds=30
    )
    started = time.monotonic()
    try:
        with (
            exchange.deadline(DEADLINE, "delivery to pacs"),
            pytest.raises(SendError, match="total deadline of 2 s"),
        ):
            send(pacs, [obj], "CXRBATCH")
    finally:
        release.set()
        server.shutdown()
    assert time.monotonic() - started < DEADLINE + SLACK


def test_a_peers_answer_cannot_forge_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    hostile = HostileHttp(_free_port(), "error")
    fhir = Destination(name="ehr", transport="fhir", url=hostile.url, timeout_seconds=5)
    try:
        with pytest.raises(SendError) as failed:
            fhir_transaction(fhir, BUNDLE)
    finally:
        hostile.stop()
    reason = str(failed.value)
    assert "HTTP 400" in reason and "forged" in reason  # quoted, on one line
    assert "\r" not in reason and "\n" not in reason and "\\r\\n" in reason


def test_hostile_peers_through_the_delivery_queue(
    tmp_path: Path,
    classified_models: tuple[Settings, pipeline.Models],
    password: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One processed study, four destinations that misbehave: each delivery ends failed
    within its deadline with its reason, none is counted sent, the other origin sees
    nothing, and every log line stays one line."""
    configured, loaded = classified_models
    other = CapturingServer(_free_port())
    redirect = HostileHttp(_free_port(), "redirect", location=other.url + "/x")
    trickle_http = HostileHttp(_free_port(), "trickle")
    trickle_mllp = HostileMllp(_free_port(), "trickle")
    auth = {"username": "cxrbatch", "password_env": "PEER_PASSWORD"}
    destinations = (
        Destination(name="ehr", transport="fhir", url=redirect.url, **auth),
        Destination(name="web", transport="stow-rs", url=redirect.url, **auth),
        Destination(name="slowweb", transport="stow-rs", url=trickle_http.url,
                    timeout_seconds=DEADLINE),
        Destination(name="ris", transport="hl7-mllp", host="127.0.0.1",
                    port=trickle_mllp.port, timeout_seconds=DEADLINE),
    )  # fmt: skip
    send_settings = configured.send.model_copy(
        update={"destinations": destinations, "backoff_base_seconds": 0.0}
    )
    settings = configured.model_copy(update={"send": send_settings})
    out = tmp_path / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    upgrade(url)
    sessions = session_factory(make_engine(url))
    study = write_study(tmp_path / "gen", 0, seed=41, size=(256, 256))
    spool = Spool(out / "_spool", sessions, out / "_q", study_stable_seconds=0.0)
    assert spool.take(study.path) is Taken.RECEIVED
    site = Site(settings, out, url)
    try:
        QueueWorker(site, loaded).run(until_idle=True)
        started = time.monotonic()
        with caplog.at_level(logging.INFO):
            ended = Sender(settings, sessions, site.roots).send_due()
        elapsed = time.monotonic() - started
    finally:
        for peer in (other, redirect, trickle_http, trickle_mllp):
            peer.stop()
    assert ended == {"failed": 4}, ended
    assert elapsed < 2 * DEADLINE + 4 * SLACK, elapsed
    with sessions() as session:
        rows = {d.destination: d for d in session.scalars(select(tables.Delivery))}
    assert {name: row.status for name, row in rows.items()} == dict.fromkeys(
        ("ehr", "web", "slowweb", "ris"), "failed"
    )
    assert "redirecting to" in rows["ehr"].last_error
    assert "redirecting to" in rows["web"].last_error
    assert "total deadline of 2 s" in rows["slowweb"].last_error
    assert "total deadline of 2 s" in rows["ris"].last_error
    assert other.requests == []
    for record in caplog.records:
        assert "\n" not in record.getMessage() and password not in record.getMessage()

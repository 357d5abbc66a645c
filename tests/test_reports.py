"""The report transports through the delivery queue: HL7 v2 ORU^R01 over MLLP to a local
listener that NAKs, drops the connection, then ACKs; a FHIR transaction Bundle to a local
endpoint that validates it with fhir.resources, fails once, then stores it. Each ends sent
after its retries; a reprocessed study's reports say they correct the earlier ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from cxrbatch import pipeline
from cxrbatch.config import Destination, Settings
from cxrbatch.db import models as tables
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.domain import DISCLAIMER, DeliveryStatus
from cxrbatch.ingest.spool import Spool, Taken
from cxrbatch.send.sender import Sender
from cxrbatch.send.transports import SendError, check_ack
from cxrbatch.site import Site
from cxrbatch.worker import QueueWorker
from cxrbatch_training.synthetic import make_phantom, save, to_dataset, write_study
from tests.peers import FhirEndpoint, MllpListener
from tests.test_scp import _free_port


def _statuses(sessions: object) -> dict[str, str]:
    with sessions() as session:  # type: ignore[operator]
        rows = session.scalars(select(tables.Delivery).order_by(tables.Delivery.id))
        return {row.destination: row.status for row in rows}


def test_hl7_and_fhir_reports_are_retried_until_acknowledged(
    tmp_path: Path, classified_models: tuple[Settings, pipeline.Models]
) -> None:
    configured, loaded = classified_models
    listener = MllpListener(_free_port(), mode="nak")
    endpoint = FhirEndpoint(_free_port(), status=503)
    send = configured.send.model_copy(
        update={
            "backoff_base_seconds": 0.0,
            "max_attempts": 5,
            "destinations": (
                Destination(
                    name="ris",
                    transport="hl7-mllp",
                    host="127.0.0.1",
                    port=listener.server.server_address[1],
                    receiving_application="RIS",
                    timeout_seconds=5,
                ),
                Destination(name="ehr", transport="fhir", url=endpoint.url, timeout_seconds=5),
            ),
        }
    )
    settings = configured.model_copy(update={"send": send})
    out = tmp_path / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    upgrade(url)
    sessions = session_factory(make_engine(url))
    study = write_study(tmp_path / "gen", 0, seed=31, size=(256, 256))
    spool = Spool(out / "_spool", sessions, out / "_q", study_stable_seconds=0.0)
    assert spool.take(study.path) is Taken.RECEIVED
    site = Site(settings, out, url)
    try:
        QueueWorker(site, loaded).run(until_idle=True)
        sender = Sender(settings, sessions, site.roots)
        first = sender.send_due()
        assert first == {"failed": 2}, first
        assert _statuses(sessions) == {"ris": "failed", "ehr": "failed"}
        with sessions() as session:
            errors = {d.destination: d.last_error for d in session.scalars(select(tables.Delivery))}
        assert "answered AE (not accepted): unknown accession" in errors["ris"]
        assert "HTTP 503" in errors["ehr"] and "server unavailable" in errors["ehr"]

        listener.mode = "drop"
        endpoint.status = 200
        second = sender.send_due()
        assert second == {"failed": 1, "sent": 1}, second
        with sessions() as session:
            ris = session.scalar(
                select(tables.Delivery).where(tables.Delivery.destination == "ris")
            )
            assert ris is not None and "closed the connection before an ACK" in ris.last_error

        listener.mode = "ack"
        assert sender.send_due() == {"sent": 1}
        assert _statuses(sessions) == {"ris": "sent", "ehr": "sent"}
    finally:
        listener.stop()
        endpoint.stop()
    assert endpoint.invalid == [] and listener.invalid == []

    # What the messages say is what the database says.
    with sessions() as session:
        outcome = session.scalars(select(tables.Outcome)).one()
        findings = {
            f.label: f for image in outcome.images for f in image.findings if f.role == "classifier"
        }
        accession = outcome.study.accession_number
        models = outcome.models
    assert accession and set(findings) == {"Mass", "Nodule", "Pneumonia", "Edema", "Fibrosis"}
    assert len(listener.messages) == 3  # the NAKed, the dropped and the acknowledged one
    message = listener.messages[-1]
    text = listener.raw[-1]
    assert message.msh.msh_9.value == "ORU^R01^ORU_R01"
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_3.value == accession and order.obr.obr_25.value == "F"
    observations = {
        obx.obx_3.obx_3_1.value: obx for obx in (group.obx for group in order.oru_r01_observation)
    }
    assert observations["TRIAGE"].obx_5.value == outcome.triage
    assert float(observations["NOFINDING"].obx_5.value) == pytest.approx(
        outcome.no_finding_score, abs=1e-4
    )
    for label, finding in findings.items():
        obx = observations[label.upper()]
        assert float(obx.obx_5.value) == pytest.approx(finding.probability, abs=1e-4)
    # Mass has a threshold in the tiny bundle: its call is flagged, the others are not.
    assert observations["MASS"].obx_8.value == ("A" if findings["Mass"].positive else "N")
    assert observations["NODULE"].obx_8.value == ""
    assert all(m["sha256"] in text for m in models) and "NOT FOR DIAGNOSTIC USE" in text
    assert "SYNTHETIC" in text

    (bundle, *_) = endpoint.bundles[-1:]
    resources = [entry["resource"] for entry in bundle["entry"]]
    (diagnostic,) = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    observed = {
        r["code"]["coding"][0]["code"]: r for r in resources if r["resourceType"] == "Observation"
    }
    assert diagnostic["status"] == "final"
    assert diagnostic["identifier"][1]["value"] == accession
    for label, finding in findings.items():
        value = observed[label.lower()]["valueQuantity"]["value"]
        assert value == pytest.approx(finding.probability, abs=1e-6)
    assert DISCLAIMER in diagnostic["conclusion"] and "SYNTHETIC" in diagnostic["conclusion"]
    assert len(diagnostic["result"]) == len(observed)

    # Reprocessed (a new outcome): the next reports correct the earlier ones.
    listener = MllpListener(_free_port(), mode="ack")
    endpoint = FhirEndpoint(_free_port())
    moved = settings.send.model_copy(
        update={
            "destinations": (
                settings.send.destinations[0].model_copy(
                    update={"port": listener.server.server_address[1]}
                ),
                settings.send.destinations[1].model_copy(update={"url": endpoint.url}),
            )
        }
    )
    settings = settings.model_copy(update={"send": moved})
    try:
        # A late image of the study: a new outcome supersedes the first.
        late = to_dataset(make_phantom(99, (256, 256)), "31/0", instance=2)
        assert spool.take(save(late, tmp_path / "late" / "IM2")) is Taken.RECEIVED
        QueueWorker(Site(settings, out, url), loaded).run(until_idle=True)
        assert Sender(settings, sessions, site.roots).send_due() == {"sent": 2}
    finally:
        listener.stop()
        endpoint.stop()
    corrected = listener.messages[-1].oru_r01_patient_result.oru_r01_order_observation
    assert corrected.obr.obr_25.value == "C"
    resources = [entry["resource"] for entry in endpoint.bundles[-1]["entry"]]
    assert {r["status"] for r in resources} == {"corrected"}
    with sessions() as session:
        rows = list(session.scalars(select(tables.Delivery).order_by(tables.Delivery.id)))
    assert [r.status for r in rows] == [DeliveryStatus.SENT] * 4


def test_an_ack_for_another_message_or_not_hl7_is_not_success() -> None:
    ack = "MSH|^~\\&|RIS||CXRBATCH||20261203120000||ACK|X|P|2.5\rMSA|AA|OTHER\r"
    with pytest.raises(SendError, match="acknowledged message 'OTHER', not 'MINE'"):
        check_ack(ack, "MINE", "MLLP test")
    with pytest.raises(SendError, match="not an HL7 ACK"):
        check_ack("HTTP/1.1 200 OK", "MINE", "MLLP test")
    rejected = "MSH|^~\\&|RIS||CXRBATCH||20261203120000||ACK|X|P|2.5\rMSA|AR|MINE|no such order\r"
    with pytest.raises(SendError, match=r"answered AR .*no such order"):
        check_ack(rejected, "MINE", "MLLP test")


def test_report_destinations_are_validated() -> None:
    with pytest.raises(ValueError, match="'hl7-mllp' needs host"):
        Destination(name="ris", transport="hl7-mllp")
    with pytest.raises(ValueError, match="'fhir' needs an http"):
        Destination(name="ehr", transport="fhir", url="fhir.local")


def test_an_oru_is_accepted_by_hl7apys_own_mllp_server() -> None:
    """Another implementation of the RIS side: hl7apy's MLLPServer, routing by message type
    (ORU^R01), parses our framing and message and answers an ACK built by hl7apy."""
    import datetime as dt
    import threading

    from hl7apy.core import Message
    from hl7apy.mllp import AbstractHandler, MLLPServer
    from hl7apy.parser import parse_message

    from cxrbatch.domain import Report, ReportedFinding
    from cxrbatch.send import messages
    from cxrbatch.send.transports import mllp

    received: list[str] = []

    class Oru(AbstractHandler):  # type: ignore[misc]
        def reply(self) -> str:
            incoming = parse_message(self.incoming_message, find_groups=False)
            received.append(self.incoming_message)
            ack = Message("ACK", version="2.5")
            ack.msh.msh_9 = "ACK^R01^ACK"
            ack.msa.msa_1 = "AA"
            ack.msa.msa_2 = incoming.msh.msh_10.value
            return f"\x0b{ack.to_er7()}\x1c\x0d"  # hl7apy's handlers frame their answers

    port = _free_port()
    server = MLLPServer("127.0.0.1", port, {"ORU^R01^ORU_R01": (Oru,)})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    report = Report(
        1,
        "1.2.3.4",
        "ACC-1",
        "MRN-1",
        "DOE^JANE",
        dt.date(2026, 11, 30),
        dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.UTC),
        "abnormal",
        0.31,
        0.35,
        (ReportedFinding("Mass", 0.69, 0.5, True),),
        ({"name": "m", "version": "1", "sha256": "ab" * 32, "synthetic_training_data": True},),
        True,
        False,
        False,
        False,
    )
    message = messages.oru_r01(report, control_id="CXR1.1.test", sending_application="CXRBATCH")
    try:
        mllp(
            Destination(name="ris", transport="hl7-mllp", host="127.0.0.1", port=port),
            message,
            "CXR1.1.test",
        )
    finally:
        server.shutdown()
        server.server_close()
    (text,) = received
    assert "ACC-1" in text and "NOT FOR DIAGNOSTIC USE" in text and "SYNTHETIC" in text

"""Header values as real archives send them: a PatientName and a PatientID with a backslash
(several values where the IOD defines one), an accession number holding MLLP frame bytes,
NUL and a right-to-left override. The study is processed (not failed); the SEG and SR carry
the patient's values exactly as received (so a PACS files them with their source) and
read back with highdicom; dciodvfy finds in them no error the source does not have; the
HL7 ORU carries the values as repetitions with every control byte escaped (hl7apy and
python-hl7 parse it) and the FHIR Bundle validates; result.json and the results table
print the values as DICOM encodes them, never as a Python list."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from cxrbatch import pipeline
from cxrbatch.config import Destination, Settings
from cxrbatch.db import models as tables
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.ingest.spool import Spool, Taken
from cxrbatch.paths import resolve_stored
from cxrbatch.send.sender import Sender
from cxrbatch.site import Site
from cxrbatch.worker import QueueWorker
from cxrbatch_training.synthetic import make_phantom, save, to_dataset
from tests.conftest import dciodvfy_errors
from tests.peers import FhirEndpoint, MllpListener
from tests.test_scp import _free_port

NAME = "DOE^JOHN\\SMITH^J"
PATIENT_ID = "ID1234\\E"
ACCESSION = "AC\x0b\x1c\x00\u202eX"
# The attributes dciodvfy faults in the source (value multiplicity, SH characters): the
# outputs carry them as received, and have no error the source does not have.
INHERITED = ("<PatientName>", "<PatientID>", "Accession Number")


def test_backslashes_and_control_bytes_from_the_header(
    tmp_path: Path, classified_models: tuple[Settings, pipeline.Models]
) -> None:
    configured, loaded = classified_models
    listener = MllpListener(_free_port(), mode="ack")
    endpoint = FhirEndpoint(_free_port())
    destinations = (
        Destination(name="ris", transport="hl7-mllp", host="127.0.0.1",
                    port=listener.server.server_address[1], timeout_seconds=10),
        Destination(name="ehr", transport="fhir", url=endpoint.url, timeout_seconds=10),
    )  # fmt: skip
    settings = configured.model_copy(
        update={"send": configured.send.model_copy(update={"destinations": destinations})}
    )
    source = to_dataset(make_phantom(81, (256, 256)), "81/0")
    source.PatientName = NAME
    source.PatientID = PATIENT_ID
    source.AccessionNumber = ACCESSION
    assert source["PatientName"].VM == 2 and source["PatientID"].VM == 2
    path = save(source, tmp_path / "in" / "IM1")
    # dciodvfy's complaints about the source: these values break the standard already.
    source_errors = set(dciodvfy_errors(path))
    for name in INHERITED:
        assert any(name in e for e in source_errors), name

    out = tmp_path / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    upgrade(url)
    sessions = session_factory(make_engine(url))
    spool = Spool(out / "_spool", sessions, out / "_q", study_stable_seconds=0.0)
    assert spool.take(path) is Taken.RECEIVED
    site = Site(settings, out, url)
    try:
        QueueWorker(site, loaded).run(until_idle=True)
        with sessions() as session:
            outcome = session.scalars(select(tables.Outcome)).one()
            assert outcome.status == "processed", outcome.reason
            outputs = outcome.outputs
            assert outcome.study.patient_id == PATIENT_ID  # as DICOM writes it
            assert outcome.study.patient_name == NAME
        assert Sender(settings, sessions, site.roots).send_due() == {"sent": 2}
    finally:
        listener.stop()
        endpoint.stop()

    # The SEG and SR: the patient's values as received, read back by highdicom; dciodvfy
    # finds no error the source does not have (the value multiplicity it reports there).
    (seg_path,) = [resolve_stored(p, site.roots) for p in outputs["seg"].values()]
    sr_path = resolve_stored(outputs["sr"], site.roots)
    for written in (seg_path, sr_path):
        ds = pydicom.dcmread(written)
        assert list(ds.PatientName) == ["DOE^JOHN", "SMITH^J"], written.name
        assert list(ds.PatientID) == ["ID1234", "E"], written.name
        errors = set(dciodvfy_errors(written))
        assert errors and errors <= source_errors, errors - source_errors
    hd.seg.segread(seg_path)
    hd.sr.srread(sr_path)
    document = json.loads(resolve_stored(outputs["json"], site.roots).read_text())
    assert "['" not in json.dumps(document)

    # HL7: repetitions, no raw control byte anywhere in the message; two parsers read it.
    assert listener.invalid == [] and endpoint.invalid == []
    (text,) = listener.raw
    assert not any(ch in text for ch in "\x00\x0b\x1c\u202e\n")
    pid = listener.messages[0].oru_r01_patient_result.oru_r01_patient.pid
    assert [f.value for f in pid.pid_3] == ["ID1234", "E"]
    assert [f.value for f in pid.pid_5] == ["DOE^JOHN", "SMITH^J"]
    # Each control character marked (U+202E was written as "?" in the file already: the
    # source's default character set cannot hold it).
    assert "ORC|RE||AC\ufffd\ufffd\ufffd?X\r" in text
    import hl7

    parsed = hl7.parse(text)
    assert str(parsed.segment("PID")[3]) == "ID1234~E"
    # FHIR: the identifier as DICOM writes the value (the Bundle validated at the endpoint).
    (bundle,) = endpoint.bundles
    subjects = {
        json.dumps(e["resource"].get("subject"))
        for e in bundle["entry"]
        if "subject" in e["resource"]
    }
    assert subjects == {json.dumps({"identifier": {"value": PATIENT_ID}})}


@pytest.mark.parametrize("value", ["A\\B", "A"])
def test_header_text_is_dicoms_encoding(value: str) -> None:
    from cxrbatch.dicom.export import text

    ds = pydicom.Dataset()
    ds.PatientID = value
    assert text(ds.PatientID) == value


def test_hl7_text_marks_control_and_bidi_characters() -> None:
    from cxrbatch.send.messages import _hl7_text

    assert _hl7_text("a|b\u202ec\x0bd\r\ne\\f^g&h~i\x00") == (
        "a\\F\\b\ufffdc\ufffdd  e\\E\\f\\S\\g\\T\\h\\R\\i\ufffd"
    )

"""cxrbatch against a real PACS (Orthanc) and failing peers.

- Orthanc pushes two studies to `cxrbatch watch` by C-STORE; cxrbatch processes them and
  sends SEG, SR and key images back by C-STORE; Orthanc holds them in the same studies,
  referencing the source images, and each passes dciodvfy as Orthanc returns it.
- `cxrbatch process` sends by STOW-RS to Orthanc's DICOMweb; a destination that is down
  fails with its reason, goes dead after max_attempts, and is delivered once it is up and
  `cxrbatch send --retry-dead` runs.
- A peer that refuses an object (status 0xA700) fails the delivery with that status.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

from cxrbatch.config import Destination, load_settings
from cxrbatch.send.transports import SendError, c_store
from cxrbatch_training.synthetic import write_studies
from tests.conftest import dciodvfy_errors, real_file
from tests.orthanc import Orthanc
from tests.test_daemon import _Daemon, daemons  # noqa: F401 (fixture)
from tests.test_scp import _free_port

SEG = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR Storage
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State Storage


@pytest.fixture()
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(
        tmp_path / "orthanc",
        _free_port(),
        _free_port(),
        {"cxrbatch": ("CXRBATCH", "127.0.0.1", _free_port())},
    )
    pacs.start()
    yield pacs
    pacs.stop()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrbatch.cli", *args], capture_output=True, text=True, timeout=600
    )


def _check_returned_study(pacs: Orthanc, source_path: Path, tmp_path: Path) -> None:
    """The study in Orthanc holds the source and our SEG, SR and key image, each in the
    source's study and patient, referencing the source."""
    source = dcmread(source_path, stop_before_pixels=True)
    study_id = pacs.study_id(source.StudyInstanceUID)
    assert study_id is not None
    found: dict[str, tuple[Dataset, Path]] = {}
    for index, data in enumerate(pacs.instance_files(study_id)):
        ds = dcmread(io.BytesIO(data))
        if ds.SOPInstanceUID == source.SOPInstanceUID:
            continue
        path = tmp_path / f"returned_{index}.dcm"
        path.write_bytes(data)
        assert dciodvfy_errors(path) == [], (ds.Modality, path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        found[str(ds.SOPClassUID)] = (ds, path)
    assert set(found) == {SEG, SR, SC, GSPS}, sorted(found)
    seg = hd.seg.segread(found[SEG][1])
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    sr = hd.sr.srread(found[SR][1])
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert {source.SOPInstanceUID, seg.SOPInstanceUID} <= evidence
    key = found[SC][0]
    assert key.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert key.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSTIC USE" in key.SeriesDescription
    state = found[GSPS][0]
    shown = state.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert shown.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_orthanc_pushes_studies_and_receives_seg_sr_and_key_images(
    tmp_path: Path,
    orthanc: Orthanc,
    daemons: list[_Daemon],  # noqa: F811
) -> None:
    (phantom,) = write_studies(tmp_path / "generated", 1, seed=41, size=(512, 512))
    sources = [phantom.path, real_file("RG1_UNCR.dcm")]
    study_ids = [orthanc.upload(path)["ParentStudy"] for path in sources]
    cxrbatch_port = orthanc.get("/modalities/cxrbatch/configuration")["Port"]

    daemon = _Daemon(tmp_path / "node", workers=1)
    daemon.source = ["--listen", str(cxrbatch_port)]
    daemons.append(daemon)
    daemon.config.write_text(
        daemon.config.read_text()
        + f"""
[dicom]
bind_address = "127.0.0.1"
allowed_calling_ae_titles = ["ORTHANC"]
allowed_hosts = ["127.0.0.1"]
[output]
key_image = true
[send]
poll_interval_seconds = 0.5
backoff_base_seconds = 1.0
[[send.destinations]]
name = "orthanc"
transport = "dimse"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}
"""
    )
    daemon.start()
    daemon.wait_for(lambda: orthanc.echo("cxrbatch"), 90, "cxrbatch answering C-ECHO")
    orthanc.post("/modalities/cxrbatch/store", {"Resources": study_ids, "Synchronous": True})

    def sent() -> int:
        rows = daemon.query("SELECT count(*) FROM deliveries WHERE status = 'sent'")
        return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]

    daemon.wait_for(lambda: sent() == 2, 300, "both studies' results sent back")
    for path in sources:
        _check_returned_study(orthanc, path, tmp_path)
    status = json.loads(_cli("status", "--out", str(daemon.out), "--format", "json").stdout)
    assert status["deliveries"]["orthanc"]["sent"] == 2
    assert status["undelivered"] == []
    assert daemon.terminate(timeout=60) == 0


class _StorageScp:
    """A storage SCP answering every C-STORE with `status`; keeps what it stored."""

    def __init__(
        self, port: int, status: int = 0x0000, refuse: frozenset[str] = frozenset()
    ) -> None:
        self.port, self.status = port, status
        self.received: list[str] = []
        ae = AE(ae_title="DOWNSTREAM")
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax not in refuse:  # a PACS that does not take these
                ae.add_supported_context(context.abstract_syntax)
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPClassUID))
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


def test_stow_rs_and_a_destination_that_is_down_then_up(tmp_path: Path, orthanc: Orthanc) -> None:
    if not orthanc.dicomweb:
        pytest.skip("the Orthanc DICOMweb plugin (orthanc-dicomweb) is not installed")
    (phantom,) = write_studies(tmp_path / "in", 1, seed=43, size=(384, 384))
    down_port = _free_port()
    config = tmp_path / "site.toml"
    config.write_text(
        f"""
[segmentation]
device = "cpu"
[send]
max_attempts = 2
backoff_base_seconds = 0.0
[[send.destinations]]
name = "web"
transport = "stow-rs"
url = "{orthanc.url}/dicom-web"
objects = ["seg", "sr"]
[[send.destinations]]
name = "archive"
transport = "dimse"
ae_title = "DOWNSTREAM"
host = "127.0.0.1"
port = {down_port}
timeout_seconds = 5
"""
    )
    out = tmp_path / "out"
    processed = _cli("process", str(tmp_path / "in"), "--out", str(out), "--config", str(config))
    assert processed.returncode == 0, processed.stderr[-2000:]
    assert "1 sent" in processed.stdout and "1 failed" in processed.stdout, processed.stdout

    # STOW-RS stored the SEG and SR in the study in Orthanc (its `objects`), not the key
    # image or the presentation state (the archive gets them).
    study_id = orthanc.study_id(phantom.study_instance_uid)
    assert study_id is not None
    modalities = sorted(dcmread(io.BytesIO(f)).Modality for f in orthanc.instance_files(study_id))
    assert modalities == ["SEG", "SR"]

    # Still down: the second attempt makes it dead; status says why.
    again = _cli("send", "--out", str(out), "--config", str(config))
    assert again.returncode == 1 and "1 dead" in again.stdout, again.stdout
    status = json.loads(_cli("status", "--out", str(out), "--format", "json").stdout)
    assert status["deliveries"]["archive"]["dead"] == 1
    assert status["deliveries"]["web"]["sent"] == 1
    (undelivered,) = status["undelivered"]
    assert undelivered["destination"] == "archive" and undelivered["attempts"] == 2
    assert "could not be established" in undelivered["last_error"]

    scp = _StorageScp(down_port)
    try:
        nothing = _cli("send", "--out", str(out), "--config", str(config))
        assert nothing.returncode == 0 and "nothing due" in nothing.stdout
        revived = _cli("send", "--out", str(out), "--config", str(config), "--retry-dead")
        assert revived.returncode == 0, revived.stdout + revived.stderr[-2000:]
        assert "1 sent" in revived.stdout
    finally:
        scp.stop()
    assert sorted(scp.received) == sorted([SEG, SR, SC, GSPS])
    status = json.loads(_cli("status", "--out", str(out), "--format", "json").stdout)
    assert status["deliveries"]["archive"]["sent"] == 1 and status["undelivered"] == []


def test_a_refused_object_fails_the_delivery_with_its_status(tmp_path: Path) -> None:
    port = _free_port()
    scp = _StorageScp(port, status=0xA700)
    source = write_studies(tmp_path, 1, seed=44, size=(256, 256))[0].path
    try:
        destination = Destination(name="x", ae_title="DOWNSTREAM", host="127.0.0.1", port=port)
        with pytest.raises(
            SendError,
            match=r"stored 0 of 1 objects.*0xA700 Refused: Out of Resources "
            r"\(Failure; PS3.4 B.2.3\)",
        ):
            c_store(destination, [dcmread(source)], "CXRBATCH")
    finally:
        scp.stop()
    assert len(scp.received) == 1


def test_destinations_are_validated() -> None:
    with pytest.raises(ValueError, match="needs ae_title and host"):
        Destination(name="pacs", transport="dimse", host="10.0.0.1")
    with pytest.raises(ValueError, match="needs an http"):
        Destination(name="web", transport="stow-rs", url="pacs:8042")


def test_the_example_site_config_loads_with_its_destinations() -> None:
    """config/site.example.toml is what operators copy: it must stay valid."""
    settings = load_settings(Path(__file__).parents[1] / "config" / "site.example.toml")
    assert [(d.name, d.transport) for d in settings.send.destinations] == [
        ("pacs", "dimse"),
        ("viewer", "stow-rs"),
    ]
    assert settings.output.key_image and settings.dicom.listen
    assert [(s.name, s.kind, s.retrieve) for s in settings.pull.sources] == [
        ("pacs", "dimse", "c-move")
    ]


def test_a_pacs_that_does_not_take_seg_gets_the_other_objects(tmp_path: Path) -> None:
    """A node that rejects the SEG's presentation context (many PACS do not store SEG): the
    SR, key image and presentation state are delivered, the delivery is sent (not retried
    until dead), and the SEG is recorded as not accepted and not as delivered."""
    write_studies(tmp_path / "in", 1, seed=45, size=(256, 256))
    port = _free_port()
    config = tmp_path / "site.toml"
    config.write_text(
        f"""
[segmentation]
device = "cpu"
[[send.destinations]]
name = "no-seg"
transport = "dimse"
ae_title = "DOWNSTREAM"
host = "127.0.0.1"
port = {port}
timeout_seconds = 30
"""
    )
    scp = _StorageScp(port, refuse=frozenset({SEG}))
    out = tmp_path / "out"
    try:
        processed = _cli(
            "process", str(tmp_path / "in"), "--out", str(out), "--config", str(config)
        )
    finally:
        scp.stop()
    assert processed.returncode == 0, processed.stdout + processed.stderr[-2000:]
    assert "1 sent" in processed.stdout, processed.stdout
    assert sorted(scp.received) == sorted([SR, SC, GSPS])
    with sqlite3.connect(out / "cxrbatch.sqlite") as db:
        ((status, objects, last_error),) = db.execute(
            "SELECT status, objects, last_error FROM deliveries"
        ).fetchall()
    assert status == "sent"
    assert sorted(o["sop_class"] for o in json.loads(objects)) == sorted([SR, SC, GSPS])
    assert last_error.startswith("not accepted by the destination: SEG")
    # The operator is told, with what to change.
    assert "does not accept 1 object(s)" in processed.stderr, processed.stderr[-2000:]

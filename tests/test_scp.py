"""The DICOM receiver in process, with pynetdicom as the sending PACS: C-ECHO, C-STORE into
the spool and queue, duplicates, conflicts, unusable data sets, refused peers, and a local
failure that must not be acknowledged."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cxrbatch.config import Destination, DicomSettings
from cxrbatch.db import models as tables
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.errors import ConfigError
from cxrbatch.ingest import scp
from cxrbatch.ingest.spool import Spool
from cxrbatch.send.transports import SendError, c_store
from cxrbatch_training.synthetic import make_phantom, save, to_dataset
from tests.conftest import tool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Node:
    def __init__(self, root: Path, **dicom: Any) -> None:
        self.out = root / "out"
        self.out.mkdir(parents=True)
        url = f"sqlite:///{self.out / 'cxrbatch.sqlite'}"
        upgrade(url)
        self.engine = make_engine(url)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        spool = Spool(self.out / "_spool", self.sessions, self.out / "_quarantine", mode="move")
        self.spool = spool
        self.settings = DicomSettings(
            listen=True, bind_address="127.0.0.1", port=_free_port(), **dicom
        )
        self.receiver = scp.DicomReceiver(self.settings, spool, self.out / "_incoming")

    def rows(self, table: Any) -> list[Any]:
        with self.sessions() as session:
            return list(session.scalars(select(table)))


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[_Node]:
    made = _Node(tmp_path)
    made.receiver.start()
    yield made
    made.receiver.stop()
    made.engine.dispose()


def _dataset(
    seed: int, modality: str = "CR", compress: bool = False, tmp: Path | None = None
) -> Dataset:
    ds = to_dataset(make_phantom(seed, (128, 128)), f"scp/{seed}", modality=modality)
    if compress and tmp is not None:
        return dcmread(save(ds, tmp / f"{seed}.dcm", "j2k"))
    return ds


def _send(
    port: int, datasets: list[Dataset], calling: str = "PACS", called: str = "CXRBATCH"
) -> list[int] | None:
    """C-STORE each data set in one association; None when the association is refused."""
    ae = AE(ae_title=calling)
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    for sop_class in (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation):
        for syntax in (ExplicitVRLittleEndian, JPEG2000Lossless):  # one context each
            ae.add_requested_context(sop_class, syntax)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        assert assoc.send_c_echo().Status == 0x0000
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_c_store_feeds_the_spool_and_queue_and_acknowledges_duplicates(
    node: _Node, tmp_path: Path
) -> None:
    first = _dataset(1)
    second = _dataset(2, modality="DX", compress=True, tmp=tmp_path)
    assert _send(node.settings.port, [first, second]) == [0x0000, 0x0000]
    instances = node.rows(tables.Instance)
    assert {i.sop_instance_uid for i in instances} == {
        str(first.SOPInstanceUID),
        str(second.SOPInstanceUID),
    }
    for instance in instances:  # in the spool, stored as received (J2K stays J2K)
        assert Path(instance.path).is_file()
        assert Path(instance.path).is_relative_to(node.out / "_spool")
    stored = dcmread(
        next(Path(i.path) for i in instances if i.sop_instance_uid == str(second.SOPInstanceUID))
    )
    assert stored.file_meta.TransferSyntaxUID == second.file_meta.TransferSyntaxUID
    jobs = node.rows(tables.Job)
    assert {j.study_instance_uid for j in jobs} == {
        str(first.StudyInstanceUID),
        str(second.StudyInstanceUID),
    }
    assert all(j.status == "queued" for j in jobs)
    # The PACS sends again: acknowledged, dropped, counted.
    assert _send(node.settings.port, [first]) == [0x0000]
    (again,) = [
        i for i in node.rows(tables.Instance) if i.sop_instance_uid == str(first.SOPInstanceUID)
    ]
    assert again.duplicates == 1
    assert list((node.out / "_incoming").iterdir()) == []


def test_the_same_data_set_from_another_writer_or_in_another_syntax_is_a_duplicate(
    node: _Node, tmp_path: Path
) -> None:
    """Identity is the data set's content, not the file's bytes (cxrbatch/dicom/identity.py):
    first exported to the folder by another application in Implicit VR, then sent by
    C-STORE in JPEG 2000 lossless and in Explicit VR, it is one instance received once."""
    from copy import deepcopy

    from cxrbatch.ingest.spool import Taken

    ds = _dataset(5)  # `save` compresses in place: each encoding gets its own copy
    exported = deepcopy(ds)
    exported.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.9999.1"
    exported.file_meta.ImplementationVersionName = "OTHER_PACS_1"
    export = save(exported, tmp_path / "export" / "IM1", "implicit")
    assert node.spool.take(export) is Taken.RECEIVED
    j2k = dcmread(save(deepcopy(ds), tmp_path / "j2k.dcm", "j2k"))
    assert _send(node.settings.port, [j2k, ds]) == [0x0000, 0x0000]
    (instance,) = node.rows(tables.Instance)
    assert instance.duplicates == 2
    assert node.rows(tables.RejectedFile) == []
    # A different pixel, or a different header value, is still a conflict in any syntax.
    pixels = deepcopy(ds)
    pixels.PixelData = bytes(len(ds.PixelData))
    header = deepcopy(ds)
    header.PatientName = "OTHER^PATIENT"
    other = dcmread(save(header, tmp_path / "other.dcm", "j2k"))
    assert _send(node.settings.port, [pixels, other]) == [scp.CONFLICT, scp.CONFLICT]
    assert len(node.rows(tables.RejectedFile)) == 2


def test_conflicts_and_unusable_data_sets_are_quarantined_and_refused(node: _Node) -> None:
    original = _dataset(3)
    assert _send(node.settings.port, [original]) == [0x0000]
    changed = original.copy()
    changed.PixelData = bytes(len(original.PixelData))
    no_study = _dataset(4)
    del no_study.StudyInstanceUID
    assert _send(node.settings.port, [changed, no_study]) == [scp.CONFLICT, scp.CANNOT_UNDERSTAND]
    reasons = [r.reason for r in node.rows(tables.RejectedFile)]
    assert any("conflict" in r for r in reasons) and len(reasons) == 2
    assert len(list((node.out / "_quarantine").glob("*.bin"))) == 2
    assert list((node.out / "_incoming").iterdir()) == []


def test_a_local_failure_is_not_acknowledged(
    node: _Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def disk_full(path: Path, expect: object = None) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node.receiver.spool, "take", disk_full)
    assert _send(node.settings.port, [_dataset(5)]) == [scp.OUT_OF_RESOURCES]
    # The log says why, in one line.
    (line,) = [r.getMessage() for r in caplog.records if "answered 0xA700" in r.getMessage()]
    assert line.endswith("OSError: [Errno 28] No space left on device"), line
    assert node.rows(tables.Instance) == []
    assert list((node.out / "_incoming").iterdir()) == []


def _refusal(port: int, calling: str = "PACS", called: str = "CXRBATCH") -> tuple[bool, bool, int]:
    """(rejected, aborted, A-ASSOCIATE-RJ diagnostic) of one association request."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return False, False, 0
    answer = assoc.acceptor.primitive
    diagnostic = int(answer.diagnostic) if answer is not None and answer.diagnostic else 0
    return bool(assoc.is_rejected), bool(assoc.is_aborted), diagnostic


def test_unknown_peers_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A-ASSOCIATE-RJ, never an abort: "calling AE title not recognised" (3) for an unknown
    title (pynetdicom's own check), "no reason given" (1) for a host not allowed; the log
    names the refused title and host."""
    titles = _Node(tmp_path / "a", allowed_calling_ae_titles=("PACS",))
    hosts = _Node(tmp_path / "b", allowed_hosts=("10.0.0.0/8",))
    for made in (titles, hosts):
        made.receiver.start()
    try:
        with caplog.at_level(logging.WARNING, logger="cxrbatch.ingest.scp"):
            assert _refusal(titles.settings.port, calling="INTRUDER") == (True, False, 3)
            assert _refusal(hosts.settings.port) == (True, False, 1)  # 127.0.0.1 not allowed
        refused = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
        assert any("'INTRUDER'" in line and "127.0.0.1" in line for line in refused), refused
        assert any("allowed_hosts" in line and "127.0.0.1" in line for line in refused), refused
        assert _send(titles.settings.port, [_dataset(6)], calling="INTRUDER") is None
        assert _send(titles.settings.port, [_dataset(6)], calling="PACS") == [0x0000]
        assert _send(titles.settings.port, [_dataset(7)], called="SOMEONE") is None
        assert _send(hosts.settings.port, [_dataset(8)]) is None
        assert hosts.rows(tables.Instance) == []
    finally:
        for made in (titles, hosts):
            made.receiver.stop()
            made.engine.dispose()


def test_bad_receiver_settings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allowed_hosts"):
        _Node(tmp_path / "a", allowed_hosts=("not-an-address",))
    with pytest.raises(ConfigError, match="go together"):
        _Node(tmp_path / "b", tls_certificate="/nonexistent.pem")
    with pytest.raises(ConfigError, match="TLS files cannot be used"):
        _Node(tmp_path / "c", tls_certificate="/nonexistent.pem", tls_key="/nonexistent.key")


def test_the_receiver_listens_beyond_loopback_only_with_an_allow_list(tmp_path: Path) -> None:
    assert DicomSettings().bind_address == "127.0.0.1"  # the default is loopback
    node = _Node(tmp_path / "node")
    everywhere = DicomSettings(listen=True, bind_address="0.0.0.0", port=_free_port())
    with pytest.raises(ConfigError, match="allowed_hosts is empty"):
        scp.DicomReceiver(everywhere, node.spool, tmp_path / "incoming")
    for allowed in (
        everywhere.model_copy(update={"allowed_hosts": ("127.0.0.1",)}),
        everywhere.model_copy(update={"allow_any": True}),
    ):
        receiver = scp.DicomReceiver(allowed, node.spool, tmp_path / "incoming")
        receiver.start()
        try:
            assert _send(allowed.port, []) == []  # an association and an echo
        finally:
            receiver.stop()
    node.engine.dispose()


def test_instances_a_crash_left_in_incoming_are_taken_at_start(tmp_path: Path) -> None:
    made = _Node(tmp_path)
    incoming = made.out / "_incoming"
    save(_dataset(9), incoming / "0123abcd.dcm")
    (incoming / ".half.dcm.tmp").write_bytes(b"partial")
    assert made.receiver.recover() == 1
    assert len(made.rows(tables.Instance)) == 1
    assert list(incoming.iterdir()) == []
    made.engine.dispose()


def _certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, and certificates it signed for the node (127.0.0.1) and a PACS client."""
    openssl = tool(
        "openssl",
        skip_reason="the openssl command is not installed",
        ci_reason="openssl is required in CI for the TLS tests",
    )
    folder.mkdir()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=cxrbatch test CA")  # fmt: skip
    (folder / "ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    for name in ("node", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "ext")  # fmt: skip
    return {p.name: p for p in folder.iterdir()}


def test_tls_receive_and_send(tmp_path: Path) -> None:
    """The receiver over TLS, fed by cxrbatch's own C-STORE SCU with TLS: stored when the
    SCU trusts the node's CA; refused without TLS or without that CA."""
    certs = _certificates(tmp_path / "tls")
    node = _Node(
        tmp_path / "n", tls_certificate=str(certs["node.pem"]), tls_key=str(certs["node.key"])
    )
    node.receiver.start()
    try:
        destination = {
            "name": "node", "ae_title": "CXRBATCH", "host": "127.0.0.1",
            "port": node.settings.port, "timeout_seconds": 10,
        }  # fmt: skip
        ds = _dataset(41)
        trusted = Destination(**destination, tls=True, tls_ca_certificates=str(certs["ca.pem"]))
        c_store(trusted, [ds], "PACS")
        assert [i.sop_instance_uid for i in node.rows(tables.Instance)] == [str(ds.SOPInstanceUID)]
        for refused in (Destination(**destination), Destination(**destination, tls=True)):
            with pytest.raises(SendError, match="could not be established"):
                c_store(refused, [_dataset(42)], "PACS")
        assert len(node.rows(tables.Instance)) == 1
    finally:
        node.receiver.stop()
        node.engine.dispose()


def test_tls_receiver_with_a_ca_requires_client_certificates(tmp_path: Path) -> None:
    certs = _certificates(tmp_path / "tls")
    node = _Node(
        tmp_path / "n",
        tls_certificate=str(certs["node.pem"]),
        tls_key=str(certs["node.key"]),
        tls_ca_certificates=str(certs["ca.pem"]),
    )
    node.receiver.start()
    try:

        def echo(client_certificate: bool) -> bool:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs["ca.pem"])
            if client_certificate:
                context.load_cert_chain(certs["client.pem"], certs["client.key"])
            ae = AE(ae_title="PACS")
            ae.acse_timeout = ae.network_timeout = 10
            ae.add_requested_context(Verification)
            assoc = ae.associate(
                "127.0.0.1", node.settings.port, ae_title="CXRBATCH",
                tls_args=(context, "127.0.0.1"),
            )  # fmt: skip
            if not assoc.is_established:
                return False
            try:
                return bool(assoc.send_c_echo().Status == 0x0000)
            finally:
                assoc.release()

        assert echo(client_certificate=True)
        assert not echo(client_certificate=False)
    finally:
        node.receiver.stop()
        node.engine.dispose()


def test_one_status_table_describes_every_code_for_receiver_and_senders() -> None:
    from cxrbatch.dicom import status

    assert status.describe(0xA700) == "0xA700 Refused: Out of Resources (Failure; PS3.4 B.2.3)"
    assert status.describe(0x0122) == "0x0122 Refused: SOP Class Not Supported (Failure; PS3.7 C)"
    assert "other content" in status.describe(scp.CONFLICT, ours=True)
    assert status.stored(0x0000) and status.stored(0xB000) and not status.stored(0xA700)
    assert scp.OUT_OF_RESOURCES == status.OUT_OF_RESOURCES == 0xA700

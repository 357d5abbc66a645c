"""Results already delivered are withdrawn when a study's outcome is superseded: an IOCM
rejection note (KOS, "Rejected for Quality Reasons") referencing the old SEG/SR goes first,
in the same delivery, to the destinations that hold them.

- Orthanc: a study processed and sent, then a late image: Orthanc holds the new SEGs and
  SR and the rejection note, which references exactly the first SEG and SR and passes
  dciodvfy (Orthanc keeps the old objects: it does not implement IOCM).
- A corrected instance (same SOP Instance UID, new content) is a conflict, quarantined,
  unless ingest.accept_corrections: then it replaces the first, the study is processed
  again and the first results are withdrawn.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
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
from tests.orthanc import Orthanc
from tests.test_scp import _free_port

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.33"
SC = "1.2.840.10008.5.1.4.1.1.7"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture()
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(
        tmp_path / "orthanc", _free_port(), _free_port(), {"cxrbatch": ("CXRBATCH", "127.0.0.1", 1)}
    )
    pacs.start()
    yield pacs
    pacs.stop()


class _Site:
    def __init__(self, root: Path, settings: Settings, loaded: pipeline.Models) -> None:
        self.out = root / "out"
        self.out.mkdir(parents=True)
        self.url = f"sqlite:///{self.out / 'cxrbatch.sqlite'}"
        upgrade(self.url)
        self.sessions = session_factory(make_engine(self.url))
        self.site = Site(settings, self.out, self.url)
        self.loaded = loaded
        self.spool = Spool.for_site(self.site, self.sessions)

    def process_and_send(self) -> dict[str, int]:
        QueueWorker(self.site, self.loaded).run(until_idle=True)
        return dict(Sender(self.site.settings, self.sessions, self.site.roots).send_due())

    def deliveries(self) -> list[tables.Delivery]:
        with self.sessions() as session:
            return list(session.scalars(select(tables.Delivery).order_by(tables.Delivery.id)))


def _settings(configured: Settings, destination: Destination, **ingest: object) -> Settings:
    return configured.model_copy(
        update={
            "send": configured.send.model_copy(
                update={"destinations": (destination,), "backoff_base_seconds": 0.0}
            ),
            "ingest": configured.ingest.model_copy(update={"study_stable_seconds": 0.0, **ingest}),
        }
    )


def test_a_late_image_withdraws_the_results_orthanc_holds(
    tmp_path: Path, orthanc: Orthanc, classified_models: tuple[Settings, pipeline.Models]
) -> None:
    configured, loaded = classified_models
    destination = Destination(
        name="orthanc", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port
    )
    site = _Site(tmp_path, _settings(configured, destination), loaded)
    first = save(to_dataset(make_phantom(5, (256, 256)), "51/0"), tmp_path / "in" / "IM1")
    orthanc.upload(first)
    assert site.spool.take(first) is Taken.RECEIVED
    assert site.process_and_send() == {"sent": 1}
    (delivered,) = site.deliveries()
    old = {item["sop_instance"]: item["sop_class"] for item in delivered.objects or []}
    assert sorted(old.values()) == sorted([SEG, SC, GSPS, SR]) and delivered.withdraws is None

    late = to_dataset(make_phantom(6, (256, 256)), "51/0", instance=2)
    orthanc.upload(save(late, tmp_path / "in" / "IM2"))
    assert site.spool.take(tmp_path / "in" / "IM2") is Taken.RECEIVED
    assert site.process_and_send() == {"sent": 1}
    _, again = site.deliveries()
    assert sorted(again.withdraws or []) == sorted(old)
    assert Path(again.files[0]).name.startswith("rejection_")  # the note goes first
    new = {item["sop_instance"] for item in again.objects or []}

    study_id = orthanc.study_id(str(late.StudyInstanceUID))
    assert study_id is not None
    held = {}
    for index, data in enumerate(orthanc.instance_files(study_id)):
        ds = dcmread(io.BytesIO(data))
        held[str(ds.SOPInstanceUID)] = ds
        if ds.SOPClassUID == KOS:
            note_path = tmp_path / f"kos_{index}.dcm"
            note_path.write_bytes(data)
    assert new <= set(held)  # the new SEGs, key images, presentation states and SR
    (note,) = [ds for ds in held.values() if ds.SOPClassUID == KOS]
    assert dciodvfy_errors(note_path) == []
    assert note.StudyInstanceUID == late.StudyInstanceUID
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    assert "NOT FOR DIAGNOSTIC USE" in note.SeriesDescription
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in note.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == set(old)
    read = hd.ko.KeyObjectSelectionDocument.from_dataset(note)
    assert {str(ds.SOPInstanceUID) for ds in [read]} == {str(note.SOPInstanceUID)}
    # Orthanc does not implement IOCM: the withdrawn objects are still there beside the note.
    assert set(old) <= set(held)


def test_a_corrected_instance_is_a_conflict_unless_corrections_are_accepted(
    tmp_path: Path, classified_models: tuple[Settings, pipeline.Models]
) -> None:
    from tests.test_pacs import _StorageScp

    configured, loaded = classified_models
    port = _free_port()
    scp = _StorageScp(port)
    destination = Destination(name="pacs", ae_title="DOWNSTREAM", host="127.0.0.1", port=port)
    original = to_dataset(make_phantom(8, (256, 256)), "52/0")
    corrected = to_dataset(make_phantom(8, (256, 256)), "52/0")
    corrected.PatientOrientation = ["P", "F"]  # the technologist fixed the orientation
    assert corrected.SOPInstanceUID == original.SOPInstanceUID
    try:
        strict = _Site(tmp_path / "strict", _settings(configured, destination), loaded)
        assert strict.spool.take(save(original, tmp_path / "a" / "IM1")) is Taken.RECEIVED
        assert strict.process_and_send() == {"sent": 1}
        assert strict.spool.take(save(corrected, tmp_path / "b" / "IM1")) is Taken.CONFLICT
        with strict.sessions() as session:
            (conflict,) = session.scalars(select(tables.RejectedFile))
            assert conflict.reason.startswith("conflict:") and conflict.quarantine_path

        accepting = _Site(
            tmp_path / "accepting",
            _settings(configured, destination, accept_corrections=True),
            loaded,
        )
        assert accepting.spool.take(save(original, tmp_path / "c" / "IM1")) is Taken.RECEIVED
        assert accepting.process_and_send() == {"sent": 1}
        assert accepting.spool.take(save(corrected, tmp_path / "d" / "IM1")) is Taken.CORRECTED
        assert accepting.process_and_send() == {"sent": 1}
    finally:
        scp.stop()
    first, second = accepting.deliveries()
    assert sorted(second.withdraws or []) == sorted(i["sop_instance"] for i in first.objects or [])
    assert scp.received.count(KOS) == 1
    with accepting.sessions() as session:
        (kept,) = session.scalars(select(tables.RejectedFile))
        assert kept.reason.startswith("superseded: a corrected instance") and kept.quarantine_path
        outcomes = list(session.scalars(select(tables.Outcome).order_by(tables.Outcome.id)))
        (instance,) = session.scalars(select(tables.Instance))
    assert [o.is_current for o in outcomes] == [False, True]
    stored = resolve_stored(instance.path, accepting.site.roots)
    assert dcmread(stored).PatientOrientation == ["P", "F"]

"""`cxrbatch pull` against a Q/R SCP that misbehaves on purpose (tests/peers.py): C-FIND,
C-MOVE and C-GET that answer "pending" forever end at the source's total deadline with
the study reported not complete (and the next run resumes it); a PACS that sends another
patient's study with the one asked for gets it refused and quarantined as "not requested"
(C-GET: a failure status; C-MOVE: on the pull's own receiver and on a shared one, the
running daemon's), counted, never queued; a window matching 5,000 studies is cut at
pull.max_studies with a C-CANCEL."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from cxrbatch.config import load_settings
from cxrbatch.db import models as tables
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.ingest.scp import DicomReceiver
from cxrbatch.ingest.spool import Spool
from cxrbatch_training.synthetic import make_phantom, to_dataset
from tests.peers import HostileQueryRetrieve
from tests.test_pull import DAY, _instances, _pull, _site, _summary
from tests.test_scp import _free_port

TIMEOUT = 2.0
SLACK = 3.0


def _archive() -> tuple[list[object], object]:
    """Two chest studies of the day, and another patient's study (the foreign one)."""
    first = to_dataset(make_phantom(71, (128, 128)), "71/0")
    second = to_dataset(make_phantom(72, (128, 128)), "72/0")
    foreign = to_dataset(
        make_phantom(73, (128, 128)), "73/0", patient_id="OTHER-9", patient_name="OTHER^PATIENT"
    )
    for ds in (first, second, foreign):
        ds.StudyDate = DAY
    return [first, second], foreign


def _source(port: int, retrieve: str = "c-move", **extra: object) -> str:
    text = (
        f'name = "hostile"\nae_title = "HOSTILE"\nhost = "127.0.0.1"\nport = {port}\n'
        f'retrieve = "{retrieve}"\ntimeout_seconds = {TIMEOUT}\n'
    )
    return text + "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())


def _jobs(out: Path) -> set[str]:
    sessions = session_factory(make_engine(f"sqlite:///{out / 'cxrbatch.sqlite'}"))
    with sessions() as session:
        return set(session.scalars(select(tables.Job.study_instance_uid)))


def _quarantine_reasons(out: Path) -> list[str]:
    return [
        json.loads(p.read_text())["reason"] for p in sorted((out / "_quarantine").glob("*.json"))
    ]


def test_a_study_level_c_find_pending_forever_ends_at_the_deadline(tmp_path: Path) -> None:
    archive, _ = _archive()
    pacs = HostileQueryRetrieve(_free_port(), archive, {"find-forever"})
    out, config = _site(tmp_path, _free_port(), _source(pacs.port))
    started = time.monotonic()
    try:
        code, output = _pull(out, config)
    finally:
        pacs.stop()
    assert time.monotonic() - started < TIMEOUT + SLACK
    assert code == 2, output
    assert "total deadline of 2 s" in output and "C-FIND" in output, output


@pytest.mark.parametrize("retrieve", ["c-move", "c-get"])
def test_a_retrieval_pending_forever_ends_at_the_deadline_and_the_next_run_resumes(
    tmp_path: Path, retrieve: str
) -> None:
    archive, _ = _archive()
    receiver = _free_port()
    pacs = HostileQueryRetrieve(
        _free_port(), archive, {"move-forever"}, moves={"CXRBATCH": ("127.0.0.1", receiver)}
    )
    out, config = _site(tmp_path, receiver, _source(pacs.port, retrieve))
    started = time.monotonic()
    try:
        code, output = _pull(out, config)
        elapsed = time.monotonic() - started
        # Both studies were tried, each cut off at its deadline; the same instance sent
        # over and over arrived once (the rest are duplicates).
        assert code == 1, output
        assert elapsed < 2 * (TIMEOUT + SLACK), elapsed
        assert output.count("not complete: study") == 2, output
        assert "total deadline of 2 s" in output, output
        # The PACS behaves again: the next run fetches what is missing.
        pacs.modes.clear()
        again_code, again = _pull(out, config)
    finally:
        pacs.stop()
    assert again_code == 0, again
    assert _summary(again)[0] == 2 and _instances(out) == 2


@pytest.mark.parametrize("retrieve", ["c-move", "c-get"])
def test_another_patients_study_sent_with_the_requested_one_is_refused(
    tmp_path: Path, retrieve: str
) -> None:
    archive, foreign = _archive()
    receiver = _free_port()
    pacs = HostileQueryRetrieve(
        _free_port(),
        archive[:1],
        {"foreign"},
        moves={"CXRBATCH": ("127.0.0.1", receiver)},
        foreign=foreign,
    )
    out, config = _site(tmp_path, receiver, _source(pacs.port, retrieve))
    try:
        code, output = _pull(out, config)
    finally:
        pacs.stop()
    # The study asked for is in; the other patient's instance is quarantined, counted, and
    # its study is never queued.
    assert code == 1, output
    assert _summary(output) == (1, 0, 1, 1, 0, 1), output
    assert "(1 not requested)" in output and "not asked for" in output
    assert _jobs(out) == {str(archive[0].StudyInstanceUID)}  # type: ignore[attr-defined]
    (reason,) = _quarantine_reasons(out)
    assert reason.startswith("not requested: study " + str(foreign.StudyInstanceUID))  # type: ignore[attr-defined]


def test_a_foreign_study_on_the_running_daemons_receiver_is_refused(tmp_path: Path) -> None:
    """C-MOVE to a receiver that is already listening (as `watch --listen` does): the
    pull's open retrieval tells it what to take; a plain push at the same time is taken."""
    archive, foreign = _archive()
    receiver_port = _free_port()
    pacs = HostileQueryRetrieve(
        _free_port(),
        archive[:1],
        {"foreign"},
        moves={"CXRBATCH": ("127.0.0.1", receiver_port)},
        foreign=foreign,
    )
    out, config = _site(tmp_path, receiver_port, _source(pacs.port))
    out.mkdir(parents=True)
    url = f"sqlite:///{(out / 'cxrbatch.sqlite').absolute()}"
    upgrade(url)
    settings = load_settings(config)
    sessions = session_factory(make_engine(url))
    daemon = DicomReceiver(
        settings.dicom,
        Spool(out / "_spool", sessions, out / "_quarantine", study_stable_seconds=0.0),
        out / "_incoming",
    )
    daemon.start()
    try:
        code, output = _pull(out, config)
        # A push from a modality (no C-MOVE) to the same receiver is taken as before.
        from pynetdicom import AE

        push = to_dataset(make_phantom(74, (128, 128)), "74/0")
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(push.SOPClassUID)
        assoc = ae.associate("127.0.0.1", receiver_port, ae_title="CXRBATCH")
        assert assoc.is_established
        assert assoc.send_c_store(push).Status == 0x0000
        assoc.release()
    finally:
        daemon.stop()
        pacs.stop()
    assert "C-MOVE to the receiver already listening" in output  # the daemon's, not its own
    assert code == 1, output
    assert "(1 not requested)" in output, output
    assert _jobs(out) == {str(archive[0].StudyInstanceUID), str(push.StudyInstanceUID)}  # type: ignore[attr-defined]
    (reason,) = _quarantine_reasons(out)
    assert "not requested" in reason and "HOSTILE" in reason


def test_a_window_of_5000_matches_is_cut_at_max_studies(tmp_path: Path) -> None:
    archive, _ = _archive()
    pacs = HostileQueryRetrieve(_free_port(), archive, {"many"}, many=5000)
    out, config = _site(tmp_path, _free_port(), _source(pacs.port))
    config.write_text(
        config.read_text().replace("[[pull.sources]]", "[pull]\nmax_studies = 3\n[[pull.sources]]")
    )
    started = time.monotonic()
    try:
        code, output = _pull(out, config)
    finally:
        pacs.stop()
    assert code == 1, output
    assert "matched more than 3 studies" in " ".join(output.split()), output
    assert _summary(output)[0] == 3
    assert pacs.cancelled == 1  # one C-CANCEL (the other modality was not asked)
    assert time.monotonic() - started < TIMEOUT + SLACK

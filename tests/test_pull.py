"""`cxrbatch pull` against a real Orthanc holding two chest studies (one CR image; two DX
images in one series) and an MR study of the same day: C-FIND + C-MOVE (to the receiver
the pull runs), C-FIND + C-GET, and QIDO-RS + WADO-RS each bring the chest studies in,
once (a second pull fetches nothing), into the spool and queue, where they are processed.
A pull that finds a study half received fetches the rest (the way an interrupted pull
resumes); a PACS that does not answer is a one-line error."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from cxrbatch import pipeline
from cxrbatch.cli import app
from cxrbatch.config import load_settings
from cxrbatch.db import models as tables
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.ingest.spool import Spool, Taken
from cxrbatch.site import Site
from cxrbatch.worker import QueueWorker
from cxrbatch_training.synthetic import make_phantom, save, to_dataset
from tests.conftest import real_file
from tests.orthanc import Orthanc
from tests.test_scp import _free_port

DAY = "20260101"  # the phantoms' StudyDate


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Orthanc, int, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("pull")
    receiver_port = _free_port()
    orthanc = Orthanc(
        root / "orthanc",
        _free_port(),
        _free_port(),
        {"cxrbatch": ("CXRBATCH", "127.0.0.1", receiver_port)},
    )
    orthanc.start()
    try:
        files = _stored_studies(orthanc, root / "src")
        yield orthanc, receiver_port, files
    finally:  # stopped even when storing the studies fails (it was left running)
        orthanc.stop()


def _stored_studies(orthanc: Orthanc, src: Path) -> dict[str, Path]:
    """A CR, a two-image DX study and an MR on day DAY, stored into the PACS."""
    files = {
        "cr": save(to_dataset(make_phantom(61, (256, 256)), "61/0"), src / "cr"),
        "dx1": save(to_dataset(make_phantom(62, (256, 256)), "62/0", modality="DX"), src / "dx1"),
        "dx2": save(
            to_dataset(make_phantom(63, (256, 256)), "62/0", modality="DX", instance=2),
            src / "dx2",
        ),
    }
    mr = pydicom.dcmread(real_file("MR_small.dcm"))
    mr.StudyDate = DAY
    mr.save_as(src / "mr")
    files["mr"] = src / "mr"
    for path in files.values():
        orthanc.upload(path)
    return files


def _site(tmp_path: Path, receiver_port: int, source: str) -> tuple[Path, Path]:
    out = tmp_path / "out"
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "site.toml"
    config.write_text(
        f"""
[segmentation]
device = "cpu"
[ingest]
study_stable_seconds = 0.0
[dicom]
ae_title = "CXRBATCH"
port = {receiver_port}
[[pull.sources]]
{source}
"""
    )
    return out, config


def _pull(out: Path, config: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["pull", "--out", str(out), "--config", str(config), "--date", DAY, *extra]
    )
    return result.exit_code, result.output


def _summary(output: str) -> tuple[int, ...]:
    found = re.search(
        r"(\d+) studies found, (\d+) already here, (\d+) fetched: (\d+) instances received, "
        r"(\d+) duplicates, (\d+) quarantined",
        re.sub(r"\s+", " ", output),
    )
    assert found, output
    return tuple(int(g) for g in found.groups())


def _process(out: Path, config: Path, models: pipeline.Models) -> dict[str, str]:
    settings = load_settings(config)
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    QueueWorker(Site(settings, out.absolute(), url), models).run(until_idle=True)
    sessions = session_factory(make_engine(url))
    with sessions() as session:
        rows = session.execute(
            select(tables.Study.modality, tables.Outcome.status)
            .join(tables.Outcome)
            .where(tables.Outcome.is_current)
        )
        return {str(m): str(s) for m, s in rows}


def _instances(out: Path) -> int:
    sessions = session_factory(make_engine(f"sqlite:///{out / 'cxrbatch.sqlite'}"))
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(tables.Instance)) or 0)


SOURCES = {
    "c-move": 'name = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {port}\n',
    "c-get": 'name = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {port}\n'
    'retrieve = "c-get"\n',
    "qido-wado": 'name = "pacs"\nkind = "dicomweb"\nurl = "{url}/dicom-web"\n',
}


@pytest.mark.parametrize("how", sorted(SOURCES))
def test_each_way_brings_the_chest_studies_in_once_and_they_are_processed(
    tmp_path: Path,
    pacs: tuple[Orthanc, int, dict[str, Path]],
    models: pipeline.Models,
    how: str,
) -> None:
    orthanc, receiver_port, _ = pacs
    if how == "qido-wado" and not orthanc.dicomweb:
        pytest.skip("the Orthanc DICOMweb plugin (orthanc-dicomweb) is not installed")
    source = SOURCES[how].format(port=orthanc.dicom_port, url=orthanc.url)
    out, config = _site(tmp_path, receiver_port, source)
    code, output = _pull(out, config)
    assert code == 0, output
    # 2 chest studies (the MR one is not queried), 3 instances, nothing there before.
    assert _summary(output) == (2, 0, 2, 3, 0, 0)
    assert _instances(out) == 3
    again_code, again = _pull(out, config)
    assert again_code == 0 and _summary(again) == (2, 2, 0, 0, 0, 0), again
    assert _process(out, config, models) == {"CR": "processed", "DX": "processed"}


def test_a_half_received_study_gets_the_rest_and_a_silent_pacs_is_an_error(
    tmp_path: Path, pacs: tuple[Orthanc, int, dict[str, Path]]
) -> None:
    orthanc, receiver_port, files = pacs
    source = SOURCES["c-move"].format(port=orthanc.dicom_port, url=orthanc.url)
    out, config = _site(tmp_path, receiver_port, source)
    # As an interrupted pull leaves it: one of the DX series' two instances is in.
    out.mkdir()
    url = f"sqlite:///{(out / 'cxrbatch.sqlite').absolute()}"
    upgrade(url)
    spool = Spool(out / "_spool", session_factory(make_engine(url)), out / "_quarantine")
    partial = tmp_path / "dx1.dcm"
    partial.write_bytes(files["dx1"].read_bytes())
    assert spool.take(partial) is Taken.RECEIVED
    code, output = _pull(out, config, "--modality", "DX")
    assert code == 0, output
    # The DX study only; its series is fetched again: the missing instance is received,
    # the one already here arrives as a duplicate and is dropped.
    assert _summary(output) == (1, 0, 1, 1, 1, 0)
    assert _instances(out) == 2

    silent = SOURCES["c-move"].format(port=_free_port(), url="")
    out2, config2 = _site(tmp_path / "silent", receiver_port, silent)
    code, output = _pull(out2, config2)
    assert code == 2 and "association with ORTHANC@127.0.0.1" in output, output


def test_a_pacs_that_refuses_the_query_is_a_one_line_error(tmp_path: Path) -> None:
    """A Q/R SCP that answers C-FIND with 0xA700 (out of resources)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
    )

    def refuse(event: evt.Event) -> Iterator[tuple[int, None]]:
        yield 0xA700, None

    ae = AE(ae_title="BADPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = _free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, refuse)]
    )
    try:
        source = f'name = "bad"\nae_title = "BADPACS"\nhost = "127.0.0.1"\nport = {port}\n'
        out, config = _site(tmp_path, _free_port(), source)
        code, output = _pull(out, config)
    finally:
        server.shutdown()
    assert code == 2, output
    assert "C-FIND refused by BADPACS@127.0.0.1" in output and "0xA700" in output, output

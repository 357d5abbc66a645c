"""A campaign's manifest: a file it lists that is not there is counted as missing (not as
"gone", which means another ingest took it), and the rest is taken in place."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from cxrbatch.campaign import MISSING, _take_chunk, manifest_files
from cxrbatch.config import Settings
from cxrbatch.db.models import Job
from cxrbatch.db.session import upgrade
from cxrbatch.site import Site
from cxrbatch_training.synthetic import write_studies


def test_a_listed_file_that_is_not_there_is_missing(tmp_path: Path, settings: Settings) -> None:
    (study,) = write_studies(tmp_path / "archive", 1, seed=41, size=(128, 128))
    present = next((tmp_path / "archive").rglob("*.dcm"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"accession,path\nA1,{present}\nA2,archive/not-there.dcm\n")
    listed = list(manifest_files(manifest))
    assert listed == [present, tmp_path / "archive" / "not-there.dcm"]

    site = Site.at(settings, tmp_path / "out")
    site.out_dir.mkdir()
    upgrade(site.database_url)
    answers = _take_chunk(site, [str(p) for p in listed])
    assert answers == {"received": 1, MISSING: 1}
    assert present.is_file()  # taken in place: an archive is never moved
    with site.database() as database, database.sessions() as session:
        queued = session.scalars(select(Job.study_instance_uid)).all()
    assert queued == [study.study_instance_uid]

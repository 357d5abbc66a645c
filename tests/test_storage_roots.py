"""Paths in the database are relative to the site's storage roots: a worker on another host
(or the same storage mounted elsewhere) finds every output, spooled instance and quarantine
copy; migration 0005 rewrites the absolute paths older versions recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select, text

from cxrbatch import pipeline
from cxrbatch.batch import run_batch
from cxrbatch.config import Settings
from cxrbatch.db import instances
from cxrbatch.db import models as tables
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.domain import StudyRunStatus
from cxrbatch.ingest.spool import Spool, Taken
from cxrbatch.paths import StorageRoots, resolve_stored
from cxrbatch.site import Site
from cxrbatch_training.synthetic import write_studies


def test_a_stored_path_names_the_deepest_root_or_stays_absolute(tmp_path: Path) -> None:
    out = tmp_path / "out"
    roots = StorageRoots(out, out / "_spool", tmp_path / "q")
    assert roots.store(out / "1.2.3" / "sr.dcm") == "output:1.2.3/sr.dcm"
    assert roots.store(out / "_spool" / "1.2" / "4.dcm") == "spool:1.2/4.dcm"
    assert roots.store(tmp_path / "q" / "ab.bin") == "quarantine:ab.bin"
    elsewhere = tmp_path / "export" / "IM1"
    assert roots.store(elsewhere) == str(elsewhere)  # not under a root: absolute
    moved = StorageRoots(tmp_path / "mnt", tmp_path / "mnt" / "_spool", tmp_path / "q2")
    assert moved.resolve("output:1.2.3/sr.dcm") == tmp_path / "mnt" / "1.2.3" / "sr.dcm"
    assert moved.resolve("spool:1.2/4.dcm") == tmp_path / "mnt" / "_spool" / "1.2" / "4.dcm"
    assert moved.resolve(str(elsewhere)) == elsewhere
    with pytest.raises(ValueError, match="inside"):
        moved.resolve("output:../../etc/passwd")
    with pytest.raises(ValueError, match="storage roots"):
        resolve_stored("output:1.2.3/sr.dcm", None)


def test_outputs_recorded_on_one_mount_are_found_on_another(
    tmp_path: Path, settings: Settings, models: pipeline.Models
) -> None:
    """A batch recorded at /a is moved to /b (another host's mount point): re-run there,
    every study is unchanged (its outputs found through the relative paths) and nothing
    recorded names /a."""
    write_studies(tmp_path / "in", 2, seed=71, size=(256, 256))
    first = tmp_path / "a" / "out"
    summary = run_batch(tmp_path / "in", Site.at(settings, first), models=models)
    assert summary.studies[StudyRunStatus.PROCESSED] == 2
    url = f"sqlite:///{first / 'cxrbatch.sqlite'}"
    engine = make_engine(url)
    with session_factory(engine)() as session:
        outputs = [o.outputs for o in session.scalars(select(tables.Outcome))]
        seg_paths = [i.seg_path for i in session.scalars(select(tables.Image))]
    engine.dispose()
    assert all(doc["sr"].startswith("output:") for doc in outputs)
    assert seg_paths and all(p.startswith("output:") for p in seg_paths)

    second = tmp_path / "b" / "mounted"
    second.parent.mkdir()
    shutil.move(first, second)
    again = run_batch(tmp_path / "in", Site.at(settings, second), models=models)
    assert again.studies == {StudyRunStatus.UNCHANGED: 2}
    recorded = (second / "cxrbatch.sqlite").read_bytes()
    assert str(first).encode() not in recorded


def test_the_spool_records_paths_relative_to_the_roots(tmp_path: Path) -> None:
    write_studies(tmp_path / "gen", 1, seed=72, size=(128, 128))
    out = tmp_path / "out"
    site = Site.at(Settings(), out)
    out.mkdir()
    upgrade(site.database_url)
    with site.database() as database:
        spool = Spool(
            site.spool_dir, database.sessions, site.quarantine_dir, roots=site.roots,
            study_stable_seconds=0.0,
        )  # fmt: skip
        (source,) = (tmp_path / "gen").rglob("*.dcm")
        assert spool.take(source) is Taken.RECEIVED
        with database.sessions() as session:
            (stored,) = session.scalars(select(tables.Instance.path)).all()
            assert stored.startswith("spool:")
            uid = session.scalars(select(tables.Instance.study_instance_uid)).one()
            assert instances.study_files(session, uid, site.roots)[0].is_file()


def test_migration_0005_rewrites_absolute_paths_under_the_roots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    upgrade(url, "0004")
    absolute_sr = str(out / "1.2.3" / "sr.dcm")
    outside = str(tmp_path / "export" / "IM1")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO studies (id, study_instance_uid, first_seen_at, updated_at) "
                 "VALUES (1, '1.2.3', '2026-01-01', '2026-01-01')")
        )  # fmt: skip
        connection.execute(
            text(
                "INSERT INTO outcomes (id, study_id, is_current, status, segmentation_only, "
                "synthetic_model, input_fingerprint, models, outputs, timings, created_at) "
                "VALUES (1, 1, 1, 'processed', 0, 0, 'f', '[]', :outputs, '{}', '2026-01-01')"
            ),
            {"outputs": json.dumps({"seg": {}, "sr": absolute_sr, "json": None})},
        )
        connection.execute(
            text(
                "INSERT INTO rejected_files (path, sha256, reason, quarantine_path, "
                "first_seen_at, last_seen_at) VALUES (:path, 'ab', 'bad', :copy, "
                "'2026-01-01', '2026-01-01')"
            ),
            {"path": outside, "copy": str(out / "_quarantine" / "ab.bin")},
        )
    moved_quarantine = tmp_path / "elsewhere-q"
    roots = StorageRoots(out, out / "_spool", out / "_quarantine")
    upgrade(url, roots=roots)
    with engine.connect() as connection:
        (outputs,) = connection.execute(text("SELECT outputs FROM outcomes")).one()
        path, copy = connection.execute(
            text("SELECT path, quarantine_path FROM rejected_files")
        ).one()
    engine.dispose()
    assert json.loads(outputs)["sr"] == "output:1.2.3/sr.dcm"
    assert copy == "quarantine:ab.bin" and path == outside  # the original stays absolute
    relocated = StorageRoots(tmp_path / "mnt", tmp_path / "mnt" / "_spool", moved_quarantine)
    assert relocated.resolve(copy) == moved_quarantine / "ab.bin"

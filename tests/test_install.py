"""A non-editable install (`pip install .`, as deploy/OPERATIONS.md says) carries everything
the commands need at run time: the bundled default configuration and the alembic migrations.

The wheel is built from this source tree and installed without dependencies into a folder
of its own; the commands then run from a folder outside the source tree, with that folder
first on the path, so nothing of the checkout can stand in for what the wheel lacks.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pip(cwd: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", args[0], "-q", *args[1:]],
        check=True,
        cwd=cwd,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("install")
    wheels = work / "wheels"
    # Build isolation would fetch setuptools again; the test environment has it.
    _pip(work, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT))
    (wheel,) = wheels.glob("cxrbatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # The top-level config/ and alembic/ of the checkout, in the package.
    assert "cxrbatch/defaults/default.toml" in names
    assert "cxrbatch/defaults/site.example.toml" in names
    assert "cxrbatch/db/migrations/env.py" in names
    assert "cxrbatch/db/migrations/script.py.mako" in names
    migrations = {path.name for path in (ROOT / "alembic/versions").glob("*.py")}
    assert migrations
    assert {f"cxrbatch/db/migrations/versions/{name}" for name in migrations} <= names
    target = work / "site"
    _pip(work, "install", "--no-deps", "--target", str(target), str(wheel))
    return target


def _cxrbatch(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    env.pop("CXRBATCH_DATABASE__URL", None)
    return subprocess.run(
        [sys.executable, "-m", "cxrbatch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_installed_package_upgrades_a_database_and_reads_its_defaults(
    installed: Path, tmp_path: Path
) -> None:
    probe = _cxrbatch(installed, tmp_path, "--version")
    assert probe.returncode == 0, probe.stderr
    where = subprocess.run(
        [sys.executable, "-c", "import cxrbatch; print(cxrbatch.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed), where  # the wheel's copy, not the checkout

    out = tmp_path / "out"
    upgraded = _cxrbatch(installed, tmp_path, "db", "upgrade", "--out", str(out))
    assert upgraded.returncode == 0, upgraded.stderr
    assert "schema at revision" in upgraded.stdout
    with sqlite3.connect(out / "cxrbatch.sqlite") as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master")}
    assert {"studies", "outcomes", "jobs", "deliveries", "alembic_version"} <= tables

    listed = _cxrbatch(installed, tmp_path, "status", "--out", str(out), "--format", "json")
    assert listed.returncode == 0, listed.stderr


def test_the_installed_web_app_serves_its_style_sheet_and_viewer(
    installed: Path, tmp_path: Path
) -> None:
    """Every file the pages load is in the wheel: the app starts from an installed copy
    (StaticFiles refuses a missing folder) and serves the style sheet and the viewer."""
    out = tmp_path / "out"
    assert _cxrbatch(installed, tmp_path, "db", "upgrade", "--out", str(out)).returncode == 0
    probe = (
        "import sys; from pathlib import Path; from fastapi.testclient import TestClient; "
        "import cxrbatch; from cxrbatch.config import load_settings; "
        "from cxrbatch.site import Site; from cxrbatch.web.app import create_app; "
        "client = TestClient(create_app(Site.at(load_settings(None), Path(sys.argv[1])))); "
        "print(cxrbatch.__file__); "
        "[print(p, client.get(p).status_code, len(client.get(p).content)) "
        "for p in ('/static/app.css', '/static/viewer.js', '/')]"
    )
    served = subprocess.run(
        [sys.executable, "-c", probe, str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr[-2000:]
    where, *answers = served.stdout.splitlines()
    assert Path(where).is_relative_to(installed), where
    assert len(answers) == 3, answers
    for line in answers:
        _path, status, size = line.split()
        assert status == "200" and int(size) > 100, line


def test_the_installed_daemon_processes_a_study_with_its_classifier_without_monai(
    installed: Path, tmp_path: Path
) -> None:
    """MONAI is a training dependency only (`cxrbatch[training]`, `[demo]`): the installed
    product segments, classifies with a bundle, writes and records a study with MONAI made
    unimportable in its process."""
    from cxrbatch_training.synthetic import write_study
    from tests.conftest import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "bundle", "M-50", screening=0.5)
    write_study(tmp_path / "in", 0, seed=3, size=(512, 512))
    config = tmp_path / "site.toml"
    config.write_text(f'[classifier]\nbundle = "{bundle}"\n')
    out = tmp_path / "out"
    hidden = (
        "import sys; sys.modules['monai'] = None; from cxrbatch.cli import main; "
        "sys.argv = ['cxrbatch', *sys.argv[1:]]; main()"
    )
    ran = subprocess.run(
        [sys.executable, "-c", hidden, "process", str(tmp_path / "in"), "--out", str(out),
         "--config", str(config)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    listed = _cxrbatch(installed, tmp_path, "results", "--out", str(out), "--format", "json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["status"] == "processed" and row["models"] == "tiny-resnet50-M-50 0.0.1"
    assert set(row["probabilities"]) == {"Mass", "Nodule", "Pneumonia", "Edema", "Fibrosis"}
    # ...and without MONAI the module really is not there (the probe can fail).
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['monai'] = None; import monai"],
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "monai" in probe.stderr


def _alembic(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    url = f"url=sqlite:///{tmp_path / 'scratch.sqlite'}"
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "-x", url, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_top_level_alembic_folder_is_what_the_package_migrates_with(tmp_path: Path) -> None:
    """The card's layout: `alembic/` with `alembic.ini` at the top, `config/` beside it;
    the package's migrations and defaults are those folders (not copies), and alembic's own
    command, run as a developer writing a revision would, finds the models and the
    revisions in agreement (`alembic check`), and a database short of head is told so."""
    from cxrbatch.config import DEFAULT_CONFIG_PATH
    from cxrbatch.db.session import ALEMBIC_DIR

    assert ALEMBIC_DIR.resolve() == (ROOT / "alembic").resolve()
    assert DEFAULT_CONFIG_PATH.resolve() == (ROOT / "config" / "default.toml").resolve()
    heads = sorted(p.stem.split("_")[0] for p in (ROOT / "alembic" / "versions").glob("0*.py"))
    upgraded = _alembic(tmp_path, "upgrade", heads[-2])
    assert upgraded.returncode == 0, upgraded.stderr
    behind = _alembic(tmp_path, "check")
    assert behind.returncode != 0 and "not up to date" in behind.stdout + behind.stderr
    assert _alembic(tmp_path, "upgrade", "head").returncode == 0
    checked = _alembic(tmp_path, "check")
    assert checked.returncode == 0, checked.stderr
    assert "No new upgrade operations detected" in checked.stdout + checked.stderr

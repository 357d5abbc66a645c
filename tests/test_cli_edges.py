"""The edges a hospital engineer hits using the command by the book: which setting wins,
query commands on the wrong folder or an old schema, exit codes of a batch with failures,
labels, an output folder inside the input, the query columns, help text and --version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from cxrbatch import __version__, pipeline
from cxrbatch.cli import app
from cxrbatch.config import load_settings
from cxrbatch.db.session import head_revision, upgrade
from cxrbatch.domain import StudyInput
from cxrbatch_training.synthetic import write_studies

RUNNER = CliRunner()


def _error(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("error: ")]
    return line


def test_a_command_line_flag_wins_over_the_environment_which_wins_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[database]\nurl = "sqlite:///from-file.sqlite"\n')
    assert load_settings(site).database.url == "sqlite:///from-file.sqlite"
    monkeypatch.setenv("CXRBATCH_DATABASE__URL", f"sqlite:///{tmp_path / 'env.sqlite'}")
    assert load_settings(site).database.url.endswith("env.sqlite")
    flagged = f"sqlite:///{tmp_path / 'flag.sqlite'}"
    assert load_settings(site, flags={"database": {"url": flagged}}).database.url == flagged
    result = RUNNER.invoke(app, ["db", "upgrade", "--db", flagged, "--config", str(site)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "flag.sqlite").is_file() and not (tmp_path / "env.sqlite").exists()


def test_query_commands_never_create_or_migrate_a_database(tmp_path: Path) -> None:
    empty = tmp_path / "not-an-output"
    empty.mkdir()
    for command in ("results", "worklist", "status"):
        result = RUNNER.invoke(app, [command, "--out", str(empty)])
        assert result.exit_code == 2, result.output
        assert "no results database at" in _error(result.output)
    assert list(empty.iterdir()) == []  # nothing created

    old = tmp_path / "old"
    old.mkdir()
    url = f"sqlite:///{old / 'cxrbatch.sqlite'}"
    upgrade(url, "0003")
    result = RUNNER.invoke(app, ["results", "--out", str(old)])
    assert result.exit_code == 2
    assert f"at revision 0003, this cxrbatch needs {head_revision()}" in _error(result.output)
    assert "cxrbatch db upgrade" in _error(result.output)
    assert RUNNER.invoke(app, ["db", "upgrade", "--out", str(old)]).exit_code == 0
    assert RUNNER.invoke(app, ["results", "--out", str(old)]).exit_code == 0

    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    result = RUNNER.invoke(app, ["status", "--out", str(old)])
    assert result.exit_code == 2 and "does not know" in _error(result.output)
    # A rollback to this release over a newer release's schema: the migrating commands
    # refuse in one line too (alembic's own error was a traceback) and name the way back.
    study = tmp_path / "in" / "one"
    study.mkdir(parents=True)
    for command in (["db", "upgrade"], ["process", str(study.parent)]):
        result = RUNNER.invoke(app, [*command, "--out", str(old)])
        assert result.exit_code == 2, result.output
        assert "revision 9999, which this cxrbatch" in _error(result.output)
        assert "restore the backup taken before the upgrade" in _error(result.output)


def test_a_database_that_is_down_is_one_line_for_every_command(tmp_path: Path) -> None:
    down = "postgresql+psycopg://postgres@127.0.0.1:9/test"  # port 9 (discard): nothing listens
    for command in (
        ["db", "upgrade", "--db", down],
        ["results", "--db", down],
        ["worklist", "--db", down],
        ["status", "--db", down],
        ["process", str(tmp_path), "--out", str(tmp_path.parent / "o-down"), "--db", down],
    ):
        result = RUNNER.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines[-1].startswith("error: results database error: OperationalError")
        assert "Connection refused" in lines[-1] and "Traceback" not in result.output
        assert not any(line.startswith(" ") for line in lines), result.output  # one line


def test_output_folders_inside_the_input_are_refused(tmp_path: Path) -> None:
    write_studies(tmp_path / "in", 1, seed=5, size=(128, 128))
    for command in (
        ["process", str(tmp_path / "in"), "--out", str(tmp_path / "in" / "out")],
        ["watch", str(tmp_path / "in"), "--out", str(tmp_path / "in")],
    ):
        result = RUNNER.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "is inside the input folder" in _error(result.output)
    assert not (tmp_path / "in" / "out").exists()
    assert not (tmp_path / "in" / "cxrbatch.sqlite").exists()


def test_a_missing_or_corrupt_bundle_is_named_before_any_network_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the networks must not load before the bundles are checked")

    monkeypatch.setattr(pipeline, "load_models", no_loading)
    write_studies(tmp_path / "in", 1, seed=6, size=(128, 128))
    corrupt = tmp_path / "corrupt"
    (corrupt / "configs").mkdir(parents=True)
    (corrupt / "models").mkdir()
    (corrupt / "configs" / "metadata.json").write_text("{not json")
    (corrupt / "models" / "model.pt").write_bytes(b"")
    for bundle, expected in (
        (tmp_path / "missing", "lacks configs/metadata.json"),
        (corrupt, "Invalid bundle metadata"),
    ):
        site = tmp_path / f"{bundle.name}.toml"
        site.write_text(f'[classifier]\nbundle = "{bundle}"\n')
        result = RUNNER.invoke(
            app,
            ["process", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--config", str(site)],
        )
        assert result.exit_code == 2, result.output
        assert expected in _error(result.output) and str(bundle) in _error(result.output)


def test_help_keeps_brackets_and_there_is_a_version() -> None:
    version = RUNNER.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.strip() == f"cxrbatch {__version__}"
    short = RUNNER.invoke(app, ["watch", "-h"])
    assert short.exit_code == 0 and "([dicom] config)" in " ".join(short.output.split())
    assert RUNNER.invoke(app, ["db", "-h"]).exit_code == 0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_batch_with_a_failed_study_exits_1_and_the_query_columns_name_the_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXRBATCH_SEGMENTATION__DEVICE", "cpu")
    studies = write_studies(tmp_path / "in", 2, seed=21, size=(256, 256))
    doomed = studies[1].study_instance_uid
    real_run = pipeline.run

    def failing(study: StudyInput, *args: Any, **kwargs: Any) -> Any:
        if study.study_instance_uid == doomed:
            raise RuntimeError("simulated crash in the pipeline")
        return real_run(study, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run", failing)
    out = tmp_path / "out"
    result = RUNNER.invoke(app, ["process", str(tmp_path / "in"), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "1 study failed" in result.output

    database = out / "cxrbatch.sqlite"
    before = _sha(database)
    listed = RUNNER.invoke(app, ["results", "--out", str(out), "--format", "json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["study_instance_uid"]: row for row in json.loads(listed.stdout)}
    assert rows[doomed]["status"] == "failed"
    assert "simulated crash" in rows[doomed]["reason"]
    good = rows[studies[0].study_instance_uid]
    assert good["status"] == "processed"
    assert good["accession_number"].startswith("SYN") and good["patient_id"].startswith("SYN-")
    assert good["study_date"] == "2026-01-01" and good["modality"] in ("CR", "DX")
    assert good["probabilities"] == {}  # segmentation only: no classifier configured

    table = RUNNER.invoke(app, ["results", "--out", str(out)])
    assert table.exit_code == 0 and "current study outcomes" in table.stdout
    csv_rows = RUNNER.invoke(app, ["results", "--out", str(out), "--format", "csv"])
    header = csv_rows.stdout.splitlines()[0].split(",")
    assert header[:5] == [
        "study_instance_uid", "accession_number", "patient_id", "study_date", "modality",
    ]  # fmt: skip

    ranked = RUNNER.invoke(app, ["worklist", "--out", str(out), "--format", "json", "--limit", "1"])
    assert ranked.exit_code == 0 and len(json.loads(ranked.stdout)) == 1
    later = RUNNER.invoke(
        app, ["worklist", "--out", str(out), "--format", "json", "--since", "2999-01-01"]
    )
    assert later.exit_code == 0 and json.loads(later.stdout) == []

    lower = RUNNER.invoke(app, ["results", "--out", str(out), "--label", "edema"])
    assert lower.exit_code == 0, lower.output
    unknown = RUNNER.invoke(app, ["results", "--out", str(out), "--label", "Cancer"])
    assert unknown.exit_code == 2
    assert "unknown finding label 'Cancer'" in _error(unknown.output)
    assert "Mass, Nodule, Pneumonia, Edema, Fibrosis" in _error(unknown.output)
    alone = RUNNER.invoke(app, ["results", "--out", str(out), "--min-probability", "0.3"])
    assert alone.exit_code == 2 and "--label" in _error(alone.output)
    assert RUNNER.invoke(app, ["status", "--out", str(out)]).exit_code == 0
    assert _sha(database) == before  # the query commands opened it read-only


def test_send_needs_the_output_folder_whose_files_it_sends(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["send", "--db", f"sqlite:///{tmp_path / 'x.sqlite'}"])
    assert result.exit_code == 2 and "give --out OUT" in _error(result.output)
    assert not (tmp_path / "x.sqlite").exists()

"""What an operator sees: values from data, paths and exceptions print as plain text (a
"[/y]" is not rich markup), and every operator mistake is one line on stderr with exit 2,
for every command, never a traceback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.db import repository
from cxrbatch.db.session import make_engine, session_factory
from cxrbatch.domain import OutcomeStatus, StudyResult
from cxrbatch_training.synthetic import make_phantom, save, to_dataset

MARKUP = "[/Y]"  # upper case: discovery normalises ViewPosition (CS)
RUNNER = CliRunner()


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


def test_markup_in_header_values_reasons_and_paths_prints_as_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXRBATCH_SEGMENTATION__DEVICE", "cpu")
    ds = to_dataset(make_phantom(1, (96, 96)), "markup", view_position=MARKUP)
    save(ds, tmp_path / "in" / f"a{MARKUP}b" / "IM1")
    (tmp_path / "in" / "junk[bold].bin").write_bytes(b"\x00" * 10)
    out = tmp_path / "out"
    result = RUNNER.invoke(app, ["process", str(tmp_path / "in"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"view '{MARKUP}' is not a frontal view" in result.output
    # A failed study whose reason carries markup (status lists failed studies).
    engine = make_engine(f"sqlite:///{out / 'cxrbatch.sqlite'}")
    with session_factory(engine)() as session:
        failed = StudyResult(
            "1.2.3.999",
            OutcomeStatus.FAILED,
            f"decode failed: {MARKUP}",
            (),
            (),
            (),
            None,
            None,
            (),
        )
        repository.record_study(session, failed)
        session.commit()
    engine.dispose()
    # The same text stays printable on every later call that shows it.
    for command in (["results", "--out", str(out), "--wide"], ["status", "--out", str(out)]):
        listed = RUNNER.invoke(app, command)
        assert listed.exit_code == 0, listed.output
        assert MARKUP in listed.output, listed.output

    missing = RUNNER.invoke(app, ["process", f"/x/nope{MARKUP}", "--out", str(out)])
    assert missing.exit_code == 2
    assert _one_error_line(missing.output) == f"error: input folder not found: /x/nope{MARKUP}"


def test_config_errors_keep_pydantic_detail_on_one_line(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text("[processing]\nstudy_threads = 'many'\n")
    result = RUNNER.invoke(
        app, ["process", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(config)]
    )
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert "processing.study_threads" in line and "[type=int_parsing" in line, line
    assert "input_value='many'" in line and str(config) in line


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_watch_and_worker_operator_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, busy_port: int
) -> None:
    (tmp_path / "in").mkdir()
    configs = {
        "typo": "[processing]\nstudy_threadz = 2\n",
        "type": "[dicom]\nport = 'eleven'\n",
        "hosts": "[dicom]\nlisten = true\nallowed_hosts = ['not-an-ip/99']\n",
        "tls": "[dicom]\nlisten = true\ntls_certificate = '/nope/c.pem'\ntls_key = '/nope/k.pem'\n",
        "port": f"[dicom]\nlisten = true\nbind_address = '127.0.0.1'\nport = {busy_port}\n"
        "allowed_hosts = ['127.0.0.1']\n",
    }
    expected = {
        "typo": "processing.study_threadz: Extra inputs are not permitted",
        "type": "dicom.port: Input should be a valid integer",
        "hosts": "dicom.allowed_hosts",
        "tls": "No such file or directory",
        "port": "Address already in use",
    }
    for name, text in configs.items():
        config = tmp_path / f"{name}.toml"
        config.write_text(text)
        for command in (
            ["watch", str(tmp_path / "in"), "--out", str(tmp_path / "out")],
            ["worker", "--out", str(tmp_path / "out")],
        ):
            if name in {"hosts", "tls", "port"} and command[0] == "worker":
                continue  # the receiver belongs to `watch`
            result = RUNNER.invoke(app, [*command, "--config", str(config)])
            assert result.exit_code == 2, (name, command[0], result.output)
            assert expected[name] in _one_error_line(result.output), (name, result.output)


def test_a_database_driver_that_is_not_installed_is_one_line_for_every_command(
    tmp_path: Path,
) -> None:
    url = "mysql://user@127.0.0.1/results"
    for command in (
        ["worker", "--out", str(tmp_path / "out"), "--db", url],
        ["results", "--db", url],
        ["status", "--db", url],
        ["db", "upgrade", "--db", url],
        ["process", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--db", url],
    ):
        (tmp_path / "in").mkdir(exist_ok=True)
        result = RUNNER.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert "not installed: MySQLdb" in _one_error_line(result.output), result.output


def test_a_second_process_run_on_the_same_output_is_refused_until_the_first_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal
    import subprocess
    import sys

    monkeypatch.setenv("CXRBATCH_SEGMENTATION__DEVICE", "cpu")
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from cxrbatch.files import output_lock\n"
            "with output_lock(Path(sys.argv[1])):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        refused = RUNNER.invoke(app, ["process", str(tmp_path / "in"), "--out", str(out)])
        assert refused.exit_code == 2, refused.output
        line = _one_error_line(refused.output)
        assert "another `cxrbatch process` run is using the output folder" in line
        assert f"pid {holder.pid}" in line
    finally:
        holder.send_signal(signal.SIGKILL)  # a crashed run: its lock goes with it
        holder.wait()
    result = RUNNER.invoke(app, ["process", str(tmp_path / "in"), "--out", str(out)])
    assert result.exit_code == 0, result.output


def test_misspelled_environment_settings_are_errors_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrbatch.config import load_settings

    monkeypatch.setenv("CXRBATCH_VIEWER_PASSWORD", "secret")  # not a setting's shape: left
    monkeypatch.setenv("CXRBATCH_DICOM__PORT", "11113")
    assert load_settings().dicom.port == 11113
    for name, expected in (
        ("CXRBATCH_DICOMM__PORT", "CXRBATCH_DICOMM__PORT names no setting"),
        ("CXRBATCH_DICOM__PROT", "CXRBATCH_DICOM__PROT names no setting"),
        ("CXRBATCH_DICOM_PORT", "did you mean CXRBATCH_DICOM__PORT"),
    ):
        monkeypatch.setenv(name, "11114")
        result = RUNNER.invoke(app, ["results", "--out", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert expected in _one_error_line(result.output), result.output
        monkeypatch.delenv(name)


def test_quarantine_sidecars_keep_no_original_path_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    monkeypatch.setenv("CXRBATCH_SEGMENTATION__DEVICE", "cpu")
    folder = tmp_path / "in" / "DOE^JOHN"  # export folders carry patient names
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not DICOM")
    for keep, out in ((None, tmp_path / "a"), ("true", tmp_path / "b")):
        if keep:
            monkeypatch.setenv("CXRBATCH_OUTPUT__QUARANTINE_ORIGINAL_PATHS", keep)
        result = RUNNER.invoke(app, ["process", str(tmp_path / "in"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        (sidecar,) = (out / "_quarantine").glob("*.json")
        record = json.loads(sidecar.read_text())
        assert record["reason"].startswith("not a DICOM file")
        if keep:
            assert record["original_path"] == str(folder / "notes.txt")
        else:
            assert "original_path" not in record and "DOE" not in sidecar.read_text()


def test_watch_checks_the_model_files_before_it_listens_or_takes_files(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for name, text, expected in (
        (
            "vitb",
            "[segmentation]\nbackend = 'medsam-vitb'\n"
            "medsam_checkpoint = '/nope/medsam_vit_b.pth'\n",
            "MedSAM ViT-B checkpoint not found: /nope/medsam_vit_b.pth",
        ),
        (
            "bundle",
            f"[classifier]\nscreening_bundle = '{tmp_path / 'no-bundle'}'\n",
            "lacks configs/metadata.json",
        ),
    ):
        config = tmp_path / f"{name}.toml"
        config.write_text(text)
        out = tmp_path / f"out-{name}"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        result = RUNNER.invoke(
            app,
            [
                "watch",
                str(tmp_path / "in"),
                "--out",
                str(out),
                "--listen",
                str(port),
                "--config",
                str(config),
            ],
        )
        assert result.exit_code == 2, result.output
        assert expected in _one_error_line(result.output)
        assert not out.exists()  # no receiver, no spool, no database: nothing taken in


def test_a_native_crash_leaves_every_threads_python_stack_on_stderr() -> None:
    """A segmentation fault in native code under a command (the web app's crash of
    2026-12-05 left nothing in its log): Python's fault handler prints the stacks."""
    code = (
        "import ctypes; from cxrbatch import cli; "
        "cli.app.command('crash')(lambda: ctypes.string_at(0)); cli.main()"
    )
    crashed = subprocess.run(
        [sys.executable, "-c", code, "crash"], capture_output=True, text=True, timeout=300
    )
    assert crashed.returncode == -signal.SIGSEGV, crashed.stderr[-2000:]
    assert "Fatal Python error: Segmentation fault" in crashed.stderr, crashed.stderr[-2000:]
    assert "cxrbatch/cli.py" in crashed.stderr, crashed.stderr[-2000:]


def test_a_fault_handler_already_on_keeps_its_file(tmp_path: Path) -> None:
    """Under a test runner (pytest's own handler on, sys.stderr a capture file) a worker
    started in the test's process must not re-point the handler at the capture file: the
    engines' crash in CI of 2026-12-05 printed nothing because the batch's worker did."""
    code = (
        "import ctypes, sys; from cxrbatch import logs; "
        f"sys.stderr = open({str(tmp_path / 'captured')!r}, 'w'); "
        "logs.report_native_crashes(); ctypes.string_at(0)"
    )
    crashed = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert crashed.returncode == -signal.SIGSEGV, crashed.stderr[-2000:]
    assert "Fatal Python error: Segmentation fault" in crashed.stderr, crashed.stderr[-2000:]
    assert "Segmentation fault" not in (tmp_path / "captured").read_text()

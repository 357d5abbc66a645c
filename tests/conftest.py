"""Shared fixtures: settings, the real LiteMedSAM model (loaded once), phantoms, real
radiographs from pydicom-data, a tiny classifier bundle, dciodvfy and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from cxrbatch import logs, pipeline
from cxrbatch.config import Settings, load_settings
from cxrbatch.models.bundle import BundleSpec, Screening, TrainingData, build_network, save_bundle

logs.quiet_third_party()
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

POSTGRES_ADMIN_URL = os.environ.get(
    "CXRBATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The CPU graph cache (processing.graph_cache_dir's default under XDG_CACHE_HOME) of
    this test session, and of the processes it starts, is its own, not the user's."""
    home = tmp_path_factory.mktemp("xdg-cache")
    home.chmod(0o700)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="session", autouse=True)
def no_disk_watermark() -> Iterator[None]:
    """Workers stop claiming under queue.min_free_disk_mb (1 GiB by default) of free disk,
    and a batch stops after waiting; the suite must not depend on how full the machine's
    disk is (the lent CI machines' disks are shared: a few hundred MB free has been seen).
    So the tests, and the processes they start, run with no watermark unless they set one;
    tests/test_ingest.py and tests/test_full_disk.py test the watermark itself."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CXRBATCH_QUEUE__MIN_FREE_DISK_MB", "0")
        yield


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings(None, segmentation={"device": "cpu"}, classifier={"device": "cpu"})


@pytest.fixture(scope="session")
def models(settings: Settings) -> pipeline.Models:
    """The real LiteMedSAM segmenter, no classifier (loaded once for the session)."""
    return pipeline.load_models(settings)


def make_tiny_bundle(
    directory: Path,
    mask_mode: str = "M-50",
    screening: float | None = 0.5,
    seed: int = 0,
    thresholds: dict[str, float] | None = None,
    input_size: int = 64,
) -> Path:
    """A randomly initialised ResNet50 bundle (64 px unless asked), flagged as synthetic
    (untrained); operating thresholds Mass 0.5 unless `thresholds` says otherwise."""
    torch.manual_seed(seed)
    network = build_network("resnet50", 5)
    spec = BundleSpec(
        architecture="resnet50",
        input_size=input_size,
        mask_mode=mask_mode,  # type: ignore[arg-type]
        thresholds={"Mass": 0.5} if thresholds is None else thresholds,
        screening=Screening(no_finding_threshold=screening) if screening is not None else None,
        training_data=TrainingData(description="untrained test network", synthetic=True),
    )
    save_bundle(
        directory,
        network,
        name=f"tiny-resnet50-{mask_mode}",
        version="0.0.1",
        spec=spec,
        description="test bundle: random weights",
    )
    return directory


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "classifier": make_tiny_bundle(root / "classifier", "M-15", screening=None, seed=1),
        "screening": make_tiny_bundle(root / "screening", "M-50", screening=0.5, seed=2),
    }


@pytest.fixture(scope="session")
def classified_models(
    settings: Settings, models: pipeline.Models, tiny_bundles: dict[str, Path]
) -> tuple[Settings, pipeline.Models]:
    from cxrbatch.models.bundle import load_bundle

    configured = load_settings(
        None,
        segmentation={"device": "cpu"},
        classifier={
            "device": "cpu",
            "bundle": str(tiny_bundles["classifier"]),
            "screening_bundle": str(tiny_bundles["screening"]),
        },
    )
    loaded = pipeline.Models(
        models.segmenter,
        load_bundle(tiny_bundles["classifier"], "cpu"),
        load_bundle(tiny_bundles["screening"], "cpu"),
    )
    return configured, loaded


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cxrbatch demo-data IN --bundle B`, as in the README's main command: an M-50
    classifier trained on SYNTHETIC phantoms (about a minute; built once per session)."""
    from typer.testing import CliRunner

    from cxrbatch.cli import app

    root = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo-data", str(root / "in"), "--bundle", str(root / "b")])
    assert result.exit_code == 0, result.output
    configured = load_settings(root / "b" / "demo.toml")
    assert configured.classifier.bundle == configured.classifier.screening_bundle
    assert Path(configured.classifier.bundle) == (root / "b").resolve()
    return root / "b"


def real_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom-data does not provide {name}; install the dev extras")
    return Path(str(path))


def unavailable(skip_reason: str, ci_reason: str) -> NoReturn:
    """Something a test needs is missing: a failure in CI (which installs it), a skip with
    the reason elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(ci_reason)
    pytest.skip(skip_reason)


def tool(*names: str, skip_reason: str, ci_reason: str) -> str:
    """The first of the commands `names` on PATH, or `unavailable`."""
    for name in names:
        found = shutil.which(name)
        if found is not None:
            return found
    unavailable(skip_reason, ci_reason)


def chromium_executable(test: str) -> str:
    """Debian's chromium, which playwright drives (`test`: what it is needed for)."""
    return tool(
        "chromium",
        "chromium-browser",
        skip_reason="chromium is not installed (apt-get install chromium)",
        ci_reason=f"chromium (Debian package) is required in CI for the {test}",
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines of dciodvfy for one file. Fails (not skips) in CI when it is missing."""
    exe = tool(
        "dciodvfy",
        skip_reason="dciodvfy (Debian package dicom3tools) is not installed",
        ci_reason="dciodvfy (dicom3tools) is required in CI",
    )
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"cxrbatch_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        unavailable(
            f"PostgreSQL not reachable: {exc}",
            f"PostgreSQL at {POSTGRES_ADMIN_URL} is required in CI: {exc}",
        )
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

"""Our SEG and presentation state read by readers someone else wrote.

dcmqi's `segimage2itkimage` (pip `dcmqi`, the QIICR converter 3D Slicer uses) on a
phantom (1024 columns: BINARY) and on the real film RG1 (1841 columns: FRACTIONAL under
`seg_encoding = "auto"`): each segment it writes equals the mask we wrote, pixel for
pixel (Dice 1.0). Before issue 33 dcmqi refused the SEG ("Plane Orientation (Patient) is
missing, cannot parse input"). pydicom-seg 0.4.1 (pip; it needs pydicom < 3, so it runs in
a virtual environment of its own, made once per test session) reads both the same way
(before: "Pixel measures FG is missing!"). dcmtk checks and applies the presentation
state and reads the SR."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from cxrbatch import pipeline
from cxrbatch.config import Settings
from cxrbatch.dicom.discover import discover
from cxrbatch.domain import OutcomeStatus
from cxrbatch_training.synthetic import write_study
from tests.conftest import dciodvfy_errors, real_file, tool, unavailable


def _segimage2itkimage() -> str:
    found = shutil.which("segimage2itkimage") or str(
        Path(sys.executable).parent / "segimage2itkimage"
    )
    if not Path(found).exists():
        pytest.skip("dcmqi is not installed (pip install dcmqi; in the dev extras)")
    return found


PYDICOM_SEG_READER = """
import sys
import numpy as np, pydicom, pydicom_seg
result = pydicom_seg.SegmentReader().read(pydicom.dcmread(sys.argv[1]))
for number in result.available_segments:
    np.save(f"{sys.argv[2]}/{number}.npy", np.squeeze(np.asarray(result.segment_data(number))) > 0)
"""


@pytest.fixture(scope="session")
def pydicom_seg_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python with pydicom-seg 0.4.1 and pydicom < 3 (its requirement), from the package
    index; skipped where that cannot be installed, failed in CI."""
    folder = tmp_path_factory.mktemp("pydicom-seg")
    python = folder / "venv" / "bin" / "python"
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(folder / "venv")], capture_output=True, text=True
    )
    installed = made.returncode == 0 and (
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "pydicom<3", "pydicom-seg==0.4.1"],
            capture_output=True,
            text=True,
            timeout=600,
        ).returncode
        == 0
    )
    if not installed:
        message = "pydicom-seg 0.4.1 could not be installed from the package index"
        unavailable(message, message)
    return python


def _pydicom_seg_segments(python: Path, seg_path: Path, folder: Path) -> dict[int, np.ndarray]:
    folder.mkdir()
    done = subprocess.run(
        [str(python), "-c", PYDICOM_SEG_READER, str(seg_path), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {int(p.stem): np.load(p) for p in sorted(folder.glob("*.npy"))}


def _dcmqi_segments(seg_path: Path, folder: Path) -> dict[int, np.ndarray]:
    """Segment number -> the 2-D label image dcmqi writes (NRRD, read with pynrrd)."""
    import nrrd  # pynrrd

    folder.mkdir()
    done = subprocess.run(
        [_segimage2itkimage(), "--inputDICOM", str(seg_path), "--outputDirectory", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    segments = {}
    for path in sorted(folder.glob("*.nrrd")):
        data, _ = nrrd.read(str(path))
        # NRRD's first axis is the column (x): back to rows x columns.
        segments[int(path.stem)] = np.squeeze(np.asarray(data)).T > 0
    return segments


@pytest.mark.parametrize("case", ["phantom-1024", "RG1_UNCR"])
def test_dcmqi_and_pydicom_seg_read_each_segment_as_written(
    tmp_path: Path,
    settings: Settings,
    models: pipeline.Models,
    pydicom_seg_python: Path,
    case: str,
) -> None:
    folder = tmp_path / "in"
    if case == "RG1_UNCR":
        folder.mkdir()
        shutil.copyfile(real_file("RG1_UNCR.dcm"), folder / "IM0001")
    else:
        write_study(folder, 0, seed=61, size=(1024, 1024))
    (study,), _ = discover(folder)
    result = pipeline.run(study, models, settings, tmp_path / "out")
    assert result.status is OutcomeStatus.PROCESSED, result.reason
    assert result.outputs is not None
    (seg_path,) = result.outputs.seg_files.values()
    assert dciodvfy_errors(seg_path) == []
    seg = dcmread(seg_path)
    expected_type = "FRACTIONAL" if int(seg.Columns) % 8 else "BINARY"
    assert seg.SegmentationType == expected_type
    # The lungs never overlap (the segmenter makes them disjoint), and the SEG says so in
    # either encoding; a FRACTIONAL one holds 0 or Maximum Fractional Value (1).
    assert seg.SegmentsOverlap == "NO"
    if expected_type == "FRACTIONAL":
        assert seg.MaximumFractionalValue == 1
        assert set(np.unique(np.frombuffer(seg.PixelData, dtype=np.uint8))) == {0, 1}
    (image,) = result.images
    written = {1: image.segmentation.right_lung, 2: image.segmentation.left_lung}
    readers = {
        "dcmqi": _dcmqi_segments(seg_path, tmp_path / "dcmqi"),
        "pydicom-seg": _pydicom_seg_segments(pydicom_seg_python, seg_path, tmp_path / "pyseg"),
    }
    for reader, read in readers.items():
        assert set(read) == {1, 2}, reader
        for number, mask in written.items():
            assert read[number].shape == mask.shape, (reader, number)
            overlap = np.logical_and(read[number], mask).sum()
            dice = 2.0 * overlap / (read[number].sum() + mask.sum())
            assert dice == 1.0, (reader, number, dice)


def test_dcmtk_checks_and_applies_the_presentation_state(
    tmp_path: Path, settings: Settings, models: pipeline.Models
) -> None:
    """dcmtk (Debian package dcmtk): `dcmpschk` checks the GSPS against PS3.3 and passes it;
    `dcmp2pgm` applies it to the source film, naming both lungs' layers with one closed
    outline each and rendering a film of the source's size."""
    for command in ("dcmpschk", "dcmp2pgm", "dsrdump"):
        tool(
            command,
            skip_reason="dcmtk is not installed (apt-get install dcmtk)",
            ci_reason="dcmtk (Debian package) is required in CI",
        )
    write_study(tmp_path / "in", 0, seed=61, size=(512, 512))
    (study,), _ = discover(tmp_path / "in")
    result = pipeline.run(study, models, settings, tmp_path / "out")
    assert result.outputs is not None
    (gsps,) = result.outputs.presentation_state_files.values()
    assert dciodvfy_errors(gsps) == []
    checked = subprocess.run(["dcmpschk", str(gsps)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "Test passed" in checked.stdout + checked.stderr
    assert "E:" not in checked.stdout + checked.stderr
    picture = tmp_path / "applied.pgm"
    source = study.instances[0].path
    applied = subprocess.run(
        ["dcmp2pgm", "-v", "-p", str(gsps), str(source), str(picture)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    text = applied.stdout + applied.stderr
    assert applied.returncode == 0, text[-2000:]
    for layer in ("[RIGHT LUNG]", "[LEFT LUNG]"):
        block = text.split("Graphic Layer #")[1:]
        (found,) = [b for b in block if b.split("\n", 1)[0].strip().endswith(layer)]
        assert "type=polyline" in found and "Number of graphic objects: 1" in found, found[:400]
    # The SR, read strictly by dcmtk's SR module: no error, no warning.
    assert result.outputs.sr_file is not None
    dumped = subprocess.run(
        ["dsrdump", str(result.outputs.sr_file)], capture_output=True, text=True, timeout=60
    )
    assert dumped.returncode == 0 and "Comprehensive SR Document" in dumped.stdout
    assert not [line for line in dumped.stderr.splitlines() if line[:2] in ("E:", "W:")]
    header = picture.read_bytes()[:20].split()
    assert header[0] == b"P5" and (int(header[1]), int(header[2])) == (512, 512)

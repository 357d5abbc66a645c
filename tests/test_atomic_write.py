"""atomic_write: the bytes written whole whatever their size, the kernel given at most
WRITE_CHUNK bytes a call, a short or failing write surfacing as OutputError with no file
and no temporary left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from cxrbatch import files
from cxrbatch.errors import OutputError
from cxrbatch.files import WRITE_CHUNK, atomic_write


def _recording_writes(monkeypatch: pytest.MonkeyPatch, short: bool = False) -> list[int]:
    """os.write as cxrbatch.files calls it, each call's size recorded; `short`: each call
    takes at most 100,003 bytes (as a signal-interrupted write would)."""
    sizes: list[int] = []
    real = os.write

    def write(fd: int, data: bytes) -> int:
        sizes.append(len(data))
        return real(fd, data[:100_003] if short else data)

    monkeypatch.setattr(files.os, "write", write)
    return sizes


@pytest.mark.parametrize(
    "size", [0, 1, WRITE_CHUNK - 1, WRITE_CHUNK, WRITE_CHUNK + 1, 3 * WRITE_CHUNK + 5]
)
def test_every_byte_arrives_in_calls_of_at_most_a_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    data = os.urandom(size)
    sizes = _recording_writes(monkeypatch)
    target = atomic_write(tmp_path / "out.bin", lambda handle: handle.write(data))
    assert target.read_bytes() == data
    assert sum(sizes) == size
    assert all(0 < n <= WRITE_CHUNK for n in sizes)
    assert len(sizes) == -(-size // WRITE_CHUNK)  # one call per chunk, none empty
    assert list(tmp_path.iterdir()) == [target]  # no temporary left


def test_short_writes_are_carried_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(2 * WRITE_CHUNK + 7)
    sizes = _recording_writes(monkeypatch, short=True)
    target = atomic_write(tmp_path / "out.bin", lambda handle: handle.write(data))
    assert target.read_bytes() == data
    assert len(sizes) > 20 and max(sizes) <= WRITE_CHUNK


def test_a_dicom_file_with_large_pixel_data_is_written_as_pydicom_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RG1 (7.1 MB of Pixel Data, one write in pydicom's writer) through atomic_write: the
    same bytes as pydicom writing to a plain file, in calls of at most a chunk."""
    ds = pydicom.dcmread(str(get_testdata_file("RG1_UNCI.dcm")))
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain, enforce_file_format=True)
    sizes = _recording_writes(monkeypatch)
    ours = atomic_write(
        tmp_path / "ours.dcm", lambda handle: ds.save_as(handle, enforce_file_format=True)
    )
    assert ours.read_bytes() == plain.read_bytes()
    assert len(ds.PixelData) > 4 * WRITE_CHUNK and max(sizes) == WRITE_CHUNK


def test_a_write_the_disk_refuses_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = os.write

    def full(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(files.os, "write", full)
    with pytest.raises(OutputError, match=r"Cannot write out\.bin: No space left on device"):
        atomic_write(tmp_path / "out.bin", lambda handle: handle.write(b"x" * (2 * WRITE_CHUNK)))
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(files.os, "write", lambda fd, data: 0)
    with pytest.raises(OutputError, match="took no bytes"):
        atomic_write(tmp_path / "out.bin", lambda handle: handle.write(b"x" * 10))
    assert list(tmp_path.iterdir()) == []

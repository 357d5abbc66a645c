"""Decoding: every transfer syntax, bit depth and photometric interpretation to the same
display image; invalid headers do not crash; patient sides come from the header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from cxrbatch.dicom.decode import (
    code_counts,
    coded_values,
    decode,
    decode_dataset,
    patient_side_mapping,
    percentile_bounds,
    sorted_table_bounds,
)
from cxrbatch.dicom.discover import read_header
from cxrbatch.domain import InstanceHeader
from cxrbatch.errors import InputError
from cxrbatch_training.synthetic import TRANSFER_SYNTAXES, make_phantom, save, to_dataset
from tests.conftest import real_file

PHANTOM = make_phantom(7, (256, 200))  # non-square on purpose


def _decode_file(path: Path) -> np.ndarray:
    header = read_header(path)
    assert isinstance(header, InstanceHeader), header
    image, _ = decode(header)
    return image.pixels


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
@pytest.mark.parametrize(
    ("bits", "monochrome"),
    [(8, "MONOCHROME2"), (10, "MONOCHROME1"), (12, "MONOCHROME2"), (16, "MONOCHROME1")],
)
def test_all_syntaxes_and_depths_give_the_phantom(
    tmp_path: Path, syntax: str, bits: int, monochrome: str
) -> None:
    ds = to_dataset(PHANTOM, "decode", bits=bits, monochrome=monochrome)
    pixels = _decode_file(save(ds, tmp_path / "x.dcm", syntax))
    expected = np.round(PHANTOM.image * 255)
    assert pixels.shape == (256, 200) and pixels.dtype == np.uint8
    # Quantisation of an 8-bit store costs at most one grey level after windowing.
    assert np.abs(pixels.astype(float) - expected).max() <= 2.0


def test_dx_with_presentation_lut_inverse_is_displayed_right_way_up(tmp_path: Path) -> None:
    ds = to_dataset(PHANTOM, "dx", modality="DX", bits=12, monochrome="MONOCHROME1")
    pixels = _decode_file(save(ds, tmp_path / "dx.dcm"))
    lungs = PHANTOM.right_lung | PHANTOM.left_lung
    assert pixels[lungs].mean() < pixels[~lungs & (PHANTOM.image > 0.5)].mean()


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_real_chest_cr_in_every_syntax(name: str) -> None:
    pixels = _decode_file(real_file(name))
    reference = _decode_file(real_file("RG1_UNCR.dcm"))
    assert pixels.shape == (1955, 1841)
    tolerance = 1.0 if "J2KI" not in name else 6.0  # lossy JPEG 2000
    assert np.abs(pixels.astype(float) - reference).mean() <= tolerance
    # MONOCHROME1 was inverted: the mediastinum is brighter than the lung fields.
    assert pixels[600:1200, 850:1000].mean() > pixels[600:1200, 300:600].mean()


def test_invalid_window_and_spacing_do_not_crash(tmp_path: Path) -> None:
    ds = to_dataset(PHANTOM, "bad", bits=12)
    ds.WindowWidth = 0
    ds.PixelSpacing = [0, 0]
    ds.PatientOrientation = ["A", "F"]
    header = read_header(save(ds, tmp_path / "bad.dcm"))
    assert isinstance(header, InstanceHeader)
    image, _ = decode(header)
    assert any("invalid WindowWidth" in n for n in image.notes)
    assert image.side_source.startswith("display convention")


def test_short_pixel_data_is_an_input_error(tmp_path: Path) -> None:
    ds = to_dataset(PHANTOM, "short", bits=12)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    header = read_header(save(ds, tmp_path / "short.dcm"))
    assert isinstance(header, InstanceHeader)
    with pytest.raises(InputError, match="cannot be decoded"):
        decode(header)


def test_colour_and_huge_images_are_refused() -> None:
    ds = to_dataset(PHANTOM, "colour", bits=8)
    header = InstanceHeader(
        Path("x"), "0", "1", "1", "1", "1", "CR", "CHEST", "PA", "1.2.840.10008.1.2.1"
    )
    ds.Rows = 60000
    ds.Columns = 60000
    with pytest.raises(InputError, match="Implausible image size"):
        decode_dataset(ds, header)
    ds = to_dataset(PHANTOM, "colour", bits=8)
    ds.SamplesPerPixel = 3
    with pytest.raises(InputError, match="SamplesPerPixel"):
        decode_dataset(ds, header)


@pytest.mark.parametrize(
    ("orientation", "view", "left_is_right", "source"),
    [
        (["L", "F"], "PA", True, "PatientOrientation"),
        (["R", "F"], "AP", False, "PatientOrientation"),
        (["LP", "F"], "AP", True, "PatientOrientation"),
        (None, "AP", True, "display convention"),
        (["P", "F"], "PA", True, "display convention"),
    ],
)
def test_patient_side_mapping(
    orientation: list[str] | None, view: str, left_is_right: bool, source: str
) -> None:
    ds = pydicom.Dataset()
    if orientation is not None:
        ds.PatientOrientation = orientation
    ds.ViewPosition = view
    mapped, how = patient_side_mapping(ds)
    assert mapped is left_is_right
    assert how.startswith(source)


def _encapsulated(pixels: np.ndarray, frames: list[bytes], syntax: str) -> pydicom.Dataset:
    from pydicom.encaps import encapsulate

    phantom_ds = to_dataset(PHANTOM, "encaps", bits=8)
    phantom_ds.file_meta.TransferSyntaxUID = syntax
    phantom_ds.PixelData = encapsulate(frames)
    phantom_ds["PixelData"].VR = "OB"
    phantom_ds.NumberOfFrames = len(frames)
    return phantom_ds


def test_jpeg_baseline_made_by_another_encoder(tmp_path: Path) -> None:
    """JPEG baseline (8-bit, lossy) written by OpenCV's encoder, decoded by pylibjpeg."""
    import cv2
    from pydicom.uid import JPEGBaseline8Bit

    pixels = np.round(PHANTOM.image * 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    ds = _encapsulated(pixels, [encoded.tobytes()], JPEGBaseline8Bit)
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    decoded = _decode_file(tmp_path / "jpeg.dcm")
    assert np.abs(decoded.astype(float) - pixels).mean() < 3.0


@pytest.mark.parametrize(
    "name",
    [
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "JPEG-LL.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_RLE.dcm",
        "emri_small_big_endian.dcm",
    ],
)
def test_other_real_codecs_decode(name: str) -> None:
    """JPEG lossless, JPEG-LS, RLE and big endian files from pydicom-data decode (they are
    not chest radiographs; decoding is checked on its own)."""
    path = real_file(name)
    ds = pydicom.dcmread(path)
    header = InstanceHeader(path, "", "1", "1", "1", "1", "CR", "CHEST", "PA", "")
    image = decode_dataset(ds, header)
    assert image.pixels.dtype == np.uint8 and image.pixels.std() > 1.0


def test_multi_frame_uses_the_first_frame(tmp_path: Path) -> None:
    ds = to_dataset(PHANTOM, "frames", bits=8)
    single = np.round(PHANTOM.image * 255).astype(np.uint8)
    ds.NumberOfFrames = 2
    ds.PixelData = single.tobytes() + (255 - single).tobytes()
    header = InstanceHeader(Path("x"), "", "1", "1", "1", "1", "CR", "CHEST", "PA", "")
    image = decode_dataset(ds, header)
    assert any("first frame" in note for note in image.notes)
    assert np.abs(image.pixels.astype(float) - single).max() <= 1


def test_percentiles_from_the_stored_codes_equal_numpys_bit_for_bit() -> None:
    """The percentile window's bounds come from a histogram of the stored codes, not from
    np.percentile over the float image: the same numbers, to the last bit, over images of
    every kind the codes can be (8/16 bit, signed, constant, two-valued, rescaled)."""
    rng = np.random.default_rng(7)
    for trial in range(600):
        dtype = (np.uint8, np.uint16, np.int16)[trial % 3]
        info = np.iinfo(dtype)
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        kind = trial % 4
        if kind == 0:
            raw = rng.integers(info.min, info.max, size=shape, endpoint=True)
        elif kind == 1:
            raw = rng.normal(rng.uniform(-2000, 3000), rng.uniform(0.1, 800), size=shape)
        elif kind == 2:
            raw = np.full(shape, int(rng.integers(0, 200)))
        else:
            raw = rng.integers(0, 3, size=shape) * int(rng.integers(1, 90))
        pixels = np.clip(np.round(raw), info.min, info.max).astype(dtype)
        slope = float(rng.choice([1.0, 0.5, 2.7, 1e-3]))
        intercept = float(rng.choice([0.0, -1024.0, 17.25]))
        low = int(pixels.min())
        counts = np.bincount((pixels.astype(np.int64) - low).ravel())
        table = np.arange(low, low + len(counts), dtype=np.float64) * slope + intercept
        want = percentile_bounds(pixels.astype(np.float64) * slope + intercept)
        assert sorted_table_bounds(table, counts) == want, (trial, dtype, shape)
    # A table that is not non-decreasing over the codes present: order statistics of the
    # codes are not those of the values, so np.percentile decides (None here).
    counts = np.bincount(rng.integers(0, 4096, 4096))
    assert sorted_table_bounds(-1.0 * np.arange(len(counts)), counts) is None


def test_code_counts_are_bincounts() -> None:
    """The codes' histogram (OpenCV's for 8- and 16-bit pixels) counts what np.bincount
    counts: every code from the smallest to the largest, at the range's ends, one code,
    full 16-bit ranges, signed pixels, non-contiguous views, RG1."""
    rng = np.random.default_rng(11)
    images = [
        rng.integers(0, 65535, (300, 257), endpoint=True).astype(np.uint16),
        rng.integers(900, 1100, (64, 64)).astype(np.uint16),
        np.full((17, 5), 4095, np.uint16),
        rng.integers(0, 255, (99, 101), endpoint=True).astype(np.uint8),
        rng.integers(-2000, 3000, (40, 40)).astype(np.int16),
        rng.integers(0, 4096, (200, 300)).astype(np.uint16)[::3, 1::2],
        pydicom.dcmread(real_file("RG1_UNCI.dcm")).pixel_array,
    ]
    images[0][0, 0], images[0][-1, -1] = 0, 65535
    for pixels in images:
        low, high = int(pixels.min()), int(pixels.max())
        index = np.subtract(pixels, low, dtype=np.intp)
        counts = code_counts(pixels, index, low, high)
        assert counts.dtype == np.int64
        assert np.array_equal(counts, np.bincount(index.ravel())), pixels.dtype


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "MR_small.dcm", "CT_small.dcm", "mlut_18.dcm"])
def test_real_films_as_codes_give_numpys_values_and_bounds(name: str) -> None:
    # RG1 unscaled, MR signed, CT rescaled, mlut_18 through a Modality LUT Sequence.
    ds = pydicom.dcmread(real_file(name))
    coded, _ = coded_values(ds)
    pixels = ds.pixel_array
    values = np.asarray(apply_modality_lut(pixels[0] if pixels.ndim == 3 else pixels, ds), float)
    assert coded.index is not None and len(coded.table) <= 65536
    assert np.array_equal(coded.per_pixel(coded.table), values)
    assert coded.bounds == percentile_bounds(values)


def _windowed_every_pixel(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The decode as it was: each step on the whole float64 image."""
    from cxrbatch.dicom import decode as product

    values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    bounds = percentile_bounds(values)
    notes: list[str] = []
    display = product._voi(ds, values, notes, [], bounds)
    by_header = not notes[-1].startswith("percentile")
    from_data = product.percentile_window(values, bounds) if by_header else display
    if product._inversion(ds):
        display, from_data = 1.0 - display, 1.0 - from_data
    return product._to_u8(display), product._to_u8(from_data)


@pytest.mark.parametrize(
    "voi",
    ["none", "LINEAR", "LINEAR_EXACT", "SIGMOID", "narrow", "lut"],
)
@pytest.mark.parametrize("monochrome", ["MONOCHROME1", "MONOCHROME2"])
def test_decoding_on_the_code_table_gives_the_bytes_of_decoding_every_pixel(
    voi: str, monochrome: str
) -> None:
    ds = to_dataset(make_phantom(5, (300, 260)), "codes", bits=14, monochrome=monochrome)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 0.75, -100.0, "US"
    if voi in ("LINEAR", "LINEAR_EXACT", "SIGMOID", "narrow"):
        ds.WindowCenter, ds.WindowWidth = (5000.0, 7000.0) if voi != "narrow" else (6100, 350)
        ds.VOILUTFunction = voi if voi != "narrow" else "LINEAR"
    elif voi == "lut":
        item = pydicom.Dataset()
        item.LUTDescriptor = [4096, 0, 12]
        item.LUTData = [int(4095 * (k / 4095) ** 0.5) for k in range(4096)]
        ds.VOILUTSequence = [item]
    header = InstanceHeader(Path("codes"), "", "1", "1", "1", "1", "CR", "CHEST", "PA", "")
    image = decode_dataset(ds, header)
    display, segmentation = _windowed_every_pixel(ds)
    assert np.array_equal(image.pixels, display)
    assert image.segmentation_pixels is not None
    assert np.array_equal(image.segmentation_pixels, segmentation)

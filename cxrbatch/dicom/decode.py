"""Decode a radiograph into a display-ready 8-bit image.

Intensity handling (one definition for the daemon and the training code):

1. Pixel data decoded by pydicom with the pylibjpeg plugins (JPEG baseline/lossless,
   JPEG-LS, JPEG 2000, RLE) or natively (little/big endian, deflate).
2. Modality LUT or Rescale Slope/Intercept.
3. VOI: the first VOI LUT or window (Center/Width, LINEAR, LINEAR_EXACT or SIGMOID) in the
   header when it is valid; otherwise the 0.5-99.5 percentile range of the pixel values.
4. MONOCHROME1 (and Presentation LUT Shape INVERSE) inverted, so higher = brighter.
5. Scaled to 0..255 and rounded to uint8: the same form as an 8-bit PNG export.

The segmentation gets its own 8-bit copy (`DecodedImage.segmentation_pixels`), steps 2,
4 and 5 with the 0.5-99.5 percentile window of step 3 whatever the header says: a header
window is a reading preset, sometimes a small part of the data's range (a lung or bone
preset), which turns the film near-binary for the model. The classifier and the key image
keep the header's display (the classifier was trained on displayed exports).

Steps 2-5 map one value to one value, so for integer pixel data they run on the table of
the film's stored codes and one gather per output makes the image (`Coded`): the same
bytes as computing every pixel, without full-image float64 arrays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from cxrbatch.domain import DecodedImage, InstanceHeader
from cxrbatch.errors import InputError, one_line

log = logging.getLogger(__name__)

MAX_PIXELS = 80_000_000  # ~9000 x 9000; larger declared sizes are refused as hostile


def _first(value: Any) -> Any:
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return value[0] if len(value) else None
    return value


def _scaled_to_unit(values: np.ndarray, offset: float, scale: float, add: float) -> np.ndarray:
    """clip((values - offset) / scale + add, 0, 1) in one new float64 array: the same
    operations in the same order as the expression, so bit for bit its result, without
    its three full-image temporaries (a 2000 x 2000 film is 32 MB a temporary, and a new
    one costs its page faults: bench/host_side.py)."""
    out: np.ndarray = np.subtract(values, offset, dtype=np.float64)
    out /= scale
    if add:
        out += add
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing to 0..1."""
    if function == "LINEAR_EXACT":
        return _scaled_to_unit(values, center, width, 0.5)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    return _scaled_to_unit(values, center - 0.5, width - 1.0, 0.5)


def _voi(
    ds: Dataset,
    values: np.ndarray,
    notes: list[str],
    window: list[tuple[float, float]],
    bounds: tuple[float, float],
) -> np.ndarray:
    """The VOI stage to 0..1, value by value: the header's VOI LUT or window, else the
    percentile window (`bounds`: the image's percentile bounds; `values` may be a code
    table, `Coded`, whose own percentiles are not the image's)."""
    lut_seq = ds.get("VOILUTSequence")
    if lut_seq:
        try:
            item = lut_seq[0]
            descriptor = [int(v) for v in item.LUTDescriptor]
            lut = np.asarray(item.LUTData, dtype=np.float64).ravel()
            first = descriptor[1]
            index = np.clip(np.round(values).astype(np.int64) - first, 0, len(lut) - 1)
            mapped = lut[index]
            span = float(lut.max() - lut.min())
            if span > 0:
                notes.append("VOI LUT from header")
                return np.asarray((mapped - lut.min()) / span)
        except Exception as exc:
            notes.append(f"VOI LUT unusable ({type(exc).__name__}); percentile window used")
    center = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    try:
        if center is not None and width is not None and float(width) >= 1.0:
            function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
            notes.append("window from header")
            window.append((float(center), float(width)))
            return _window(values, float(center), float(width), function)
        if width is not None:
            notes.append(f"invalid WindowWidth {width!r}; percentile window used")
    except (TypeError, ValueError):
        notes.append("unparseable window values; percentile window used")
    notes.append("percentile window (0.5-99.5)")
    low, high = bounds
    window.append(((low + high) / 2, high - low))
    return percentile_window(values, (low, high))


PERCENTILES = (0.5, 99.5)


def percentile_bounds(values: np.ndarray) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles of the values (the second above the first)."""
    low, high = (float(v) for v in np.percentile(values, PERCENTILES))
    return _bounds(low, high)


def _bounds(low: float, high: float) -> tuple[float, float]:
    return low, (high if high > low else low + 1.0)


def sorted_table_bounds(values: np.ndarray, counts: np.ndarray) -> tuple[float, float] | None:
    """`percentile_bounds` of an image whose pixels take value values[k] counts[k] times
    (a histogram of its stored codes and each code's Modality LUT value), without the
    image: the same two order statistics, interpolated as numpy's "linear" method does, so
    the same bounds bit for bit (tests/test_decode.py compares them). None where the
    values are not non-decreasing over the codes present (order statistics of the codes
    would not be those of the values)."""
    present = counts > 0
    values = values[present]
    if len(values) == 0 or (len(values) > 1 and bool((np.diff(values) < 0).any())):
        return None
    cumulative = np.cumsum(counts[present])
    n = int(cumulative[-1])
    quantiles = np.true_divide(np.asarray(PERCENTILES), 100)  # as np.percentile does
    virtual = (n - 1) * quantiles  # numpy's "linear": Hyndman & Fan's 7th method

    def order_statistic(k: int) -> float:  # the k-th smallest value, from 0
        return float(values[int(np.searchsorted(cumulative, k, side="right"))])

    result = []
    for index in virtual:
        if index >= n - 1:
            result.append(order_statistic(n - 1))
            continue
        below = int(np.floor(index))
        gamma = float(index - below)
        a, b = order_statistic(below), order_statistic(below + 1)
        # numpy's _lerp: from the nearer end, so that gamma 0 and 1 give a and b exactly.
        result.append(b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma)
    return _bounds(result[0], result[1])


@dataclass(frozen=True)
class Coded:
    """An image as its stored codes: `table` holds the Modality LUT value of each code
    from the smallest to the largest, `index` each pixel's place in it, `counts` how many
    pixels have each code. Every step from the Modality LUT to the 8-bit pixels maps one
    value to one value, so it runs on the table (at most 65,536 entries) and one gather
    makes the image: the same bytes as running it on every pixel, without full-image
    float64 arrays (a 2600 x 2400 film: each is 50 MB, and several were made). Integer
    codes of up to 16 bits; other pixel data keep a full image in `table` (index None)."""

    table: np.ndarray  # float64
    index: np.ndarray | None
    counts: np.ndarray | None
    bounds: tuple[float, float]  # percentile_bounds of the image's values

    def per_pixel(self, table: np.ndarray) -> np.ndarray:
        """`table` (a function of the values, as `self.table` is laid out) per pixel."""
        # np.take with a platform-integer index: numpy converts any other index type to
        # one first, a full-image copy for every gather (RG1: 7.4 -> 2.3 ms a gather).
        return table if self.index is None else np.take(table, self.index)


def code_counts(pixels: np.ndarray, index: np.ndarray, low: int, high: int) -> np.ndarray:
    """How many pixels hold each code from `low` to `high` (`index`: pixels - low as
    platform integers), int64. OpenCV's histogram reads the 8- or 16-bit pixels themselves
    (RG1: 3.1 ms on one core) where np.bincount reads the 8-byte index (7.3 ms). Its
    counts are float32, exact up to 2**24 pixels in a bin, so larger images, and signed
    codes (which it does not take), are counted by np.bincount."""
    if pixels.ndim == 2 and pixels.dtype in (np.uint8, np.uint16) and pixels.size < 1 << 24:
        bins = high - low + 1
        histogram = cv2.calcHist([np.ascontiguousarray(pixels)], [0], None, [bins], [low, high + 1])
        return histogram.ravel().astype(np.int64)
    return np.bincount(index.ravel(), minlength=high - low + 1)


def _coded(ds: Dataset, pixels: np.ndarray, notes: list[str]) -> Coded:
    index: np.ndarray | None = None
    counts: np.ndarray | None = None
    codes = pixels
    if pixels.dtype.kind in "iu" and pixels.dtype.itemsize <= 2:
        low = int(pixels.min())
        # The index as platform integers, made once: each gather (and np.bincount, where
        # it counts) would otherwise convert it again (RG1: 28.7 -> 11.2 ms for these steps).
        index = np.subtract(pixels, low, dtype=np.intp)
        counts = code_counts(pixels, index, low, int(pixels.max()))
        codes = np.arange(low, low + len(counts), dtype=pixels.dtype)
    try:
        table = np.asarray(apply_modality_lut(codes, ds), dtype=np.float64)
    except Exception as exc:
        notes.append(f"Modality LUT unusable ({type(exc).__name__}); stored values used")
        table = codes.astype(np.float64)
    if not np.isfinite(table if counts is None else table[counts > 0]).all():
        raise InputError("Pixel values are not finite after the Modality LUT.")
    bounds = sorted_table_bounds(table, counts) if counts is not None else None
    if bounds is None:
        bounds = percentile_bounds(table if index is None else table[index])
    return Coded(table, index, counts, bounds)


def percentile_window(values: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """The 0.5-99.5 percentile range of the values (or `bounds`), to 0..1."""
    low, high = bounds or percentile_bounds(values)
    return _scaled_to_unit(values, low, high - low, 0.0)


def segmentation_view(values: np.ndarray) -> np.ndarray:
    """What the segmenter sees of an image whatever its header window: the 0.5-99.5
    percentile range of its values, as uint8. The daemon (`segmentation_pixels`) and the
    training masks of 8-bit exports (cxrbatch_training/maskgen.py) both go through here."""
    return _to_u8(percentile_window(values))


def patient_side_mapping(ds: Dataset) -> tuple[bool, str]:
    """Whether column 0 is the patient's right, and from what that was decided.

    PatientOrientation's first value is the patient direction of increasing column index:
    'L' means the image runs towards the patient's left, so column 0 is the patient's
    right. Without it, frontal chest radiographs are by convention displayed with the
    patient's right on the viewer's left, for PA and for AP.
    """
    orientation = ds.get("PatientOrientation")
    try:
        row_direction = str(orientation[0]).upper() if orientation else ""
    except Exception:
        row_direction = ""
    if "L" in row_direction and "R" not in row_direction:
        return True, "PatientOrientation"
    if "R" in row_direction and "L" not in row_direction:
        return False, "PatientOrientation"
    view = str(ds.get("ViewPosition", "") or "").upper() or "unknown view"
    return True, f"display convention ({view}; PatientOrientation row direction absent)"


def _integer(ds: Dataset, keyword: str, default: int) -> int:
    """An integer attribute of the image pixel module; InputError when it is not one."""
    value = ds.get(keyword, default)
    try:
        return int(value or default)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{keyword} is not a single integer: {str(value)[:40]!r}.") from exc


@dataclass(frozen=True)
class ModalityImage:
    """An instance's pixel values after the Modality LUT (steps 1-2 above), what a viewer
    windows itself: `inverted` when higher values are darker (MONOCHROME1, or Presentation
    LUT Shape INVERSE); `window` the header's (center, width) when valid."""

    values: np.ndarray  # float64 (Rows, Columns)
    inverted: bool
    window: tuple[float, float] | None
    notes: tuple[str, ...]


def _inversion(ds: Dataset) -> str | None:
    """Why the values display inverted (None: they do not). MONOCHROME1 is displayed
    inverted. PS3.3 C.8.11.6 pairs DX MONOCHROME1 with Presentation LUT Shape INVERSE:
    that expresses the same inversion, not a second one."""
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        return "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        return "Presentation LUT INVERSE"
    return None


def coded_values(ds: Dataset) -> tuple[Coded, list[str]]:
    """The first frame's stored codes and their Modality LUT values (`Coded`), and notes;
    InputError for what cannot be a grayscale radiograph."""
    notes: list[str] = []
    samples = _integer(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise InputError(f"Expected a grayscale image (SamplesPerPixel 1), found {samples}.")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            f"Expected PhotometricInterpretation MONOCHROME1 or MONOCHROME2, found {photometric!r}."
        )
    rows, columns = _integer(ds, "Rows", 0), _integer(ds, "Columns", 0)
    if rows < 16 or columns < 16 or rows * columns > MAX_PIXELS:
        raise InputError(f"Implausible image size {rows} x {columns}.")
    if "PixelData" not in ds:
        raise InputError("The instance has no Pixel Data.")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise InputError(f"Pixel data cannot be decoded: {one_line(exc)}") from exc
    if pixels.ndim == 3:
        notes.append(f"multi-frame ({pixels.shape[0]} frames): first frame used")
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise InputError(f"Expected a 2-D image, found pixel array of shape {pixels.shape}.")
    return _coded(ds, pixels, notes), notes


def modality_image(header: InstanceHeader) -> ModalityImage:
    """Read one instance's Modality LUT values and its header window (the web app's
    viewer windows them in the browser)."""
    ds = read_dataset(header)
    coded, notes = coded_values(ds)
    window: list[tuple[float, float]] = []
    _voi(ds, coded.table, notes, window, coded.bounds)
    header_window = window[0] if window and "window from header" in notes else None
    values = coded.per_pixel(coded.table)
    return ModalityImage(values, _inversion(ds) is not None, header_window, tuple(notes))


def decode_dataset(ds: Dataset, header: InstanceHeader) -> DecodedImage:
    coded, notes = coded_values(ds)
    window: list[tuple[float, float]] = []
    # Each step on the code table (`Coded`), the 8-bit images by one gather each.
    display = _voi(ds, coded.table, notes, window, coded.bounds)
    # The header's window, or (no valid one) the percentile window already.
    windowed_by_header = not notes[-1].startswith("percentile")
    from_data = percentile_window(coded.table, coded.bounds) if windowed_by_header else display
    inverted = _inversion(ds)
    if inverted:
        display, from_data = 1.0 - display, 1.0 - from_data
        notes.append(f"inverted ({inverted})")
    image_u8 = coded.per_pixel(_to_u8(display))
    segmentation_u8 = coded.per_pixel(_to_u8(from_data)) if windowed_by_header else image_u8
    left_is_right, side_source = patient_side_mapping(ds)
    return DecodedImage(
        instance=header,
        pixels=image_u8,
        image_left_is_patient_right=left_is_right,
        side_source=side_source,
        notes=tuple(notes),
        segmentation_pixels=segmentation_u8,
        display_window=window[0] if window else None,
    )


def _to_u8(values: np.ndarray) -> np.ndarray:
    """round(values * 255) as uint8 (values in 0..1), with one temporary."""
    scaled: np.ndarray = np.multiply(values, 255.0)
    np.round(scaled, out=scaled)
    return scaled.astype(np.uint8)


def read_dataset(header: InstanceHeader) -> Dataset:
    """The whole data set, every element converted now: pydicom converts elements lazily,
    so a corrupt one (an unknown VR, a value that is not of its VR) would otherwise fail
    wherever it is first touched (selection, decoding, highdicom) as an unexplained error."""
    try:
        ds = pydicom.dcmread(header.path)
        ds.walk(lambda _dataset, _element: None)
    except Exception as exc:
        raise InputError(f"DICOM file cannot be read: {one_line(exc)}") from exc
    return ds


def decode(header: InstanceHeader) -> tuple[DecodedImage, Dataset]:
    """Read and decode one instance; the dataset (without pixels) is kept for the writers."""
    ds = read_dataset(header)
    image = decode_dataset(ds, header)
    # The writers need the header only; drop the pixel bytes to keep memory flat.
    if "PixelData" in ds:
        del ds.PixelData
    return image, ds

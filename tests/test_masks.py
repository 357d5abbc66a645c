"""Study masks: erosion 5 then dilation 15 / 50 at 512 x 512, exact radii, containment."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from cxrbatch.models.masks import Growth, apply_mask, dilate, erode, resize_mask, study_mask
from cxrbatch.models.preprocess import ClassifierInputs, classifier_input, to_uint8
from cxrbatch.models.prompts import _largest_component, fill_holes
from cxrbatch_training.synthetic import make_phantom


@pytest.fixture(scope="module")
def lungs() -> np.ndarray:
    phantom = make_phantom(3, (1024, 1024))
    return resize_mask(phantom.right_lung | phantom.left_lung)


def test_containment(lungs: np.ndarray) -> None:
    eroded = erode(lungs, 5)
    m15 = study_mask(lungs, "M-15")
    m50 = study_mask(lungs, "M-50")
    assert m15 is not None and m50 is not None
    assert lungs.shape == (512, 512)
    assert eroded.any() and eroded.sum() < lungs.sum()
    assert not (m15 & ~m50).any(), "M-15 must lie inside M-50"
    assert not (eroded & ~m15).any() and not (eroded & ~m50).any()
    assert m15.sum() > lungs.sum() and m50.sum() > m15.sum()


@pytest.mark.parametrize(("mode", "radius"), [("M-15", 15), ("M-50", 50)])
def test_radii_are_honoured(lungs: np.ndarray, mode: str, radius: int) -> None:
    eroded = erode(lungs, 5)
    mask = study_mask(lungs, mode)  # type: ignore[arg-type]
    assert mask is not None
    distance_to_eroded = ndi.distance_transform_edt(~eroded)
    # Every pixel of the mask is within `radius` of the eroded mask, and every pixel within
    # `radius` is in the mask (exact Euclidean disk).
    assert distance_to_eroded[mask].max() <= radius
    assert mask[distance_to_eroded <= radius].all()
    assert distance_to_eroded[mask].max() > radius - 1


def test_erosion_radius_on_a_square() -> None:
    square = np.zeros((512, 512), bool)
    square[100:300, 100:300] = True
    eroded = erode(square, 5)
    ys, xs = np.nonzero(eroded)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (105, 294, 105, 294)
    grown = dilate(eroded, 15)
    ys, xs = np.nonzero(grown)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (90, 309, 90, 309)


def test_original_mode_has_no_mask(lungs: np.ndarray) -> None:
    assert study_mask(lungs, "original") is None
    image = np.ones((512, 512), np.float32)
    assert apply_mask(image, None) is image


def test_classifier_input_zeroes_outside_the_mask(lungs: np.ndarray) -> None:
    image = np.full((1024, 1024), 200, np.uint8)
    big_lungs = np.kron(lungs, np.ones((2, 2), bool))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    masked = classifier_input(image, big_lungs, "M-50", 512, mean, std)
    original = classifier_input(image, big_lungs, "original", 512, mean, std)
    m50 = study_mask(lungs, "M-50")
    assert masked.shape == (3, 512, 512)
    assert np.allclose(masked[0][~m50], (0 - 0.5) / 0.25)
    assert np.allclose(masked[0][m50], (200 / 255 - 0.5) / 0.25, atol=1e-5)
    assert np.allclose(original[0], (200 / 255 - 0.5) / 0.25, atol=1e-5)


def test_png_and_dicom_display_forms_give_the_same_input() -> None:
    """The training path (8-bit PNG) and the daemon path (decoded DICOM) share one input."""
    phantom = make_phantom(4, (600, 600))
    as_png = np.round(phantom.image * 255).astype(np.uint8)
    as_16bit_png = np.round(phantom.image * 65535).astype(np.uint16)
    lungs = phantom.right_lung | phantom.left_lung
    args = ("M-15", 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    a = classifier_input(as_png, lungs, *args)  # type: ignore[arg-type]
    b = classifier_input(as_16bit_png, lungs, *args)  # type: ignore[arg-type]
    assert np.abs(a - b).max() < 0.02


def test_shared_inputs_equal_one_off_inputs_and_the_reference() -> None:
    """Both bundles of an image share one resize and one erosion; the tensors they get are
    exactly those of one-off calls and of the masks spelled out step by step."""
    phantom = make_phantom(5, (900, 700))
    lungs = phantom.right_lung | phantom.left_lung
    image = np.round(phantom.image * 4095).astype(np.uint16)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    shared = ClassifierInputs(image, lungs)
    for mode, size in [("M-15", 512), ("M-50", 512), ("M-50", 256), ("original", 256)]:
        got = shared.tensor(mode, size, mean, std)  # type: ignore[arg-type]
        one_off = classifier_input(image, lungs, mode, size, mean, std)  # type: ignore[arg-type]
        np.testing.assert_array_equal(got, one_off)
        mask = study_mask(resize_mask(lungs), mode)  # type: ignore[arg-type]
        if mask is not None and size != 512:
            mask = resize_mask(mask, size)
        small = cv2.resize(to_uint8(image), (size, size), interpolation=cv2.INTER_AREA)
        expected = apply_mask(small.astype(np.float32) / 255.0, mask)
        np.testing.assert_allclose(got[1], (expected - mean[1]) / std[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs a lung mask"):
        ClassifierInputs(image, None).tensor("M-15", 512, mean, std)


def test_fill_holes_equals_scipy() -> None:
    """The flood-fill hole filling the segmenter uses gives scipy's pixels exactly: holes,
    holes touching the border (not holes), nested rings, empty and full masks."""
    rng = np.random.default_rng(7)
    cases = [np.zeros((40, 50), bool), np.ones((40, 50), bool)]
    for _ in range(60):
        noise = rng.random((int(rng.integers(20, 120)), int(rng.integers(20, 120))))
        cases.append(ndi.uniform_filter(noise, 5) > rng.uniform(0.45, 0.55))
    ring = np.zeros((64, 64), bool)
    ring[8:56, 8:56] = True
    ring[16:48, 16:48] = False
    ring[24:40, 24:40] = True
    ring[30:34, 30:34] = False
    cases.append(ring)
    for mask in cases:
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
    assert fill_holes(ring)[30:34, 30:34].all() and not fill_holes(ring)[:8].any()


def test_largest_component_is_scipys() -> None:
    """OpenCV's labelling picks the region scipy's did (4-connected, the first in raster
    order on a tie): noise blobs, equal squares that may touch, U shapes whose arms join
    only at the bottom (labels merged late), empty and full masks."""

    def scipys(mask: np.ndarray) -> np.ndarray:
        labels, count = ndi.label(mask)
        if count <= 1:
            return mask.astype(bool)
        sizes = ndi.sum(mask, labels, range(1, count + 1))
        return np.asarray(labels == int(np.argmax(sizes)) + 1)

    rng = np.random.default_rng(11)
    cases = [np.zeros((30, 40), bool), np.ones((30, 40), bool)]
    for _ in range(60):
        noise = rng.random((int(rng.integers(20, 150)), int(rng.integers(20, 150))))
        cases.append(ndi.uniform_filter(noise, 5) > rng.uniform(0.45, 0.55))
    for _ in range(60):
        mask = np.zeros((120, 120), bool)
        for _ in range(int(rng.integers(2, 6))):
            y, x = (int(v) for v in rng.integers(0, 100, 2))
            mask[y : y + 10, x : x + 10] = True
        y, x = (int(v) for v in rng.integers(0, 90, 2))
        mask[y : y + 20, x] = mask[y : y + 20, x + 9] = mask[y + 19, x : x + 10] = True
        cases.append(mask)
    diagonal = np.eye(8, dtype=bool)  # 8 one-pixel regions under 4-connectivity
    cases.append(diagonal)
    for mask in cases:
        np.testing.assert_array_equal(_largest_component(mask), scipys(mask))
    assert _largest_component(diagonal).sum() == 1 and _largest_component(diagonal)[0, 0]


def test_the_distance_transform_is_scipys_exact_one(lungs: np.ndarray) -> None:
    """OpenCV's precise transform gives scipy's masks, on a lung mask, shapes that touch
    the film's edges and corners, a single pixel, and a mask with no background."""
    rng = np.random.default_rng(0)
    shapes = [lungs, np.zeros((512, 512), bool), np.ones((512, 512), bool)]
    shapes[1][0, 0] = True
    for _ in range(12):
        blob = np.zeros((512, 512), np.uint8)
        for _ in range(3):
            centre = tuple(int(v) for v in rng.integers(-40, 552, 2))
            axes = tuple(int(v) for v in rng.integers(10, 200, 2))
            cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        shapes.append(blob.astype(bool))
    for shape in shapes:
        assert np.array_equal(erode(shape, 5), ndi.distance_transform_edt(shape) > 5)
        if shape.any():
            growth = Growth(shape)  # one transform for both radii, as an image's two masks
            for radius in (15, 50):
                expected = ndi.distance_transform_edt(~shape) <= radius
                assert np.array_equal(dilate(shape, radius), expected), radius
                assert np.array_equal(growth.within(radius), expected), radius
    empty = np.zeros((64, 64), bool)
    assert not dilate(empty, 15).any() and not Growth(empty).within(50).any()

"""Lung masks on the real film RG1 (against the traced reference, through nine transforms)
and on hard phantoms: the figures bench/seg_quality.py reports, held as floors here.

The full measurement (48 phantoms, two seeds) is `python -m bench.seg_quality`; its
figures are in docs/segmentation.md. These tests run the same code on fewer films.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.seg_sets import (
    REFERENCE,
    dice,
    hard_phantom_cases,
    lower_zone_dice,
    reference_masks,
    rg1_cases,
)
from cxrbatch.config import SegmentationSettings
from cxrbatch.models.prompts import segment_lungs, working_copy
from cxrbatch.models.segmenter import LiteMedSAM, load_segmenter
from cxrbatch_training.synthetic import make_hard_phantom

pytest.importorskip("data_store", reason="pydicom-data ships the real chest film RG1")


@pytest.fixture(scope="module")
def segmenter() -> LiteMedSAM:
    model = load_segmenter(SegmentationSettings(device="cpu"))
    assert isinstance(model, LiteMedSAM)
    return model


def test_reference_is_two_separate_plausible_lung_fields() -> None:
    right, left = reference_masks((1955, 1841), REFERENCE)
    assert not (right & left).any()
    for mask in (right, left):
        assert 0.08 < mask.mean() < 0.25
    columns = np.arange(1841)
    # RG1 is L\F: the patient's right lung lies on the image's left.
    assert (
        (right.sum(0) * columns).sum() / right.sum()
        < 900
        < (left.sum(0) * columns).sum() / (left.sum())
    )


def test_lower_zone_dice_sees_a_base_that_the_whole_lungs_dice_forgives() -> None:
    """RG1's traced right lung with its lowest fifth of rows cut away, and with a spill a
    tenth of its height deep below its base across its width: each still a good film by
    the whole lung's Dice (>= 0.90), each well below 0.85 in the lower zone; the
    reference itself scores 1.0 and an empty one has nothing to miss."""
    right, _ = reference_masks((1955, 1841), REFERENCE)
    rows, columns = np.nonzero(right)
    top, bottom = int(rows.min()), int(rows.max())
    cut = right.copy()
    cut[bottom - (bottom - top) // 5 :] = False
    spill = right.copy()
    spill[bottom : bottom + (bottom - top) // 10, columns.min() : columns.max()] = True
    assert lower_zone_dice(right, right) == 1.0
    assert lower_zone_dice(right, np.zeros_like(right)) == 1.0
    for wrong in (cut, spill):
        assert dice(wrong, right) >= 0.90
        assert lower_zone_dice(wrong, right) < 0.80


@pytest.mark.slow
def test_rg1_and_transformed_copies_against_the_reference(segmenter: LiteMedSAM) -> None:
    scores: dict[str, tuple[float, float]] = {}
    for case in rg1_cases():
        seg = segment_lungs(segmenter, case.image)
        right, left = dice(seg.right_lung, case.right_lung), dice(seg.left_lung, case.left_lung)
        scores[case.name] = (right, left)
        # Never the other lung: a side swap scores the wrong lung higher.
        assert dice(seg.right_lung, case.left_lung) < scores[case.name][0], case.name
    print({k: tuple(round(v, 3) for v in s) for k, s in scores.items()})
    values = [v for pair in scores.values() for v in pair]
    assert set(scores) >= {"original", "j2k-lossy", "mirrored", "rotated+7", "gamma0.6", "cropped"}
    assert min(values) >= 0.88, scores
    assert float(np.mean(values)) >= 0.92, scores


@pytest.mark.slow
def test_hard_phantoms_dice(segmenter: LiteMedSAM) -> None:
    values = []
    for case in hard_phantom_cases(8, 512):
        seg = segment_lungs(segmenter, case.image)
        values += [dice(seg.right_lung, case.right_lung), dice(seg.left_lung, case.left_lung)]
        assert dice(seg.right_lung, case.left_lung) < values[-2], case.name
    print(np.round(values, 3))
    assert float(np.mean(values)) >= 0.90
    assert min(values) >= 0.75


def test_hard_phantom_truth_follows_the_convention() -> None:
    features: set[str] = set()
    for seed in range(12):
        phantom = make_hard_phantom(seed, (256, 256))
        features |= {f.split(" ")[0] for f in phantom.features}
        right, left = phantom.right_lung, phantom.left_lung
        assert right.any() and left.any() and not (right & left).any()
        centre = lambda m: np.nonzero(m)[1].mean()  # noqa: E731
        # The patient's right is on the image's left unless the phantom is flipped.
        assert (centre(right) < centre(left)) != phantom.flipped
        assert phantom.view_position in ("PA", "AP")
    # The set draws what makes films hard (each name's first word).
    assert {"breast", "effusion", "rotated", "collimation", "side", "gastric"} <= features


def test_dither_is_seeded_and_small(segmenter: LiteMedSAM) -> None:
    image = np.full((300, 280), 128, np.uint8)
    first, second = segmenter.prepare(image).batch, segmenter.prepare(image).batch
    assert np.array_equal(first.numpy(), second.numpy())  # the same image, the same input
    rows, cols = round(300 * 256 / 300), round(280 * 256 / 300)
    plane = first[0, 0, :rows, :cols].numpy()
    assert plane.std() > 0  # a flat image is no longer flat at the model's input
    plain = LiteMedSAM(device="cpu", input_dither=0.0).prepare(image).batch[0, 0, :rows, :cols]
    assert float(plain.numpy().std()) == 0.0


def test_prompts_working_copy_is_the_encoders_input(segmenter: LiteMedSAM) -> None:
    """The encoder is handed the prompts' working copy in place of its own resize
    (prompts.segment_pixels): the same input, for films of either orientation and sizes
    whose long side is not a multiple of the working size."""
    rng = np.random.default_rng(5)
    for shape in ((1955, 1841), (700, 1013), (256, 200)):
        film = rng.integers(0, 256, shape, dtype=np.uint8)
        own = segmenter.prepare(film)
        given = segmenter.prepare(film, area_resized=working_copy(film))
        assert np.array_equal(own.batch.numpy(), given.batch.numpy())
        assert own.scale_xy == given.scale_xy
        # ... and it is the copy given that is used (no second resize).
        other = segmenter.prepare(film, area_resized=255 - working_copy(film))
        assert not np.array_equal(own.batch.numpy(), other.batch.numpy())
    # A copy of another size is not taken for it.
    film = rng.integers(0, 256, (600, 500), dtype=np.uint8)
    wrong = np.zeros((100, 80), np.uint8)
    assert np.array_equal(
        segmenter.prepare(film, area_resized=wrong).batch.numpy(),
        segmenter.prepare(film).batch.numpy(),
    )

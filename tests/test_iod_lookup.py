"""highdicom's IOD lookups, cached by cxrbatch/dicom/iod_lookup.py: the same answers as
highdicom's own scan of its tables, for every SOP class it knows."""

from __future__ import annotations

import highdicom.base
import highdicom.sr.content
import pytest
from highdicom import _standard_utils as tables

import cxrbatch.dicom.seg  # noqa: F401  (installs the cache, as every writer does)
from cxrbatch.dicom.iod_lookup import memoize_iod_lookups

# What highdicom asks (0.28): pixel data and frames, content date and time, and the
# attributes its SR image regions check.
QUESTIONS = [
    ("PixelData", ["IconImageSequence"]),
    ("FloatPixelData", ["IconImageSequence"]),
    ("DoubleFloatPixelData", ["IconImageSequence"]),
    ("NumberOfFrames", None),
    ("ContentDate", None),
    ("ContentTime", None),
    ("PixelData", None),
]


def test_every_writer_uses_the_cache() -> None:
    memoized = tables.is_attribute_in_iod
    assert getattr(memoized, "cxrbatch_memoized", False)
    assert vars(highdicom.base)["is_attribute_in_iod"] is memoized
    assert vars(highdicom.sr.content)["is_attribute_in_iod"] is memoized
    assert memoize_iod_lookups() is True
    assert tables.is_attribute_in_iod is memoized  # installed once, not wrapped again


def test_answers_are_highdicoms_for_every_sop_class() -> None:
    original = tables.is_attribute_in_iod.__wrapped__  # type: ignore[attr-defined]
    sop_classes = list(tables.get_sop_class_iod_map())
    assert len(sop_classes) > 100
    differing = []
    answers: list[object] = []
    for uid in sop_classes:
        for attribute, excluded in QUESTIONS:
            expected = _outcome(original, attribute, uid, excluded)
            for _ in range(2):  # the first answer computed, the second from the cache
                got = _outcome(tables.is_attribute_in_iod, attribute, uid, excluded)
                if got != expected:
                    differing.append((uid, attribute, excluded, got, expected))
            answers.append(expected)
    assert differing == []
    # Both answers are exercised (and the tables' own gaps: a few IODs name a module
    # highdicom 0.28 lacks, a KeyError either way).
    assert answers.count(True) > 100 and answers.count(False) > 100
    # The exclusion is part of the question: an image IOD's icon has pixel data too.
    sc = "1.2.840.10008.5.1.4.1.1.7"
    assert tables.does_iod_have_pixel_data(sc) is True
    ct = "1.2.840.10008.5.1.4.1.1.2"
    assert tables.is_attribute_in_iod("NumberOfFrames", ct) == original("NumberOfFrames", ct)


def _outcome(lookup: object, attribute: str, uid: str, excluded: list[str] | None) -> object:
    try:
        return lookup(attribute, uid, excluded)  # type: ignore[operator]
    except KeyError as exc:
        return ("KeyError", str(exc))


def test_an_unknown_sop_class_still_raises_every_time() -> None:
    for _ in range(2):
        with pytest.raises(KeyError, match="No IOD found"):
            tables.is_attribute_in_iod("PixelData", "1.2.3.4.5")

"""The key image's text band: every detail line stays on the picture, however long the
QC reason (a reason cut at the edge loses what it means: "a mirrored film ... or
dextrocardia; the sides are not swapped here")."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cxrbatch.dicom.captions import Caption, Line
from cxrbatch.dicom.keyimage import FONT, _band, detail_scale, wrapped
from cxrbatch.models import qc

REASON = (
    f"  {qc.SIDES_DISAGREE} (heart side -0.06 (expected >= -0.05): by the anatomy the heart "
    "lies on the side the header calls the patient's right: a mirrored film with its "
    "orientation left as it was, or dextrocardia; the sides are not swapped here)"
)


@pytest.mark.parametrize("width", [512, 964, 1024])
def test_a_long_line_is_wrapped_between_words_to_the_width(width: int) -> None:
    scale = detail_scale(width)
    lines = wrapped(REASON, width, scale)
    assert len(lines) >= 2
    for line in lines:
        assert cv2.getTextSize(line, FONT, scale, 1)[0][0] <= width - 12, line
    assert " ".join(" ".join(lines).split()) == " ".join(REASON.split())  # nothing lost
    assert lines[0].startswith("  sides") and all(x.startswith("      ") for x in lines[1:])
    assert wrapped("Contours: right lung (orange)", width, scale) == [
        "Contours: right lung (orange)"
    ]


def test_the_band_keeps_a_long_reason_off_the_pictures_edge() -> None:
    short = Caption("NEEDS REVIEW", True, (Line("NEEDS REVIEW: segmentation failed QC", True),))
    long = Caption("NEEDS REVIEW", True, (*short.lines, Line(REASON, True)))
    width = 964
    short_band, long_band = _band(width, short, []), _band(width, long, [])
    assert long_band.shape[0] > short_band.shape[0]  # the reason's lines, each on the band
    rows = slice(short_band.shape[0] - 8, long_band.shape[0])  # below the headline
    assert not long_band[rows, -5:].any()  # no letter reaches the right edge
    assert np.count_nonzero(long_band[rows].any(axis=2).any(axis=1)) > 20  # text was drawn

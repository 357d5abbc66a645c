"""The presentation state's overlay plane (the lung borders as bits): read back by
pydicom's own overlay reader at sizes whose pixel count is not a multiple of 8 or 16
(the packing pads the last byte and the value to an even length)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from cxrbatch.dicom.contours import Borders
from cxrbatch.dicom.gsps import OVERLAY_GROUP, _overlay


@pytest.mark.parametrize("shape", [(1955, 1841), (64, 64), (37, 29), (3, 5), (1, 1)])
def test_overlay_bits_read_back_by_pydicom(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    first = rng.random(shape) > 0.5
    second = np.zeros(shape, dtype=bool)
    second[shape[0] // 3 :, : max(1, shape[1] // 2)] = True
    gsps = Dataset()
    gsps.GraphicLayerSequence = []
    _overlay(gsps, shape, [Borders(first), Borders(second)], order=1)
    # The borders drawn independently, as the overlay should hold them.
    expected = np.zeros(shape, dtype=np.uint8)
    for mask in (first, second):
        found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(expected, found, -1, 1, max(1, shape[1] // 600))
    data = gsps[OVERLAY_GROUP, 0x3000].value
    packed = (shape[0] * shape[1] + 7) // 8  # a bit a pixel, the last byte padded
    assert len(data) == packed + packed % 2  # and the value to an even length
    # Through a file, as a reader meets it.
    gsps.file_meta = FileMetaDataset()
    gsps.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    gsps.save_as(buffer)
    buffer.seek(0)
    read = dcmread(buffer, force=True).overlay_array(OVERLAY_GROUP)
    assert read.shape == shape
    assert np.array_equal(read, expected)
    assert expected.any()

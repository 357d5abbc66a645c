"""The conformance corpus: every SEG, SR and key image cxrbatch produces from it passes
dciodvfy with zero errors and reads back with highdicom.

Inputs: the real chest CR of pydicom-data in every transfer syntax it ships, and
synthetic CR/DX variants: MONOCHROME1 and 2; 8, 10, 12, 14 and 16 bits; signed pixels;
every lossless transfer syntax the writer supports; missing optional attributes; long
and odd-length UIDs; non-ASCII patient names in UTF-8 and Latin-1; invalid pixel
spacing (zero, negative, one value). Run with the classifier and screening bundles so the
SR carries findings and triage, and with key images on.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from cxrbatch import pipeline
from cxrbatch.config import Settings
from cxrbatch.dicom.discover import discover
from cxrbatch.domain import OutcomeStatus
from cxrbatch_training.synthetic import make_phantom, save, to_dataset
from tests.conftest import dciodvfy_errors, real_file

SIZE = (320, 288)


def _signed(ds: Dataset) -> None:
    """12-bit signed stored values centred on zero, with a window that shows them."""
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).astype(np.int32) - 2048
    ds.PixelRepresentation = 1
    ds.PixelData = stored.astype(np.int16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 0, 4096


def _strip_optional(ds: Dataset) -> None:
    for keyword in (
        "ViewPosition",
        "BodyPartExamined",
        "PatientOrientation",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "WindowCenter",
        "WindowWidth",
        "StudyDate",
        "StudyTime",
        "SeriesDate",
        "SeriesTime",
        "ContentDate",
        "ContentTime",
        "SeriesNumber",
        "InstanceNumber",
        "Manufacturer",
        "PatientBirthDate",
        "PatientSex",
        "SeriesDescription",
    ):
        if keyword in ds:
            delattr(ds, keyword)


def _uids(length: int) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        for index, keyword in enumerate(
            ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), start=1
        ):
            value = (f"1.2.826.0.1.3680043.10.1411.{index}." + "9" * 64)[:length]
            assert len(value) == length and not value.endswith(".")
            setattr(ds, keyword, value)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    return apply


def _name(name: str, charset: str) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.ReferringPhysicianName = name

    return apply


def _spacing(value: list[str]) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        ds.PixelSpacing = value

    return apply


# name: (to_dataset options, transfer syntax, change to the dataset)
SYNTHETIC: dict[str, tuple[dict[str, object], str, Callable[[Dataset], None] | None]] = {
    "cr-mono2-8bit": ({"bits": 8}, "explicit", None),
    "cr-mono1-10bit-rle": ({"bits": 10, "monochrome": "MONOCHROME1"}, "rle", None),
    "cr-mono2-12bit-implicit": ({"bits": 12}, "implicit", None),
    "dx-mono2-14bit-j2k": ({"modality": "DX", "bits": 14}, "j2k", None),
    "dx-mono1-16bit-jpegls": (
        {"modality": "DX", "bits": 16, "monochrome": "MONOCHROME1"},
        "jpegls",
        None,
    ),
    "cr-mono1-12bit-deflated": ({"monochrome": "MONOCHROME1"}, "deflated", None),
    "cr-signed-12bit": ({"bits": 12}, "explicit", _signed),
    "cr-missing-optional": ({}, "explicit", _strip_optional),
    "dx-missing-optional": ({"modality": "DX"}, "explicit", _strip_optional),
    "uids-64-chars": ({}, "explicit", _uids(64)),
    "uids-odd-length": ({}, "explicit", _uids(41)),
    "name-utf8": ({}, "explicit", _name("Müller-Łukasiewicz^Zoë^José", "ISO_IR 192")),
    "name-latin1": ({}, "explicit", _name("Gonçalves^Hélène", "ISO_IR 100")),
    "spacing-zero": ({}, "explicit", _spacing(["0", "0"])),
    "spacing-negative": ({}, "explicit", _spacing(["-0.2", "0.2"])),
    "spacing-one-value": ({}, "explicit", _spacing(["0.2"])),
}
REAL = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


def _input(folder: Path, case: str) -> None:
    folder.mkdir(parents=True)
    if case in REAL:
        shutil.copyfile(real_file(case), folder / "IM0001")
        return
    options, syntax, change = SYNTHETIC[case]
    ds = to_dataset(make_phantom(sorted(SYNTHETIC).index(case), SIZE), case, **options)  # type: ignore[arg-type]
    if change is not None:
        change(ds)
    save(ds, folder / "IM0001", syntax)


@pytest.mark.parametrize("case", [*REAL, *SYNTHETIC])
def test_corpus_outputs_are_conformant(
    tmp_path: Path, classified_models: tuple[Settings, pipeline.Models], case: str
) -> None:
    settings, models = classified_models
    settings = settings.model_copy(
        update={"output": settings.output.model_copy(update={"key_image": True})}
    )
    _input(tmp_path / "in", case)
    (study,), rejected = discover(tmp_path / "in")
    assert rejected == []
    result = pipeline.run(study, models, settings, tmp_path / "out")
    assert result.status is OutcomeStatus.PROCESSED, result.reason
    assert result.outputs is not None
    files = result.outputs.dicom_files()
    assert len(files) == 4  # SEG, key image, presentation state, SR
    for path in files:
        assert dciodvfy_errors(path) == [], path.name
    source = dcmread(study.instances[0].path, stop_before_pixels=True)
    (seg_path,) = result.outputs.seg_files.values()
    (key_path,) = result.outputs.key_image_files.values()
    seg = hd.seg.segread(seg_path)
    assert seg.PatientName == source.PatientName and seg.PatientID == source.PatientID
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    image = result.images[0]
    masks = seg.get_pixels_by_source_instance(
        [image.instance.sop_instance_uid], combine_segments=False
    )[0]
    assert np.array_equal(masks[..., 0].astype(bool), image.segmentation.right_lung)
    sr = hd.sr.srread(result.outputs.sr_file)  # type: ignore[arg-type]
    tracking = [g.tracking_identifier for g in sr.content.get_planar_roi_measurement_groups()]
    if image.segmentation.qc_passed:
        assert any(t.startswith("classifier image 1:") for t in tracking), tracking
    else:  # masks the gate failed never reach a classifier (the phantom of spacing-one-value:
        # its right lung's mask ends at 0.64 Dice, which the base check catches): the SR says so
        assert "NEEDS REVIEW" in sr.SeriesDescription, sr.SeriesDescription
        assert not any(t.startswith("classifier") for t in tracking), tracking
    (gsps_path,) = result.outputs.presentation_state_files.values()
    gsps = dcmread(gsps_path)
    assert gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
        image.instance.sop_instance_uid
    )
    key = hd.imread(key_path)
    assert key.BurnedInAnnotation == "YES" and key.StudyInstanceUID == source.StudyInstanceUID
    assert key.PatientName == source.PatientName

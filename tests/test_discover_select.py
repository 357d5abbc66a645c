"""Discovery and selection: any depth and naming, bad files recorded, never aborting."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from cxrbatch.config import SelectionSettings
from cxrbatch.dicom.discover import discover, read_header
from cxrbatch.dicom.select import eligibility, select
from cxrbatch.domain import InstanceHeader, RejectedFile
from cxrbatch_training.synthetic import make_phantom, save, to_dataset
from tests.conftest import real_file


def _phantom_file(path: Path, **kwargs: object) -> Path:
    ds = to_dataset(make_phantom(1, (128, 128)), "select", **kwargs)  # type: ignore[arg-type]
    return save(ds, path)


def test_walks_any_depth_and_naming_and_groups_by_study(tmp_path: Path) -> None:
    _phantom_file(tmp_path / "a" / "b" / "c" / "IM0001")
    _phantom_file(tmp_path / "x.dcm", instance=2)
    (tmp_path / "DICOMDIR").write_bytes(b"not a real DICOMDIR")
    studies, rejected = discover(tmp_path)
    assert len(studies) == 1
    assert len(studies[0].instances) == 2
    # A DICOMDIR is recorded as skipped with its reason, never quarantined.
    (dicomdir,) = rejected
    assert dicomdir.path.name == "DICOMDIR" and not dicomdir.quarantine
    assert dicomdir.reason.startswith("skipped: a DICOMDIR")


def test_bad_files_are_rejected_with_reasons(tmp_path: Path) -> None:
    good = _phantom_file(tmp_path / "good.dcm")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello, not DICOM")
    data = good.read_bytes()
    (tmp_path / "truncated_header.dcm").write_bytes(data[:200])
    studies, rejected = discover(tmp_path)
    reasons = {r.path.name: r.reason for r in rejected}
    assert len(studies) == 1
    assert "0 bytes" in reasons["empty.dcm"]
    assert "not a DICOM file" in reasons["notes.txt"]
    assert "truncated_header.dcm" in reasons
    assert all(r.quarantine for r in rejected)


def test_missing_and_invalid_uids_are_rejected(tmp_path: Path) -> None:
    path = _phantom_file(tmp_path / "a.dcm")
    ds = pydicom.dcmread(path)
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "no_study.dcm")
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = "../../etc/passwd"
    ds.save_as(tmp_path / "evil.dcm")
    results = {p.name: read_header(p) for p in (tmp_path / "no_study.dcm", tmp_path / "evil.dcm")}
    assert isinstance(results["no_study.dcm"], RejectedFile)
    assert "StudyInstanceUID" in results["no_study.dcm"].reason
    assert isinstance(results["evil.dcm"], RejectedFile)
    assert "invalid UID" in results["evil.dcm"].reason


def test_duplicates_dropped_and_conflicts_recorded(tmp_path: Path) -> None:
    first = _phantom_file(tmp_path / "one.dcm")
    shutil.copyfile(first, tmp_path / "one_copy.dcm")
    ds = pydicom.dcmread(first)
    ds.SeriesDescription = "changed content, same SOPInstanceUID"
    ds.save_as(tmp_path / "zz_conflict.dcm")
    studies, rejected = discover(tmp_path)
    assert len(studies[0].instances) == 1
    by_name = {r.path.name: r for r in rejected}
    assert "duplicate" in by_name["one_copy.dcm"].reason and not by_name["one_copy.dcm"].quarantine
    assert "conflict" in by_name["zz_conflict.dcm"].reason and by_name["zz_conflict.dcm"].quarantine


def test_the_same_data_set_in_other_syntaxes_is_a_duplicate_not_a_conflict(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_phantom_file(tmp_path / "gen" / "one.dcm"))
    for syntax in ("implicit", "rle", "jpegls"):
        save(
            pydicom.dcmread(tmp_path / "gen" / "one.dcm"), tmp_path / "in" / f"{syntax}.dcm", syntax
        )
    lossy = pydicom.dcmread(tmp_path / "gen" / "one.dcm")
    lossy.PixelData = bytes(len(ds.PixelData))  # other pixels: a real conflict
    save(lossy, tmp_path / "in" / "zz_pixels.dcm", "explicit")
    studies, rejected = discover(tmp_path / "in")
    assert len(studies) == 1 and len(studies[0].instances) == 1
    by_name = {r.path.name: r for r in rejected}
    assert len(by_name) == 3
    duplicates = [r for r in by_name.values() if r.reason.startswith("duplicate")]
    assert len(duplicates) == 2 and not any(r.quarantine for r in duplicates)
    assert by_name["zz_pixels.dcm"].reason.startswith("conflict")


def _header(**overrides: object) -> InstanceHeader:
    values: dict[str, object] = dict(
        path=Path("x"),
        sha256="0",
        sop_instance_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid="1.3",
        series_instance_uid="1.4",
        modality="CR",
        body_part_examined="CHEST",
        view_position="PA",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    values.update(overrides)
    return InstanceHeader(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, None),
        ({"view_position": "AP"}, None),
        ({"body_part_examined": "Thorax"}, None),
        ({"body_part_examined": "chest_pa"}, "BodyPartExamined"),
        ({"view_position": "LL"}, "lateral"),
        ({"view_position": "RL"}, "lateral"),
        ({"body_part_examined": "EXTREMITY"}, "BodyPartExamined 'EXTREMITY'"),
        ({"modality": "MR", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4"}, "not a CR/DX"),
        ({"modality": "SEG", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4"}, "Segmentation"),
        ({"modality": "SR", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.33"}, "Comprehensive SR"),
        ({"modality": "CT"}, "Modality"),
        ({"body_part_examined": None}, None),
        ({"view_position": None}, None),
    ],
)
def test_eligibility_rules(overrides: dict[str, object], expected: str | None) -> None:
    reason = eligibility(_header(**overrides), SelectionSettings())
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_site_rules_are_configurable() -> None:
    strict = SelectionSettings(
        missing_view="skip", missing_body_part="skip", chest_body_parts=("CHEST", "CHESTPA")
    )
    assert "ViewPosition missing" in str(eligibility(_header(view_position=None), strict))
    assert "BodyPartExamined missing" in str(eligibility(_header(body_part_examined=None), strict))
    assert eligibility(_header(body_part_examined="CHEST_PA"), strict) is None


def test_real_files_are_selected_or_skipped_with_reasons() -> None:
    expected = {
        "RG1_UNCR.dcm": None,
        "RG3_UNCR.dcm": "EXTREMITY",
        "MR_small.dcm": "not a CR/DX",
        "CT_small.dcm": "not a CR/DX",
        "US1_UNCR.dcm": "not a CR/DX",
    }
    for name, reason in expected.items():
        header = read_header(real_file(name))
        assert isinstance(header, InstanceHeader), name
        found = eligibility(header, SelectionSettings())
        assert (found is None) if reason is None else (found is not None and reason in found), name


def test_select_splits_eligible_and_skipped(tmp_path: Path) -> None:
    _phantom_file(tmp_path / "pa.dcm")
    _phantom_file(tmp_path / "lat.dcm", instance=2, view_position="LL")
    studies, _ = discover(tmp_path)
    selection = select(studies[0], SelectionSettings())
    assert len(selection.eligible) == 1 and selection.eligible[0].view_position == "PA"
    assert len(selection.skipped) == 1 and "lateral" in selection.skipped[0].reason


def test_a_real_dicomdir_under_any_name_is_recorded_as_skipped(tmp_path: Path) -> None:
    shutil.copyfile(real_file("DICOMDIR"), tmp_path / "index.dcm")
    studies, rejected = discover(tmp_path)
    assert studies == []
    (skipped,) = rejected
    assert skipped.reason.startswith("skipped: a DICOMDIR") and not skipped.quarantine

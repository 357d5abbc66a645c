"""`export-deid` against PS3.15 Table E.1-1 itself: a chest phantom carries a sentinel in
every attribute the table lists (text, dates, UIDs, sequences, binary values), a private
attribute, an overlay plane whose bits spell a sentinel (with its description, label and
comments), a curve, an Original Attributes Sequence holding old values, and Software
Versions. It goes through `process` and `export-deid`; no sentinel's bytes appear anywhere
in the export (DICOM, PNG, CSV, text), binary ones are gone or replaced, and the exported
image, SEG and SR still pass dciodvfy with 0 errors and read back with highdicom."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from cxrbatch import pipeline
from cxrbatch.batch import run_batch
from cxrbatch.cli import app
from cxrbatch.config import Settings
from cxrbatch.deid import table
from cxrbatch.site import Site
from cxrbatch_training.synthetic import make_phantom, save, to_dataset
from tests.conftest import dciodvfy_errors

# Groups no image data set holds: commands, file meta, DICOMDIR, signatures, padding.
NOT_IN_AN_IMAGE = {0x0000, 0x0002, 0x0004, 0xFFFA, 0xFFFC}
# Kept by processing as they are: the image's own identity (replaced in the export too,
# but the sentinel must be a valid UID for the study to be processed).
UID_ROOT = "1.2.826.0.1.3680043.10.1411.777"
OVERLAY_TEXT = b"SNTLOVERLAYBITS!"  # 16 bytes = 128 overlay bits


def _sentinel(vr: str, index: int) -> object:
    """A value of `vr` unique to the attribute numbered `index` (under 100,000), found again
    by its bytes (text VRs) or by comparison (binary VRs)."""
    text = f"SNTL{index:04d}X"
    return {
        "AE": text, "CS": text, "SH": text, "LO": text, "LT": text + " long text",
        "ST": text + " short text", "UT": text + " unlimited", "UC": text, "UR": f"http://{text}",
        "PN": f"{text}^GIVEN{index:04d}",
        # Digits that no valid UID can hold (a component with a leading zero, a sign), so a
        # hit is never a UID of the export that happens to contain them.
        "DA": f"{1700 + index // 9:04d}.0{index % 9 + 1}.15", "TM": f"235959.{index:06d}",
        "DT": f"17010101235959.{index:06d}", "IS": f"-98{index:04d}", "DS": f"-{index}.98765",
        "AS": "077Y", "UI": f"{UID_ROOT}.{index}",
        "OB": text.encode() * 2, "OW": text.encode() * 2, "UN": text.encode() * 2,
        "US": 0xBEEF, "SS": -4242, "UL": 0xDEADBEEF, "SL": -424242, "FL": 4242.5,
        "FD": 424242.25, "AT": 0x00100010, "OD": text.encode() * 2, "OF": text.encode() * 2,
        "OL": text.encode() * 2, "OV": text.encode() * 2, "SV": -42, "UV": 42,
    }[vr]  # fmt: skip


def _sentinel_source(tmp: Path) -> tuple[Path, dict[str, str], list[int]]:
    """The phantom with every Table E.1-1 attribute set; the text sentinels by attribute;
    the tags holding a binary sentinel."""
    ds = to_dataset(make_phantom(91, (256, 256)), "91/0")
    tags, _ = table()
    texts: dict[str, str] = {}
    binary: list[int] = []
    for index, tag in enumerate(sorted(tags), start=1):
        group = tag >> 16
        if group in NOT_IN_AN_IMAGE:
            continue
        try:
            vr = dictionary_VR(tag).split(" or ")[0]
        except KeyError:
            continue  # newer than pydicom's dictionary: no VR to write it with
        if vr == "SQ":
            item = Dataset()
            item.CodeValue = f"SQ{index:04d}"
            item.CodingSchemeDesignator = "99SNTL"
            item.CodeMeaning = f"SNTL{index:04d}X in a sequence"
            item.add_new(0x00081155, "UI", f"{UID_ROOT}.9{index}")
            ds.add_new(tag, "SQ", [item])
            texts[f"{tag:08X} item"] = f"SNTL{index:04d}X"
            texts[f"{tag:08X} item uid"] = f"{UID_ROOT}.9{index}"
            continue
        value = _sentinel(vr, index)
        ds.add_new(tag, vr, value)
        if isinstance(value, str):
            texts[f"{tag:08X}"] = value.split("^")[0]
        elif isinstance(value, bytes):
            texts[f"{tag:08X}"] = value.decode()
        else:
            binary.append(tag)
    # The identity of the image must stay a valid one to be processed: sentinel UIDs.
    ds.StudyInstanceUID = f"{UID_ROOT}.1.1"
    ds.SeriesInstanceUID = f"{UID_ROOT}.1.2"
    ds.SOPInstanceUID = f"{UID_ROOT}.1.3"
    texts.update(study=f"{UID_ROOT}.1.1", series=f"{UID_ROOT}.1.2", sop=f"{UID_ROOT}.1.3")
    # Modality, view and body part are what selection reads (the table keeps them).
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "CR", "PA", "CHEST"
    # An overlay plane whose bits spell a sentinel, with its text attributes.
    ds.add_new(0x60000010, "US", 8)  # Overlay Rows
    ds.add_new(0x60000011, "US", 16)  # Overlay Columns
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60000022, "LO", "SNTLOVERLAYDESC")  # Overlay Description
    ds.add_new(0x60001500, "LO", "SNTLOVERLAYLABEL")  # Overlay Label
    ds.add_new(0x60004000, "LT", "SNTLOVERLAYCOMMENT")  # Overlay Comments
    ds.add_new(0x60003000, "OW", OVERLAY_TEXT)
    texts.update(
        overlay_bits=OVERLAY_TEXT.decode(),
        overlay_description="SNTLOVERLAYDESC",
        overlay_label="SNTLOVERLAYLABEL",
        overlay_comment="SNTLOVERLAYCOMMENT",
    )
    # A curve (retired, still met in old archives).
    ds.add_new(0x50000022, "LO", "SNTLCURVEDESC")
    ds.add_new(0x50003000, "OB", b"SNTLCURVEDATA123")
    texts.update(curve="SNTLCURVEDESC", curve_data="SNTLCURVEDATA123")
    # Values modified before, kept in Original Attributes Sequence.
    original = Dataset()
    modified = Dataset()
    modified.PatientName = "SNTLOLDNAME^PATIENT"
    modified.PatientID = "SNTLOLDID"
    original.ModifiedAttributesSequence = [modified]
    original.AttributeModificationDateTime = "20240101120000"
    original.ModifyingSystem = "SNTLMODSYSTEM"
    original.ReasonForTheAttributeModification = "CORRECT"
    ds.OriginalAttributesSequence = [original]
    texts.update(old_name="SNTLOLDNAME", old_id="SNTLOLDID", modifying="SNTLMODSYSTEM")
    # Beyond the table: the source's software versions; a private attribute.
    ds.SoftwareVersions = "SNTLSOFTWARE 9.9"
    texts["software"] = "SNTLSOFTWARE"
    block = ds.private_block(0x0011, "SNTL PRIVATE", create=True)
    block.add_new(0x01, "LO", "SNTLPRIVATEVALUE")
    texts["private"] = "SNTLPRIVATEVALUE"
    path = save(ds, tmp / "in" / "IM1")
    return path, texts, binary


def test_no_sentinel_of_table_e_1_1_survives_process_and_export_deid(
    tmp_path: Path, classified_models: tuple[Settings, pipeline.Models]
) -> None:
    configured, loaded = classified_models
    source, texts, binary = _sentinel_source(tmp_path)
    tags, masks = table()
    assert len(tags) > 600 and len(masks) == 3  # the whole table, curves and overlays
    assert len(texts) > 550, len(texts)
    settings = configured.model_copy(
        update={"output": configured.output.model_copy(update={"key_image": True})}
    )
    site = Site.at(settings, tmp_path / "out")
    summary = run_batch(source.parent, site, models=loaded)
    assert summary.studies == {"processed": 1}, summary
    export = tmp_path / "export"
    result = CliRunner().invoke(
        app, ["export-deid", "--out", str(site.out_dir), "--to", str(export)]
    )
    assert result.exit_code == 0, result.output

    files = [p for p in export.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".dcm", ".png", ".csv", ".txt"}
    leaks = [
        (what, text, path.name)
        for path in files
        for what, text in texts.items()
        if text.upper().encode() in path.read_bytes().upper()
    ]
    assert leaks == [], leaks[:20]
    scanned = len(texts) * len(files)

    exported = {pydicom.dcmread(p).Modality: pydicom.dcmread(p) for p in export.rglob("*.dcm")}
    assert set(exported) == {"CR", "SEG", "SR"}
    image = exported["CR"]
    for tag in binary:  # a binary sentinel: removed, emptied or replaced
        if tag in image:
            assert image[tag].value != _sentinel(image[tag].VR, 0) or image[tag].VM == 0
    assert not any((e.tag.group & 0xFF00) in (0x5000, 0x6000) for e in image)
    assert "OriginalAttributesSequence" not in image
    # This source breaks its IOD on purpose and the SEG/SR made from it inherit that (the
    # patient and trial modules are copied); the export adds no error to them. (A source
    # that is valid gives a SEG and SR with none: tests/test_deid.py.)
    made = {
        pydicom.dcmread(p).Modality: set(dciodvfy_errors(p)) for p in site.out_dir.glob("*/*.dcm")
    }
    for path in export.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        if ds.Modality in ("SEG", "SR"):
            added = set(dciodvfy_errors(path)) - made[ds.Modality]
            assert added == set(), (path.name, added)
    seg_path = next(p for p in export.rglob("*.dcm") if pydicom.dcmread(p).Modality == "SEG")
    seg = hd.seg.segread(seg_path)
    assert seg.get_source_image_uids()[0][2] == image.SOPInstanceUID  # references resolve
    print(f"sentinels: {len(texts)} text, {len(binary)} binary; {scanned} file scans")


def test_the_table_is_dicom_2026c_and_agrees_with_known_entries() -> None:
    """Spot checks of the transcription against the standard's table."""
    tags, masks = table()
    assert tags[0x00100010] == "Z"  # Patient's Name
    assert tags[0x00100020] == "Z/D"  # Patient ID (2026c)
    assert tags[0x00080050] == "Z"  # Accession Number
    assert tags[0x00081040] == "X"  # Institutional Department Name
    assert tags[0x00080201] == "X"  # Timezone Offset From UTC
    assert tags[0x04000561] == "X"  # Original Attributes Sequence
    assert tags[0x00180010] == "Z/D"
    assert any(g == 0x6000 and e == 0x3000 for g, e, *_ in masks)  # Overlay Data


@pytest.mark.parametrize("retain", [False, True])
def test_dates_follow_the_table_or_the_modified_dates_option(retain: bool) -> None:
    from cxrbatch.config import DeidSettings
    from cxrbatch.deid import Deidentifier

    ds = to_dataset(make_phantom(3, (64, 64)), "3/0")
    ds.StudyDate, ds.AcquisitionDate, ds.InstanceCreationDate = "20260105", "20260105", "20260105"
    clean = Deidentifier(DeidSettings(retain_modified_dates=retain))(ds)
    if retain:
        shifted = dt.datetime.strptime(clean.StudyDate, "%Y%m%d")
        assert clean.StudyDate != "20260105" and shifted.year > 1900
        assert clean.AcquisitionDate not in ("20260105", "19000101")  # shifted as well
    else:
        assert clean.StudyDate == "19000101"  # Z: a dummy
        assert "AcquisitionDate" not in clean  # X/Z in an image that does not require it
        assert "InstanceCreationDate" not in clean  # X/D

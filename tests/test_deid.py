"""`cxrbatch export-deid`: a processed study exported de-identified. No byte of the export
holds the patient's name, ID, birth date, the accession number or the institution; the
SEG and SR still reference the exported image (consistent UID remapping), pass dciodvfy and
read back with highdicom against it; the tables are in the training's formats; the
mapping table is kept apart; dates are dummies, or shifted with the modified-dates option."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from typer.testing import CliRunner

from cxrbatch import pipeline
from cxrbatch.cli import app
from cxrbatch.config import Settings
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.ingest.spool import Spool, Taken
from cxrbatch.site import Site
from cxrbatch.worker import QueueWorker
from cxrbatch_training.data import read_curated
from cxrbatch_training.synthetic import make_phantom, save, to_dataset
from tests.conftest import dciodvfy_errors

NAME, PATIENT_ID, BIRTH = "ROSSI^MARIA^LUISA", "MRN-0042-7731", "19511203"
ACCESSION, INSTITUTION = "ACC77310042", "Ospedale San Gerardo"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def site_with_a_study(
    tmp_path_factory: pytest.TempPathFactory, classified_models: tuple[Settings, pipeline.Models]
) -> tuple[Path, Path]:
    """A site whose one study (a patient with real-looking identifiers) was processed."""
    configured, loaded = classified_models
    root = tmp_path_factory.mktemp("deid")
    ds = to_dataset(make_phantom(7, (256, 256)), "77/0", patient_name=NAME, patient_id=PATIENT_ID)
    ds.PatientBirthDate = BIRTH
    ds.AccessionNumber = ACCESSION
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "Via Pergolesi 33, Monza"
    ds.ReferringPhysicianName = "BIANCHI^CARLO"
    ds.StudyDescription = f"Torace {NAME}"
    source = save(ds, root / "in" / "IM1")
    shutil.copy(source, root / "original.dcm")  # the spool takes the file in (moves it)
    out = root / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'cxrbatch.sqlite'}"
    upgrade(url)
    sessions = session_factory(make_engine(url))
    spool = Spool(out / "_spool", sessions, out / "_quarantine", study_stable_seconds=0.0)
    assert spool.take(source) is Taken.RECEIVED
    QueueWorker(Site(configured, out, url), loaded).run(until_idle=True)
    return out, root


def _export(out: Path, to: Path, *extra: str) -> str:
    result = CliRunner().invoke(app, ["export-deid", "--out", str(out), "--to", str(to), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_export_is_de_identified_and_its_references_resolve(
    site_with_a_study: tuple[Path, Path],
) -> None:
    out, root = site_with_a_study
    export, mapping = root / "export", root / "private" / "mapping.csv"
    printed = _export(out, export, "--mapping", str(mapping))
    assert "exported 1 studies: 1 images and 2 SEG/SR objects" in printed

    files = [p for p in export.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".dcm", ".png", ".csv", ".txt"}
    forbidden = [NAME, "ROSSI", PATIENT_ID, BIRTH, ACCESSION, INSTITUTION, "Pergolesi", "BIANCHI"]
    for path in files:
        data = path.read_bytes()
        for text in forbidden:
            assert text.encode() not in data, (text, path)
            assert text.upper().encode() not in data.upper(), (text, path)

    dicom = {p: pydicom.dcmread(p) for p in export.rglob("*.dcm")}
    by_class: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path, ds in dicom.items():
        by_class.setdefault(ds.Modality, []).append((path, ds))
    ((_, image),) = by_class["CR"]
    ((seg_path, seg),) = by_class["SEG"]
    ((sr_path, sr),) = by_class["SR"]
    original = pydicom.dcmread(root / "original.dcm", stop_before_pixels=True)
    assert image.StudyInstanceUID != original.StudyInstanceUID
    assert image.SOPInstanceUID != original.SOPInstanceUID
    for ds in (image, seg, sr):
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.StudyInstanceUID == image.StudyInstanceUID
        assert ds.PatientID == image.PatientID != PATIENT_ID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.StudyDate == "19000101"  # dummy dates without the option
        assert "StudyDescription" not in ds
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []

    # The SEG still references the exported image, and highdicom reads it against it.
    read = hd.seg.segread(seg_path)
    assert (
        image.StudyInstanceUID,
        image.SeriesInstanceUID,
        image.SOPInstanceUID,
    ) in read.get_source_image_uids()
    assert read.get_pixels_by_source_instance([image.SOPInstanceUID]).max() == 1
    report = hd.sr.srread(sr_path)
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in report.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence
    }
    assert image.SOPInstanceUID in referenced

    # The tables: the curation format (labels empty, for readers), the outcomes, the map.
    with (export / "labels.csv").open() as handle:
        (label_row,) = list(csv.DictReader(handle))
    assert label_row["Image Index"] == f"{image.SOPInstanceUID}.png"
    assert (export / "images" / label_row["Image Index"]).is_file()
    assert label_row["Patient ID"] == image.PatientID and label_row["split"] in (
        "train",
        "val",
        "test",
    )
    assert label_row["Mass"] == "" and label_row["No Finding"] == ""
    with pytest.raises(ValueError, match=r"has no label for Mass, .*fill in 0/1 reader labels"):
        read_curated(export / "labels.csv")
    with (export / "outcomes.csv").open() as handle:
        (outcome_row,) = list(csv.DictReader(handle))
    assert 0.0 <= float(outcome_row["p_Mass"]) <= 1.0 and outcome_row["synthetic_model"] == "True"
    other = next(t for t in ("abnormal", "likely-normal") if t != outcome_row["triage"])
    assert "exported 0 studies" in _export(out, root / "filtered", "--triage", other)
    assert "exported 0 studies" in _export(out, root / "later", "--since", "2999-01-01")
    with mapping.open() as handle:
        (mapped,) = list(csv.DictReader(handle))
    assert mapped["original_patient_id"] == PATIENT_ID
    assert mapped["patient_id"] == image.PatientID
    assert mapped["original_study_instance_uid"] == original.StudyInstanceUID
    assert mapped["study_instance_uid"] == image.StudyInstanceUID


def test_modified_dates_keep_intervals_and_a_key_gives_stable_pseudonyms(
    site_with_a_study: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, root = site_with_a_study
    config = root / "deid.toml"
    config.write_text('[deid]\nretain_modified_dates = true\nkey_env = "CXRBATCH_TEST_DEID_KEY"\n')
    monkeypatch.setenv("CXRBATCH_TEST_DEID_KEY", "a site secret")
    first, second = root / "keyed1", root / "keyed2"
    _export(out, first, "--config", str(config))
    _export(out, second, "--config", str(config))
    images = [
        next(
            ds for ds in (pydicom.dcmread(p) for p in folder.rglob("*.dcm")) if ds.Modality == "CR"
        )
        for folder in (first, second)
    ]
    assert images[0].PatientID == images[1].PatientID  # the same key: the same pseudonym
    assert images[0].StudyDate == images[1].StudyDate
    assert images[0].StudyDate not in ("19000101", "20260101")  # shifted
    assert images[0].DeidentificationMethodCodeSequence[1].CodeValue == "113107"
    assert images[0].LongitudinalTemporalInformationModified == "MODIFIED"
    assert images[0].PatientBirthDate != BIRTH

    unkeyed = root / "unkeyed"
    _export(out, unkeyed)
    other = next(
        ds for ds in (pydicom.dcmread(p) for p in unkeyed.rglob("*.dcm")) if ds.Modality == "CR"
    )
    assert other.PatientID != images[0].PatientID  # a fresh random key


def test_the_mapping_table_may_not_be_inside_the_export(
    site_with_a_study: tuple[Path, Path],
) -> None:
    out, root = site_with_a_study
    export = root / "inside"
    result = CliRunner().invoke(
        app,
        ["export-deid", "--out", str(out), "--to", str(export), "--mapping", str(export / "m.csv")],
    )
    assert result.exit_code == 2 and "kept apart from the export" in result.output

"""End to end through `pipeline.run`: real radiographs and phantoms in, SEG + SR + JSON out.

Every SEG and SR passes dciodvfy with zero errors, reads back with highdicom with the
same masks, and the SR says what the JSON says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from cxrbatch import pipeline
from cxrbatch.config import Settings
from cxrbatch.dicom.discover import discover
from cxrbatch.domain import OutcomeStatus, StudyResult
from cxrbatch_training.synthetic import read_truth, write_studies
from tests.conftest import dciodvfy_errors, real_file


def _run_folder(
    folder: Path, out: Path, settings: Settings, models: pipeline.Models
) -> list[StudyResult]:
    studies, rejected = discover(folder)
    assert rejected == []
    return [pipeline.run(study, models, settings, out) for study in studies]


def _single_file_run(
    tmp_path: Path, name: str, settings: Settings, models: pipeline.Models
) -> StudyResult:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(real_file(name), folder / "IM0001")
    (result,) = _run_folder(folder, tmp_path / "out", settings, models)
    return result


def _sr_groups(path: Path) -> dict[str, dict[str, float]]:
    sr = hd.sr.srread(path)
    groups: dict[str, dict[str, float]] = {}
    for group in sr.content.get_planar_roi_measurement_groups():
        values = {m.name.meaning: float(m.value) for m in group.get_measurements()}
        # "classifier image 1: flagged Mass (SYNTHETIC)": the role and image, then in
        # words what was flagged (what OHIF lists).
        groups[group.tracking_identifier.split(":")[0]] = values
    return groups


def test_real_chest_cr_with_classifier_and_screening(
    tmp_path: Path, classified_models: tuple[Settings, pipeline.Models]
) -> None:
    settings, models = classified_models
    result = _single_file_run(tmp_path, "RG1_UNCR.dcm", settings, models)
    assert result.status is OutcomeStatus.PROCESSED
    assert result.outputs is not None and result.outputs.sr_file is not None
    (image,) = result.images
    seg_path = result.outputs.seg_files[image.instance.sop_instance_uid]
    for path in (seg_path, result.outputs.sr_file):
        assert dciodvfy_errors(path) == [], path.name

    # Two lungs on the patient's correct sides: PatientOrientation L\F puts the patient's
    # right at column 0, so the right lung's centroid lies in the image's left half.
    segmentation = image.segmentation
    columns = segmentation.right_lung.shape[1]
    assert np.nonzero(segmentation.right_lung)[1].mean() < columns / 2
    assert np.nonzero(segmentation.left_lung)[1].mean() > columns / 2
    for side in ("right", "left"):
        assert 0.04 < segmentation.area_fraction(side) < 0.30, side
    assert not (segmentation.right_lung & segmentation.left_lung).any()

    # SEG read back with highdicom equals the written masks, segment 1 = right lung.
    seg = hd.seg.segread(seg_path)
    masks = seg.get_pixels_by_source_instance(
        [image.instance.sop_instance_uid], segment_numbers=[1, 2], combine_segments=False
    )[0]
    assert np.array_equal(masks[..., 0].astype(bool), segmentation.right_lung)
    assert np.array_equal(masks[..., 1].astype(bool), segmentation.left_lung)
    assert seg.get_segment_description(1).segmented_property_type.value == "3341006"
    assert "NOT FOR DIAGNOSTIC USE" in seg.SeriesDescription
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert models.segmenter.model.sha256 in algorithm.AlgorithmParameters

    # SR content matches result.json.
    document = json.loads(result.outputs.json_file.read_text())  # type: ignore[union-attr]
    groups = _sr_groups(result.outputs.sr_file)
    classifier = groups["classifier image 1"]
    screening = groups["screening image 1"]
    json_image = document["images"][0]
    for label, probability in json_image["findings"]["probabilities"].items():
        assert classifier[label.replace("Edema", "Pulmonary edema")] == pytest.approx(
            probability, abs=1e-6
        )
    assert classifier["No Finding score (1 - max p)"] == pytest.approx(
        json_image["findings"]["no_finding_score"], abs=1e-6
    )
    assert screening["No Finding score (1 - max p)"] == pytest.approx(
        json_image["screening"]["no_finding_score"], abs=1e-6
    )
    assert document["triage"] == json_image["screening"]["triage"]
    # Each label with an operating threshold (Mass, in the tiny bundles) gets a call: in the
    # JSON, and in the SR a coded Present/Absent beside the threshold it was made against.
    calls = json_image["findings"]["calls"]
    mass = json_image["findings"]["probabilities"]["Mass"]
    assert calls == {"Mass": "positive" if mass >= 0.5 else "negative"}
    assert classifier["Mass operating threshold"] == 0.5
    sr_calls = {
        evaluation.name.meaning: evaluation.value.meaning
        for group in hd.sr.srread(
            result.outputs.sr_file
        ).content.get_planar_roi_measurement_groups()
        if group.tracking_identifier.startswith("classifier image 1:")
        for evaluation in group.get_qualitative_evaluations()
    }
    assert sr_calls == {"Mass": "Present" if mass >= 0.5 else "Absent"}
    assert document["synthetic_model"] is True
    assert any("SYNTHETIC" in note for note in document["notes"])
    sr = hd.sr.srread(result.outputs.sr_file)
    assert "SYNTHETIC" in sr.SeriesDescription and "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    # The bundle's mask modes were applied: M-15 for the classifier, M-50 for screening.
    assert {m["mask_mode"] for m in document["models"]} == {None, "M-15", "M-50"}

    # Each lung's border, found once for both, is the same polyline in the SR and in the
    # presentation state, closed, and it runs along the mask (a point at a pixel's centre).
    gsps = pydicom.dcmread(result.outputs.presentation_state_files[image.instance.sop_instance_uid])
    drawn = {
        annotation.GraphicLayer: [list(o.GraphicData) for o in annotation.GraphicObjectSequence]
        for annotation in gsps.GraphicAnnotationSequence
        if "GraphicObjectSequence" in annotation
    }
    outlines = {
        group.tracking_identifier.split(" lung outline")[0]: group.roi.value
        for group in sr.content.get_planar_roi_measurement_groups()
        if " lung outline image 1" in group.tracking_identifier
    }
    for side, layer, mask in (
        ("right", "RIGHT LUNG", segmentation.right_lung),
        ("left", "LEFT LUNG", segmentation.left_lung),
    ):
        points = np.asarray(outlines[side], dtype=np.float64)
        assert drawn[layer] == [[float(v) for v in points.ravel()]], side
        assert 20 < len(points) <= 257 and np.array_equal(points[0], points[-1]), side
        columns, rows = (points - 0.5).round().astype(int).T
        assert mask[rows, columns].all(), side


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_real_chest_cr_every_syntax_segmentation_only(
    tmp_path: Path, settings: Settings, models: pipeline.Models, name: str
) -> None:
    result = _single_file_run(tmp_path, name, settings, models)
    assert result.status is OutcomeStatus.PROCESSED
    assert result.outputs is not None and result.outputs.sr_file is not None
    for path in [*result.outputs.seg_files.values(), result.outputs.sr_file]:
        assert dciodvfy_errors(path) == [], path.name
    document = json.loads(result.outputs.json_file.read_text())  # type: ignore[union-attr]
    assert document["segmentation_only"] is True
    assert any("Segmentation-only" in n for n in document["notes"])
    image = result.images[0]
    assert image.segmentation.right_lung.any() and image.segmentation.left_lung.any()
    assert "SEGMENTATION ONLY" in hd.sr.srread(result.outputs.sr_file).SeriesDescription


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("RG3_UNCR.dcm", "EXTREMITY"),
        ("MR_small.dcm", "MR"),
        ("CT_small.dcm", "CT"),
        ("US1_UNCR.dcm", "US"),
    ],
)
def test_real_non_chest_files_are_ineligible(
    tmp_path: Path, settings: Settings, models: pipeline.Models, name: str, reason: str
) -> None:
    result = _single_file_run(tmp_path, name, settings, models)
    assert result.status is OutcomeStatus.INELIGIBLE
    assert result.reason is not None and reason in result.reason
    assert result.outputs is not None
    assert result.outputs.seg_files == {} and result.outputs.sr_file is None
    document = json.loads(result.outputs.json_file.read_text())  # type: ignore[union-attr]
    assert document["status"] == "ineligible" and reason in document["reason"]


def test_phantoms_dice_and_conformance(
    tmp_path: Path, settings: Settings, models: pipeline.Models
) -> None:
    """Six phantoms covering CR/DX, MONOCHROME1/2, 8-16 bits, six transfer syntaxes, one
    mirrored (PatientOrientation R\\F): Dice against the known masks, per patient side."""
    truth_dir = tmp_path / "truth"
    generated = write_studies(tmp_path / "in", 6, seed=5, size=(512, 512), truth_dir=truth_dir)
    results = {
        r.study_instance_uid: r
        for r in _run_folder(tmp_path / "in", tmp_path / "out", settings, models)
    }
    dices = []
    for study in generated:
        result = results[study.study_instance_uid]
        assert result.status is OutcomeStatus.PROCESSED
        right, left = read_truth(study.truth_path)  # type: ignore[arg-type]
        seg = result.images[0].segmentation
        for predicted, known in ((seg.right_lung, right), (seg.left_lung, left)):
            dices.append(2 * (predicted & known).sum() / (predicted.sum() + known.sum()))
        assert result.outputs is not None
        for path in [*result.outputs.seg_files.values(), result.outputs.sr_file]:
            assert dciodvfy_errors(path) == [], path  # type: ignore[arg-type]
    print(f"phantom Dice per lung: mean {np.mean(dices):.3f}, min {np.min(dices):.3f}")
    assert min(dices) > 0.85
    assert np.mean(dices) > 0.93


def test_temporaries_of_a_killed_writer_are_removed(
    tmp_path: Path, settings: Settings, models: pipeline.Models
) -> None:
    folder = tmp_path / "in"
    generated = write_studies(folder, 1, seed=8, size=(256, 256))
    out = tmp_path / "out"
    study_folder = out / generated[0].study_instance_uid
    study_folder.mkdir(parents=True)
    (study_folder / ".sr.dcm.abc123.tmp").write_bytes(b"half a file")
    _run_folder(folder, out, settings, models)
    assert list(study_folder.glob(".*.tmp")) == []
    assert (study_folder / "sr.dcm").is_file()

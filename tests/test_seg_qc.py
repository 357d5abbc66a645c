"""The segmentation quality gate: a lung that cannot be found makes the study
needs-review, never likely-normal, and every output says why.

The checks themselves are tested on masks drawn here; the end-to-end cases run the real
LiteMedSAM on hard phantoms with a whited-out hemithorax (a massive effusion) and with
one lung cut off the film, through `pipeline.run` with an M-15 classifier and an M-50
screening bundle, into JSON, SR, SEG, key image, the results database, `cxrbatch
results --triage` and the worklist.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from bench.seg_sets import lung_lost_cases
from cxrbatch import pipeline
from cxrbatch.cli import app
from cxrbatch.config import Settings
from cxrbatch.db import models as tables
from cxrbatch.db import reads, repository
from cxrbatch.db.session import make_engine, session_factory, upgrade
from cxrbatch.dicom import codes
from cxrbatch.dicom.discover import discover
from cxrbatch.domain import OutcomeStatus, StudyResult, Triage
from cxrbatch.models import qc
from cxrbatch_training.synthetic import Phantom, make_hard_phantom, save, to_dataset
from tests.conftest import dciodvfy_errors

SIZE = 256
BODY = (16.0, 16.0, 240.0, 240.0)
MIDLINE = 128.0


def _lung(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(mask, (round(cx), round(cy)), (round(ax), round(ay)), 0, 0, 360, 1, -1)
    return mask.astype(bool)


def _image(*lungs: np.ndarray) -> np.ndarray:
    image = np.full((SIZE, SIZE), 170, np.uint8)
    for lung in lungs:
        image[lung] = 60
    return image


def test_plausible_lungs_pass_and_every_check_can_fail() -> None:
    left, right = _lung(80, 110, 38, 75), _lung(176, 115, 36, 72)
    verdict = qc.assess(
        _image(left, right), (left, right), BODY, MIDLINE, (left, right), (0.9, 0.9), True
    )
    assert verdict.passed and verdict.reason is None, verdict.failures
    assert verdict.right.measures["pass_agreement"] == 1.0

    empty = np.zeros_like(left)
    lost = qc.assess(_image(left), (left, empty), BODY, MIDLINE, None, (0.9, 0.2), True)
    assert not lost.passed and lost.right.passed and not lost.left.passed
    assert lost.reason is not None and lost.reason.startswith("segmentation failed QC: left lung")
    assert "area fraction 0%" in lost.reason and "area ratio" in lost.reason

    # Across the midline; over a bright (whited-out) region; a first pass it disagrees with.
    across = _lung(150, 110, 30, 70)
    assert "lateral offset" in " ".join(
        qc.assess(
            _image(left, across), (left, across), BODY, MIDLINE, None, (0.9, 0.9), True
        ).left.failures
    )
    white = qc.assess(_image(left), (left, right), BODY, MIDLINE, None, (0.9, 0.9), True)
    contrast = [f for f in white.left.failures if f.startswith("contrast")]
    assert contrast, white.left.measures
    # What it may mean, for the reader of the reason.
    assert "opaque or whited-out lung" in contrast[0], contrast
    assert "opaque" not in " ".join(f for f in white.right.failures), white.right.failures
    # Two small, thin strips over nothing darker (no chest): the failures are named, but
    # what a failed check would mean of a lung is not said of them.
    strips = _lung(60, 128, 6, 40), _lung(196, 128, 6, 40)
    none = qc.assess(_image(), strips, BODY, MIDLINE, None, (0.9, 0.9), True)
    assert none.reason is not None and qc.NOT_A_CHEST in none.reason, none.reason
    assert "contrast" in none.reason and "whited-out" not in none.reason, none.reason
    moved = _lung(90, 60, 30, 30)
    disagree = qc.assess(
        _image(left, right), (left, right), BODY, MIDLINE, (moved, right), (0.9, 0.9), True
    )
    assert any(f.startswith("pass agreement") for f in disagree.right.failures)
    # The patient's sides follow the image orientation.
    mirrored = qc.assess(_image(left), (left, empty), BODY, MIDLINE, None, (0.9, 0.2), False)
    assert mirrored.left.passed and not mirrored.right.passed


def _write(phantom: Phantom, folder: Path, seed: str) -> Path:
    ds = to_dataset(phantom, seed)
    if phantom.flipped:
        ds.PatientOrientation = ["R", "F"]
    return save(ds, folder / f"{seed}.dcm")


@pytest.fixture(scope="module")
def failed_qc_results(
    tmp_path_factory: pytest.TempPathFactory, classified_models: tuple[Settings, pipeline.Models]
) -> tuple[list[StudyResult], Path]:
    settings, models = classified_models
    settings = settings.model_copy(
        update={"output": settings.output.model_copy(update={"key_image": True})}
    )
    root = tmp_path_factory.mktemp("qc")
    whiteout = make_hard_phantom(7, (512, 512), white_out="left")
    assert not whiteout.left_lung.any() and "left hemithorax whited out" in whiteout.features
    cutoff = next(c for c in lung_lost_cases(4, 512, seed=3) if c.name.startswith("cutoff"))
    cut = Phantom(
        cutoff.image.pixels.astype(np.float32) / 255,
        cutoff.right_lung,
        cutoff.left_lung,
        {},
        not cutoff.image.image_left_is_patient_right,
    )
    _write(whiteout, root / "in" / "a", "qc-whiteout")
    _write(cut, root / "in" / "b", "qc-cutoff")
    studies, rejected = discover(root / "in")
    assert rejected == [] and len(studies) == 2
    return [pipeline.run(s, models, settings, root / "out") for s in studies], root


@pytest.mark.slow
def test_a_lung_that_cannot_be_found_needs_review_in_every_output(
    failed_qc_results: tuple[list[StudyResult], Path],
) -> None:
    results, _ = failed_qc_results
    for result in results:
        assert result.status is OutcomeStatus.PROCESSED
        assert result.triage is Triage.NEEDS_REVIEW, result.reason
        (image,) = result.images
        assert image.qc_reason and image.qc_reason.startswith("segmentation failed QC: ")
        assert result.reason == image.qc_reason
        # The M-15 classifier and the M-50 screening model never saw the failed masks.
        assert image.findings is None and image.screening is None
        assert not result.segmentation_only

        assert result.outputs is not None and result.outputs.json_file is not None
        document = json.loads(result.outputs.json_file.read_text())
        assert document["triage"] == "needs-review" and document["needs_review"] is True
        assert document["segmentation_only"] is False
        (entry,) = document["images"]
        assert entry["triage"] == "needs-review"
        assert entry["segmentation_qc"]["passed"] is False
        assert entry["segmentation_qc"]["reason"] == image.qc_reason
        assert any("NEEDS REVIEW" in note for note in document["notes"])

        sr_path = result.outputs.sr_file
        assert sr_path is not None
        sr = hd.sr.srread(sr_path)
        assert "NEEDS REVIEW" in sr.SeriesDescription
        texts = [
            item.TextValue
            for item in _walk(dcmread(sr_path).ContentSequence)
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "LUNGSEGQC"
        ]
        assert texts == [f"image 1 ({image.instance.sop_instance_uid}): {image.qc_reason}"]
        coded = {
            (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue)
            for item in _walk(dcmread(sr_path).ContentSequence)
            if item.ValueType == "CODE"
        }
        assert (codes.SEGMENTATION_QC.value, codes.QC_VALUES[False].value) in coded
        assert (codes.TRIAGE_CATEGORY.value, codes.TRIAGE_VALUES["needs-review"].value) in coded
        assert (
            codes.TRIAGE_CATEGORY.value,
            codes.TRIAGE_VALUES["likely-normal"].value,
        ) not in coded
        for path in result.outputs.dicom_files():
            assert dciodvfy_errors(path) == [], path.name
        seg = hd.seg.segread(result.outputs.seg_files[image.instance.sop_instance_uid])
        assert seg.number_of_segments == 2
        assert seg.ContentDescription.startswith("NEEDS REVIEW: lung masks failed QC")


@pytest.mark.slow
def test_needs_review_is_recorded_listed_and_ranked_with_abnormal(
    failed_qc_results: tuple[list[StudyResult], Path],
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from sqlalchemy import select

    results, _ = failed_qc_results
    url = f"sqlite:///{tmp_path / 'results.db'}"
    upgrade(url)
    engine = make_engine(url)
    # A processed study has an image (StudyResult refuses one without): the first
    # study's image with masks that passed QC, so it adds no needs-review image row.
    image = results[0].images[0]
    passed = replace(image, segmentation=replace(image.segmentation, qc=None))
    normal = replace(
        results[0],
        study_instance_uid="1.2.3.4.normal",
        triage=Triage.LIKELY_NORMAL,
        images=(passed,),
        reason=None,
        input_fingerprint="n",
    )
    abnormal = replace(
        normal,
        study_instance_uid="1.2.3.4.abnormal",
        triage=Triage.ABNORMAL,
        no_finding_score=0.3,
        input_fingerprint="a",
    )
    with session_factory(engine)() as session:
        for result in (normal, *results, abnormal):
            repository.record_study(session, result)
        session.commit()
    with session_factory(engine)() as session:
        order = [o.study.study_instance_uid for o in reads.worklist(session)]
        rows = session.scalars(select(tables.Image)).all()
        image_reasons = [r.reason for r in rows if r.triage == "needs-review"]
    engine.dispose()
    assert order[-1] == "1.2.3.4.normal"
    assert set(order[:3]) == {"1.2.3.4.abnormal", *(r.study_instance_uid for r in results)}
    assert len(image_reasons) == 2
    assert all(r and r.startswith("segmentation failed QC: ") for r in image_reasons)

    listed = CliRunner().invoke(
        app, ["results", "--db", url, "--triage", "needs-review", "--format", "json"]
    )
    assert listed.exit_code == 0, listed.output
    rows_out = json.loads(listed.stdout)
    assert {r["study_instance_uid"] for r in rows_out} == {r.study_instance_uid for r in results}
    assert all(r["triage"] == "needs-review" and "failed QC" in r["reason"] for r in rows_out)


def _walk(items):  # type: ignore[no-untyped-def]
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))

"""Domain objects are valid once built: contradictions are refused where they are made."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cxrbatch.domain import (
    DecodedImage,
    FindingMap,
    Findings,
    ImageFailure,
    InstanceHeader,
    LungSegmentation,
    ModelRef,
    OutcomeStatus,
    OutputFiles,
    RejectedFile,
    ReportedFinding,
    Skipped,
    StudyResult,
    Triage,
    Withdrawal,
)


def _result(status: OutcomeStatus, **fields: object) -> StudyResult:
    values: dict[str, object] = {
        "study_instance_uid": "1.2.3",
        "status": status,
        "reason": None,
        "images": (),
        "skipped": (),
        "failures": (),
        "triage": None,
        "no_finding_score": None,
        "models": (),
    }
    values.update(fields)
    return StudyResult(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "fields", "why"),
    [
        (OutcomeStatus.PROCESSED, {}, "processed with no image processed"),
        (OutcomeStatus.FAILED, {}, "failed without a reason"),
        (OutcomeStatus.INELIGIBLE, {"reason": ""}, "ineligible without a reason"),
        (
            OutcomeStatus.INELIGIBLE,
            {"reason": "a lateral", "triage": Triage.LIKELY_NORMAL},
            "with a triage",
        ),
        (OutcomeStatus.FAILED, {"reason": "x", "no_finding_score": 0.9}, "with a triage"),
        (OutcomeStatus.FAILED, {"reason": "x", "study_instance_uid": ""}, "no StudyInstanceUID"),
    ],
)
def test_a_contradictory_study_result_is_refused(
    status: OutcomeStatus, fields: dict[str, object], why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        _result(status, **fields)


def test_the_results_the_pipeline_makes_are_valid() -> None:
    assert _result(OutcomeStatus.FAILED, reason="decode failed").status == "failed"
    assert _result(OutcomeStatus.INELIGIBLE, reason="no frontal chest radiograph").reason
    with pytest.raises(ValueError, match=r"not a valid OutcomeStatus"):
        _result("finished", reason="x")  # type: ignore[arg-type]


def test_outputs_name_the_identity_of_every_dicom_object_they_list(tmp_path: Path) -> None:
    """The record step queues what the writers built without reading the files back: an
    output whose identity the writer did not give is refused where it is listed."""
    sr = tmp_path / "sr.dcm"
    identity = {"study": "1.2", "series": "1.2.3", "sop_class": "1.2.4", "sop_instance": "1.2.5"}
    with pytest.raises(ValueError, match=r"without their identity: sr\.dcm"):
        OutputFiles({}, sr, None)
    made = OutputFiles({}, sr, None, identities={"sr.dcm": identity})
    moved = made.moved_to(tmp_path / "published")
    assert moved.sr_file == tmp_path / "published" / "sr.dcm"
    assert moved.identities == made.identities


def test_a_withdrawal_withdraws_something_somewhere_beside_new_outputs(tmp_path: Path) -> None:
    note = tmp_path / "rejection_1.dcm"
    with pytest.raises(ValueError, match="withdraws nothing"):
        Withdrawal(note, (), frozenset({"pacs"}))
    withdrawal = Withdrawal(note, ("1.2.5",), frozenset({"pacs"}))
    with pytest.raises(ValueError, match="without the outputs"):
        OutputFiles({}, None, None, withdrawal=withdrawal)
    made = OutputFiles(
        {},
        tmp_path / "sr.dcm",
        None,
        identities={"sr.dcm": {"sop_instance": "1.2.6"}},
        withdrawal=withdrawal,
    )
    assert made.moved_to(tmp_path / "out").withdrawal == Withdrawal(
        tmp_path / "out" / "rejection_1.dcm", ("1.2.5",), frozenset({"pacs"})
    )


@pytest.mark.parametrize(
    ("finding", "why"),
    [
        (("Mass", 1.2, 0.5, True), "probability 1.2 outside 0-1"),
        (("Mass", 0.4, -0.1, False), r"threshold -0\.1 outside 0-1"),
        (("Mass", 0.4, None, False), "a call without a threshold"),
    ],
)
def test_a_reported_finding_is_a_probability_with_its_threshold(
    finding: tuple[str, float, float | None, bool | None], why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        ReportedFinding(*finding)
    assert ReportedFinding("Mass", 0.4, None, None).positive is None


def _header() -> InstanceHeader:
    return InstanceHeader(
        Path("a.dcm"), "0" * 64, "1.2.3.4", "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "1.2.3.5",
        "CR", "CHEST", "PA", "1.2.840.10008.1.2.1",
    )  # fmt: skip


MODEL = ModelRef("tiny", "1", "ab" * 32, mask_mode="M-50", role="screening")


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (lambda: ModelRef("tiny", "1", ""), "name, version and hash"),
        (lambda: ModelRef("tiny", "1", "ab", role="boss"), "unknown role 'boss'"),
        (lambda: Findings(MODEL, {"Mass": 1.5}, 0.0), r"outside 0-1: Mass 1\.5"),
        (lambda: Findings(MODEL, {"Mass": 0.2, "Edema": 0.7}, 0.8), r"is not 1 - max p"),
        (
            lambda: Findings(MODEL, {"Mass": 0.2}, 0.8, Triage.LIKELY_NORMAL),
            "a triage without its threshold",
        ),
        (
            lambda: FindingMap("Mass", 0.3, 0.5, MODEL, np.zeros((4, 4)), (0, 0, 4, 4)),
            "below its threshold",
        ),
        (
            lambda: LungSegmentation(np.zeros((4, 4), bool), np.zeros((4, 5), bool), {}, {}),
            "expected one 2-D shape",
        ),
        (
            lambda: DecodedImage(_header(), np.zeros((4, 4), np.float32), True, "x"),
            "expected 2-D uint8 pixels",
        ),
        (lambda: Skipped(_header(), " "), "no reason given"),
        (lambda: ImageFailure(_header(), ""), "no reason given"),
        (lambda: RejectedFile(Path("x.dcm"), ""), "no reason given"),
    ],
)
def test_the_stage_objects_refuse_contradictions_where_they_are_built(
    build: Callable[[], object], why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        build()


def test_valid_stage_objects_are_built_as_given() -> None:
    findings = Findings(MODEL, {"Mass": 0.2, "Edema": 0.7}, 0.3, Triage.ABNORMAL, 0.5)
    assert findings.no_finding_score == pytest.approx(0.3) and findings.triage is Triage.ABNORMAL
    image = DecodedImage(_header(), np.zeros((4, 4), np.uint8), True, "PatientOrientation")
    assert image.for_segmentation.shape == (4, 4)
    assert Skipped(_header(), "a lateral view").status is OutcomeStatus.INELIGIBLE

"""A study result is valid once built: contradictions are refused where it is made."""

from __future__ import annotations

import pytest

from cxrbatch.domain import OutcomeStatus, StudyResult, Triage


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

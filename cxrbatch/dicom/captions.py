"""What the pictures say in words: the headline and the lines that the key image burns in
and the presentation state's text layer carries, from one image's result.

One place, so that a key image, a presentation state and a thumbnail never disagree about
the triage, the calls or the warnings. ASCII only: a presentation state's text is in the
default character repertoire.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrbatch.dicom.seg import NOT_FOR_DIAGNOSIS
from cxrbatch.domain import Findings, ImageResult, ModelRef, Triage

SYNTHETIC_WARNING = "MODEL TRAINED ON SYNTHETIC DATA - scores are not clinically meaningful"


@dataclass(frozen=True)
class Line:
    text: str
    warning: bool = False


@dataclass(frozen=True)
class Caption:
    """`headline`: a few words legible on a PACS thumbnail; `lines`: the details."""

    headline: str
    headline_warning: bool
    lines: tuple[Line, ...]


def called(findings: Findings) -> list[str]:
    """The labels at or above their thresholds, most probable first."""
    return sorted(
        (label for label, positive in findings.calls.items() if positive),
        key=lambda label: -findings.probabilities[label],
    )


def against_thresholds(findings: Findings, limit: int | None = None) -> str:
    """`Mass 0.72 >= 0.50, Nodule 0.31 < 0.40, ...`: the labels with a threshold, called
    ones first, then by probability; labels without one by probability alone."""
    probabilities = findings.probabilities
    order = sorted(
        probabilities,
        key=lambda label: (not findings.calls.get(label, False), -probabilities[label]),
    )
    parts = []
    for label in order[:limit]:
        threshold = findings.thresholds.get(label)
        if threshold is None:
            parts.append(f"{label} {probabilities[label]:.2f}")
        else:
            sign = ">=" if probabilities[label] >= threshold else "<"
            parts.append(f"{label} {probabilities[label]:.2f} {sign} {threshold:.2f}")
    return ", ".join(parts)


def _headline(item: ImageResult) -> tuple[str, bool]:
    if item.qc_reason is not None:
        return "NEEDS REVIEW", True
    triage = item.triage
    if triage is Triage.ABNORMAL:
        return "ABNORMAL", True
    if triage is Triage.NEEDS_REVIEW:
        return "NEEDS REVIEW", True
    if item.findings is not None:
        positive = called(item.findings)
        if positive:
            return "FLAGGED: " + ", ".join(positive[:2]).upper(), True
        if triage is Triage.LIKELY_NORMAL:
            return "LIKELY NORMAL", False
        return "NOTHING FLAGGED", False
    if triage is Triage.LIKELY_NORMAL:
        return "LIKELY NORMAL", False
    return "LUNG MASKS ONLY", False


def caption(item: ImageResult, models: tuple[ModelRef, ...], limit: int | None = None) -> Caption:
    """The words for one image; `limit`: at most this many labels on the findings line."""
    lines = [Line(f"cxrbatch algorithm output - {NOT_FOR_DIAGNOSIS}", True)]
    if any(m.synthetic_training_data for m in models):
        lines.append(Line(SYNTHETIC_WARNING, True))
    screening = item.screening
    if screening is not None and screening.triage is not None:
        lines.append(
            Line(
                f"Screening triage: {screening.triage.value.upper()} (No Finding "
                f"{screening.no_finding_score:.2f}, threshold {screening.threshold:.2f})"
            )
        )
    qc = item.segmentation.qc
    if qc is not None and not qc.passed:
        lines.append(Line("NEEDS REVIEW: segmentation failed QC (masked models not run):", True))
        lines.extend(Line("  " + failure, True) for failure in qc.failures)
    if item.findings is not None:
        lines.append(Line("Findings: " + against_thresholds(item.findings, limit)))
        lines.append(Line(f"No Finding score {item.findings.no_finding_score:.2f}"))
    if item.findings is None and screening is None and item.qc_reason is None:
        lines.append(Line("Segmentation only: no classifier configured"))
    headline, warning = _headline(item)
    return Caption(headline, warning, tuple(lines))

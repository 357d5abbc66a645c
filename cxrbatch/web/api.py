"""A read-only JSON API for a RIS, a dashboard or a script (OpenAPI at /openapi.json).

    GET /api/v1/studies          the worklist: its filters, sorts and keyset pages
    GET /api/v1/studies/{uid}    one study: images, findings with thresholds and calls,
                                 QC, models, deliveries, earlier outcomes, file links

The same users, audit trail and rules as the pages: patient name, ID and accession number
only for an authenticated user (an anonymous request on loopback gets them as null);
every answer says whether its scores come from a model trained on synthetic data, and
that nothing here is for diagnostic use.
"""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations.

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from cxrbatch.db import models as tables
from cxrbatch.db import reads as rows
from cxrbatch.domain import FINDING_LABELS
from cxrbatch.web.auth import User
from cxrbatch.web.deps import (
    Filters,
    Reading,
    State,
    Viewer,
    audited,
    page_of,
    study_view,
    synthetic_scores,
)
from cxrbatch.web.files import DOWNLOAD_GROUPS

router = APIRouter(prefix="/api/v1", tags=["api"])

NOT_FOR_DIAGNOSIS = (
    "Produced by an algorithm (cxrbatch); not for diagnostic use: a radiologist reads the film."
)
SYNTHETIC = "Scores come from a model trained on synthetic data: they mean nothing clinically."
MAX_PAGE = 500


class Study(BaseModel):
    """A study's current outcome, as a worklist row."""

    study_instance_uid: str
    study_number: int = Field(description="The study's row number here (no patient data).")
    accession_number: str | None = Field(description="Null for an anonymous request.")
    patient_id: str | None = Field(description="Null for an anonymous request.")
    patient_name: str | None = Field(description="Null for an anonymous request.")
    study_date: dt.date | None
    modality: str | None
    status: str = Field(description="processed | ineligible | failed")
    triage: str | None = Field(description="abnormal | needs-review | likely-normal | null")
    reason: str | None
    no_finding_score: float | None
    screening_no_finding_score: float | None
    probabilities: dict[str, float] = Field(description="Study-level probability per label.")
    decided_by: str | None = Field(description="The model whose scores set the triage.")
    synthetic_model: bool = Field(description="Scored by a model trained on synthetic data.")
    recorded_at: dt.datetime
    href: str = Field(description="This study in the API.")
    page: str = Field(description="This study's page in the web app.")


class StudyPage(BaseModel):
    studies: list[Study]
    total: int = Field(description="Studies that match, counted up to `count_cap`.")
    more_than_total: bool = Field(description="More than `count_cap` match.")
    count_cap: int
    next: str | None = Field(description="Cursor of the next page (`after=`), null at the end.")
    previous: str | None = Field(description="Cursor of the previous page (`before=`).")
    notice: str
    synthetic_notice: str | None


class Finding(BaseModel):
    role: str = Field(description="classifier | screening | shadow | shadow-screening")
    label: str
    probability: float
    threshold: float | None
    positive: bool | None


class Image(BaseModel):
    sop_instance_uid: str
    series_instance_uid: str
    modality: str | None
    view_position: str | None
    status: str
    reason: str | None = Field(description="Why it was skipped, failed or needs review.")
    triage: str | None
    side_source: str | None = Field(description="How right and left were decided.")
    right_lung_fraction: float | None
    left_lung_fraction: float | None
    no_finding_score: float | None
    screening_no_finding_score: float | None
    findings: list[Finding]


class Delivery(BaseModel):
    destination: str
    transport: str
    status: str
    attempts: int
    last_error: str | None
    updated_at: dt.datetime | None


class EarlierOutcome(BaseModel):
    status: str
    triage: str | None
    reason: str | None
    recorded_at: dt.datetime
    superseded_at: dt.datetime | None


class StudyDetail(Study):
    thresholds: dict[str, float] = Field(description="The classifier's operating points.")
    models: list[dict[str, Any]] = Field(description="Name, version and weight hash of each.")
    processed_by: str | None
    images: list[Image]
    deliveries: list[Delivery]
    history: list[EarlierOutcome] = Field(description="Superseded outcomes, newest first.")
    files: dict[str, str] = Field(
        description="Downloads: `json` for everyone; DICOM files (SR, SEG, key images, "
        "presentation states) for signed-in users only."
    )
    notice: str
    synthetic_notice: str | None


def _study(row: rows.OutcomeView, who: User) -> dict[str, Any]:
    uid = row.study_instance_uid
    return {
        "study_instance_uid": uid,
        "study_number": row.study_number,
        "accession_number": row.accession_number if who.authenticated else None,
        "patient_id": row.patient_id if who.authenticated else None,
        "patient_name": row.patient_name if who.authenticated else None,
        "study_date": row.study_date,
        "modality": row.modality,
        "status": row.status,
        "triage": row.triage,
        "reason": row.reason,
        "no_finding_score": row.no_finding_score,
        "screening_no_finding_score": row.screening_no_finding_score,
        "probabilities": {
            k: row.probabilities[k] for k in FINDING_LABELS if k in row.probabilities
        },
        "decided_by": row.decided_by,
        "synthetic_model": synthetic_scores(row),
        "recorded_at": row.recorded_at,
        "href": f"/api/v1/studies/{uid}",
        "page": f"/studies/{uid}",
    }


@router.get("/studies", response_model=StudyPage)
def studies(
    web: State,
    who: Viewer,
    where: Filters,
    session: Reading,
    sort: Literal["screening", "no_finding", "recorded", "study_date"] = "screening",
    size: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    after: Annotated[str | None, Query(max_length=400)] = None,
    before: Annotated[str | None, Query(max_length=400)] = None,
) -> dict[str, Any]:
    """The worklist: filters `from`, `to` (recorded, dates), `triage`, `status`, `label`
    with `min_probability`; `sort` screening | no_finding | recorded | study_date; pages
    of `size` read after (or before) a cursor."""
    shown = page_of(session, where, sort, size, after, before)
    audited(web, who, "api_worklist_viewed", None, f"{len(shown.rows)} rows")
    synthetic = any(synthetic_scores(r) for r in shown.rows)
    return {
        "studies": [_study(r, who) for r in shown.rows],
        "total": shown.total,
        "more_than_total": shown.more,
        "count_cap": rows.COUNT_CAP,
        "next": shown.next_cursor,
        "previous": shown.previous_cursor,
        "notice": NOT_FOR_DIAGNOSIS,
        "synthetic_notice": SYNTHETIC if synthetic else None,
    }


def _files(outcome: tables.Outcome, uid: str) -> dict[str, str]:
    outputs = outcome.outputs or {}
    found = {kind: f"/studies/{uid}/files/{kind}" for kind in ("json", "sr") if outputs.get(kind)}
    for prefix, group in DOWNLOAD_GROUPS.items():
        for sop in outputs.get(group) or {}:
            found[f"{prefix}-{sop}"] = f"/studies/{uid}/files/{prefix}-{sop}"
    return found


@router.get("/studies/{uid}", response_model=StudyDetail)
def study(uid: str, web: State, who: Viewer, session: Reading) -> dict[str, Any]:
    """One study's current outcome in full, its deliveries and its earlier outcomes."""
    view = study_view(session, uid)
    current = view.current
    audited(web, who, "api_study_viewed", uid)
    synthetic = synthetic_scores(view.row)
    return {
        **_study(view.row, who),
        "thresholds": view.row.thresholds,
        "models": view.row.models,
        "processed_by": current.processed_by,
        "images": [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "series_instance_uid": i.series_instance_uid,
                "modality": i.modality,
                "view_position": i.view_position,
                "status": i.status,
                "reason": i.reason,
                "triage": i.triage,
                "side_source": i.side_source,
                "right_lung_fraction": i.right_lung_fraction,
                "left_lung_fraction": i.left_lung_fraction,
                "no_finding_score": i.no_finding_score,
                "screening_no_finding_score": i.screening_no_finding_score,
                "findings": [
                    {
                        "role": f.role,
                        "label": f.label,
                        "probability": f.probability,
                        "threshold": f.threshold,
                        "positive": f.positive,
                    }
                    for f in i.findings
                ],
            }
            for i in current.images
        ],
        "deliveries": [
            {
                "destination": d.destination,
                "transport": d.transport,
                "status": d.status,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "updated_at": d.updated_at,
            }
            for d in view.deliveries
        ],
        "history": [
            {
                "status": o.status,
                "triage": o.triage,
                "reason": o.reason,
                "recorded_at": o.created_at,
                "superseded_at": o.superseded_at,
            }
            for o in view.history
        ],
        "files": _files(current, uid),
        "notice": NOT_FOR_DIAGNOSIS,
        "synthetic_notice": SYNTHETIC if synthetic else None,
    }

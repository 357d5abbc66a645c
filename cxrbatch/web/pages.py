"""The web app's pages: the worklist (and its CSV), a study, operations."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.

import csv
import datetime as dt
import io
import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from cxrbatch.db import reads as rows
from cxrbatch.domain import FINDING_LABELS
from cxrbatch.web.auth import User
from cxrbatch.web.deps import (
    Filters,
    Reading,
    State,
    Viewer,
    WebState,
    audited,
    page_of,
    study_view,
    synthetic_scores,
)

router = APIRouter()


def _page(web: WebState, request: Request, name: str, who: User, **context: Any) -> HTMLResponse:
    return web.templates.TemplateResponse(
        request, name, {"user": who, "now": dt.datetime.now(dt.UTC), **context}
    )


def _cells(values: list[Any]) -> list[Any]:
    """CSV cells safe to open in a spreadsheet: text from headers that starts like a formula
    (= + - @, tab, carriage return) is prefixed with an apostrophe (OWASP CSV injection)."""
    return [
        "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v
        for v in values
    ]


@router.get("/", response_class=HTMLResponse)
def worklist(
    request: Request,
    web: State,
    who: Viewer,
    where: Filters,
    session: Reading,
    sort: str = "screening",
    after: Annotated[str | None, Query(max_length=400)] = None,
    before: Annotated[str | None, Query(max_length=400)] = None,
) -> HTMLResponse:
    shown = page_of(session, where, sort, web.site.settings.web.page_size, after, before)
    query = {k: v for k, v in request.query_params.items() if k not in ("after", "before")}
    audited(web, who, "worklist_viewed", None, f"{len(shown.rows)} rows")
    return _page(
        web, request, "worklist.html", who,
        rows=shown.rows, total=shown.total, more=shown.more,
        next_cursor=shown.next_cursor, previous_cursor=shown.previous_cursor,
        first=after is None and before is None, query=query, sort=sort,
        where=where, thresholds=web.thresholds,
        synthetic=any(synthetic_scores(r) for r in shown.rows),
    )  # fmt: skip


@router.get("/worklist.csv")
def worklist_csv(
    web: State, who: Viewer, where: Filters, session: Reading, sort: str = "screening"
) -> Response:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    identity = ["accession_number", "patient_id", "patient_name"] if who.authenticated else []
    writer.writerow(
        ["study_instance_uid", *identity, "study_date", "modality", "status", "triage",
         "no_finding_score", "screening_no_finding_score", *[f"p_{x}" for x in FINDING_LABELS],
         "reason", "synthetic_model"]
    )  # fmt: skip
    cursor, exported = None, 0
    while True:
        chunk = page_of(session, where, sort, 1000, after=cursor)
        for r in chunk.rows:
            person = [r.accession_number, r.patient_id, r.patient_name]
            writer.writerow(
                _cells(
                    [r.study_instance_uid, *(person if who.authenticated else []),
                     r.study_date, r.modality, r.status, r.triage, r.no_finding_score,
                     r.screening_no_finding_score,
                     *[r.probabilities.get(x) for x in FINDING_LABELS], r.reason,
                     r.synthetic_model]
                )
            )  # fmt: skip
        exported += len(chunk.rows)
        if chunk.next_cursor is None:
            break
        cursor = chunk.next_cursor
    audited(web, who, "worklist_exported", None, f"{exported} studies")
    return Response(
        buffer.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="cxrbatch-worklist.csv"'},
    )


@router.get("/studies/{uid}", response_class=HTMLResponse)
def study(
    request: Request, uid: str, web: State, who: Viewer, session: Reading, maps: bool = False
) -> HTMLResponse:
    view = study_view(session, uid)
    audited(web, who, "study_viewed", uid)
    return _page(
        web, request, "study.html", who, view=view, row=view.row, thresholds=web.thresholds,
        synthetic=synthetic_scores(view.row), show_maps=maps,
    )  # fmt: skip


@router.get("/operations", response_class=HTMLResponse)
def operations(request: Request, web: State, who: Viewer, session: Reading) -> HTMLResponse:
    figures = rows.operations(session, dt.datetime.now(dt.UTC))
    disk = []
    for name, folder in (("output", web.site.out_dir), ("spool", web.site.spool_dir)):
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        usage = shutil.disk_usage(probe)
        disk.append((name, usage.free / 2**20, usage.total / 2**20))
    return _page(
        web, request, "operations.html", who, figures=figures, disk=disk,
        watermark=web.site.settings.queue.min_free_disk_mb, synthetic=False,
    )  # fmt: skip

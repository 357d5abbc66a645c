"""What the web app's routes depend on, as FastAPI dependencies: the app's state (the
site, its read-only results database, the audit database, the thresholds of the
configured bundles), the user, a reading session, the audit trail and the worklist's
filters. Tests replace any of them with `app.dependency_overrides`.
"""

# No `from __future__ import annotations`: FastAPI reads these functions' annotations.

import base64
import binascii
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry

from cxrbatch.db import Session, audit
from cxrbatch.db import reads as rows
from cxrbatch.db.session import Database
from cxrbatch.domain import OutcomeStatus, Triage
from cxrbatch.errors import CxrBatchError
from cxrbatch.site import Site
from cxrbatch.web.auth import Authenticator, User


@dataclass(frozen=True)
class Thresholds:
    """A configured bundle's operating points, matched to outcomes by the weights' hash."""

    labels: dict[str, float]
    no_finding: float | None


@dataclass(frozen=True)
class WebState:
    """What `create_app` sets up once; the routes reach it through `state`."""

    site: Site
    results: Database  # read-only
    audit: Database  # audit events only
    authenticator: Authenticator
    thresholds: dict[str, Thresholds]
    templates: Jinja2Templates
    cache_dir: Path
    registry: CollectorRegistry


def state(request: Request) -> WebState:
    found: WebState = request.app.state.cxrbatch
    return found


State = Annotated[WebState, Depends(state)]


class Utf8Basic(HTTPBasic):
    """FastAPI's HTTP Basic scheme (it documents the scheme in the OpenAPI schema), reading
    the credentials as UTF-8 (RFC 7617's charset="UTF-8", what browsers send) where
    HTTPBasic reads ASCII only, which would lock out a user named Müller. Malformed
    credentials are no credentials: `user` then answers 401, or lets an anonymous request
    through where no authentication is configured."""

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:  # type: ignore[override]
        scheme, _, param = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        name, colon, password = decoded.partition(":")
        return HTTPBasicCredentials(username=name, password=password) if colon else None


# A request without credentials reaches `user`, which decides (anonymous on loopback
# without authentication configured, a trusted proxy's header, or 401).
_basic = Utf8Basic(auto_error=False)


def user(
    request: Request,
    web: State,
    credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
) -> User:
    settings = web.site.settings.web
    found = web.authenticator.user(
        (credentials.username, credentials.password) if credentials else None,
        request.client.host if request.client else None,
        request.headers.get(settings.trusted_proxy_header)
        if settings.trusted_proxy_header
        else None,
    )
    if found is None:
        raise HTTPException(
            status_code=401,
            detail="authentication required",
            headers={"WWW-Authenticate": 'Basic realm="cxrbatch"'},
        )
    return found


Viewer = Annotated[User, Depends(user)]


def reading(web: State) -> Iterator[Session]:
    """A session on the read-only results database, closed after the response."""
    with web.results.sessions() as session:
        yield session


Reading = Annotated[Session, Depends(reading)]


def audited(
    web: WebState, who: User, action: str, study: str | None, detail: str | None = None
) -> None:
    """One audit event (who looked at what), committed at once."""
    with web.audit.sessions.begin() as session:
        audit.record_audit(session, who.name, action, study, detail)


def filters(
    recorded_from: Annotated[dt.date | None, Query(alias="from")] = None,
    recorded_to: Annotated[dt.date | None, Query(alias="to")] = None,
    triage: str | None = None,
    status: str | None = None,
    label: str | None = None,
    min_probability: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
) -> rows.WorklistFilter:
    """The worklist's filters from the query string (the page, its CSV and the API)."""
    if triage and triage not in {t.value for t in Triage}:
        raise HTTPException(400, f"unknown triage {triage!r}")
    if status and status not in {s.value for s in OutcomeStatus}:
        raise HTTPException(400, f"unknown status {status!r}")
    return rows.WorklistFilter(
        recorded_from, recorded_to, triage or None, status or None, label or None,
        min_probability if label else None,
    )  # fmt: skip


Filters = Annotated[rows.WorklistFilter, Depends(filters)]


def page_of(
    session: Session,
    where: rows.WorklistFilter,
    sort: str,
    size: int,
    after: str | None = None,
    before: str | None = None,
) -> rows.WorklistPage:
    """One page after (or before) a cursor, and the cursors of its neighbours; a bad
    cursor, sort or label is a 400."""
    try:
        return rows.worklist_page(session, where, sort, size, after, before)
    except rows.CursorError as exc:
        raise HTTPException(400, str(exc)) from exc
    except CxrBatchError as exc:  # an unknown label: say which are known
        raise HTTPException(400, str(exc)) from exc


def study_view(session: Session, uid: str) -> rows.StudyView:
    view = rows.study_view(session, uid)
    if view is None:
        raise HTTPException(404, "no such study")
    return view


def synthetic_scores(row: rows.OutcomeView) -> bool:
    """Scores on this row came from a model trained on synthetic data (an ineligible or
    failed study has no scores, whatever models were loaded)."""
    return row.synthetic_model and bool(
        row.probabilities
        or row.no_finding_score is not None
        or row.screening_no_finding_score is not None
    )

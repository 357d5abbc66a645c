"""Health, readiness and Prometheus metrics: no patient data, open to monitoring."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cxrbatch.db import DatabaseError
from cxrbatch.db.session import open_existing
from cxrbatch.errors import DatabaseNotReady
from cxrbatch.web.deps import State

router = APIRouter()


@router.get("/healthz", response_class=PlainTextResponse)
def healthz() -> str:
    return "ok"


@router.get("/readyz", response_class=PlainTextResponse)
def readyz(web: State) -> PlainTextResponse:
    """Ready: the database answers and its schema is this code's."""
    try:
        open_existing(web.site.database_url, readonly=True).dispose()
    except DatabaseNotReady as exc:
        return PlainTextResponse(f"not ready: {exc}", 503)
    except DatabaseError as exc:
        return PlainTextResponse(f"database unreachable: {type(exc).__name__}", 503)
    return PlainTextResponse("ready")


@router.get("/metrics")
def metrics(web: State) -> Response:
    return Response(generate_latest(web.registry), media_type=CONTENT_TYPE_LATEST)

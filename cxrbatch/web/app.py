"""The web app, wired in one place: `create_app(site)` (FastAPI, Jinja2 templates).

    GET /                               worklist (filters, sort, pages)
    GET /worklist.csv                   the filtered worklist as CSV (audited)
    GET /studies/{uid}?maps=0|1         one study: overlays (with the finding maps on
                                        request), findings, QC, models, history,
                                        deliveries, downloads (audited)
    GET /studies/{uid}/overlay/{sop}.png?size=thumb|large&maps=0|1
    GET /studies/{uid}/files/{kind}     kind: sr | json | seg-<sop> | key-<sop> | gsps-<sop>
                                        (audited; the DICOM files carry patient
                                        identifiers: refused to anonymous users, who may
                                        have result.json)
    GET /operations                     queue, throughput, failures, deliveries, quarantine,
                                        disk, workers
    GET /healthz  /readyz  /metrics

The results are read through a read-only engine; the only writes are audit events (a
second engine) and the overlay cache. Patient names, IDs and accession numbers appear
only to authenticated users, never in URLs or the log. Every response carries the
security headers of cxrbatch/web/security.py; every value printed into a page shows
control and text-reordering characters as escapes (`errors.printable`).
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, and
# those name objects local to create_app (the Viewer dependency).

import contextlib
import csv
import datetime as dt
import io
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cxrbatch import __version__
from cxrbatch.db import DatabaseError, Session
from cxrbatch.db import web as rows
from cxrbatch.db.session import Database, open_existing
from cxrbatch.domain import FINDING_LABELS, OutcomeStatus, Triage
from cxrbatch.errors import CxrBatchError, DatabaseNotReady, printable
from cxrbatch.files import sha256_file
from cxrbatch.metrics import ResultsCollector
from cxrbatch.models.preflight import bundle_files
from cxrbatch.paths import resolve_stored
from cxrbatch.site import Site
from cxrbatch.web.auth import Authenticator, User
from cxrbatch.web.render import SIZES, OverlayError, cached_overlay
from cxrbatch.web.security import SecurityHeaders

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"
# /files/<prefix>-<sop>: the outputs document's per-image group it is served from.
DOWNLOAD_GROUPS = {"seg": "seg", "key": "key_images", "gsps": "presentation_states"}


def _shown(value: Any) -> Any:
    """What a template prints: text with control and bidirectional-override characters
    (NUL, U+202E, ...) as visible escapes; Jinja's autoescape then escapes the HTML."""
    return printable(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class Thresholds:
    """A configured bundle's operating points, matched to outcomes by the weights' hash."""

    labels: dict[str, float]
    no_finding: float | None


def bundle_thresholds(site: Site) -> dict[str, Thresholds]:
    found: dict[str, Thresholds] = {}
    for path in (site.settings.classifier.bundle, site.settings.classifier.screening_bundle):
        if not path:
            continue
        try:
            _, model_path, metadata = bundle_files(path)
            spec = metadata["cxrbatch"]
            screening = spec.get("screening") or {}
            found[sha256_file(model_path)] = Thresholds(
                {str(k): float(v) for k, v in (spec.get("thresholds") or {}).items()},
                screening.get("no_finding_threshold"),
            )
        except (CxrBatchError, OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("bundle thresholds not shown: %s", exc)
    return found


def _synthetic_scores(row: rows.WorklistRow) -> bool:
    """Scores on this row came from a model trained on synthetic data (an ineligible or
    failed study has no scores, whatever models were loaded)."""
    return row.synthetic_model and bool(
        row.probabilities
        or row.no_finding_score is not None
        or row.screening_no_finding_score is not None
    )


def _cells(values: list[Any]) -> list[Any]:
    """CSV cells safe to open in a spreadsheet: text from headers that starts like a formula
    (= + - @, tab, carriage return) is prefixed with an apostrophe (OWASP CSV injection)."""
    return [
        "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v
        for v in values
    ]


def create_app(site: Site) -> FastAPI:
    """The app for `site` (its database must exist with this code's schema)."""
    settings = site.settings.web
    results = site.database(readonly=True, existing=True)
    audit = Database(site.database_url, existing=True)
    authenticator = Authenticator(settings)
    thresholds = bundle_thresholds(site)
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else site.out_dir / "_web_cache"
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.finalize = _shown
    templates.env.globals.update(
        version=__version__, labels=FINDING_LABELS, triages=[t.value for t in Triage]
    )
    registry = CollectorRegistry()
    registry.register(ResultsCollector(results.sessions))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        results.close()
        audit.close()

    app = FastAPI(
        title="cxrbatch", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def user(request: Request) -> User:
        found = authenticator.user(
            request.headers.get("authorization"),
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

    def audited(who: User, action: str, study: str | None, detail: str | None = None) -> None:
        with audit.sessions.begin() as session:
            rows.record_audit(session, who.name, action, study, detail)

    def reading() -> Session:
        return results.sessions()

    def page(request: Request, name: str, who: User, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request, name, {"user": who, "now": dt.datetime.now(dt.UTC), **context}
        )

    def filters(
        recorded_from: Annotated[dt.date | None, Query(alias="from")] = None,
        recorded_to: Annotated[dt.date | None, Query(alias="to")] = None,
        triage: str | None = None,
        status: str | None = None,
        label: str | None = None,
        min_probability: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    ) -> rows.WorklistFilter:
        """The worklist's filters from the query string (the page and its CSV share them)."""
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
        """One page after (or before) a cursor, and the cursors of its neighbours."""
        try:
            return rows.worklist_page(session, where, sort, size, after, before)
        except rows.CursorError as exc:
            raise HTTPException(400, str(exc)) from exc
        except CxrBatchError as exc:  # an unknown label: say which are known
            raise HTTPException(400, str(exc)) from exc

    @app.get("/", response_class=HTMLResponse)
    def worklist(
        request: Request,
        who: Viewer,
        where: Filters,
        sort: str = "screening",
        after: Annotated[str | None, Query(max_length=400)] = None,
        before: Annotated[str | None, Query(max_length=400)] = None,
    ) -> HTMLResponse:
        with reading() as session:
            shown = page_of(session, where, sort, settings.page_size, after, before)
        query = {k: v for k, v in request.query_params.items() if k not in ("after", "before")}
        audited(who, "worklist_viewed", None, f"{len(shown.rows)} rows")
        return page(
            request, "worklist.html", who,
            rows=shown.rows, total=shown.total, more=shown.more,
            next_cursor=shown.next_cursor, previous_cursor=shown.previous_cursor,
            first=after is None and before is None, query=query, sort=sort,
            where=where, thresholds=thresholds,
            synthetic=any(_synthetic_scores(r) for r in shown.rows),
        )  # fmt: skip

    @app.get("/worklist.csv")
    def worklist_csv(who: Viewer, where: Filters, sort: str = "screening") -> Response:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        identity = ["accession_number", "patient_id", "patient_name"] if who.authenticated else []
        writer.writerow(
            ["study_instance_uid", *identity, "study_date", "modality", "status", "triage",
             "no_finding_score", "screening_no_finding_score", *[f"p_{x}" for x in FINDING_LABELS],
             "reason", "synthetic_model"]
        )  # fmt: skip
        with reading() as session:
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
        audited(who, "worklist_exported", None, f"{exported} studies")
        return Response(
            buffer.getvalue(),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="cxrbatch-worklist.csv"'},
        )

    def _view(uid: str) -> rows.StudyView:
        with reading() as session:
            view = rows.study_view(session, uid)
        if view is None:
            raise HTTPException(404, "no such study")
        return view

    @app.get("/studies/{uid}", response_class=HTMLResponse)
    def study(request: Request, uid: str, who: Viewer, maps: bool = False) -> HTMLResponse:
        view = _view(uid)
        audited(who, "study_viewed", uid)
        return page(
            request, "study.html", who, view=view, row=view.row, thresholds=thresholds,
            synthetic=_synthetic_scores(view.row), show_maps=maps,
        )  # fmt: skip

    @app.get("/studies/{uid}/overlay/{sop}.png")
    def overlay(
        uid: str, sop: str, who: Viewer, size: str = "thumb", maps: bool = False
    ) -> Response:
        if size not in SIZES:
            raise HTTPException(400, f"size is one of {', '.join(SIZES)}")
        outcome = _view(uid).current
        image = next((i for i in outcome.images if i.sop_instance_uid == sop), None)
        if image is None or not image.seg_path:
            raise HTTPException(404, "no segmentation for this image")
        roots = site.roots
        source = resolve_stored(image.source_path, roots) if image.source_path else None
        stored_maps = ((outcome.outputs or {}).get("finding_maps") or {}).get(sop) if maps else None
        maps_file = resolve_stored(stored_maps, roots) if stored_maps else None
        seg = resolve_stored(image.seg_path, roots)
        try:
            data = cached_overlay(cache_dir, source, seg, size, maps_file)
        except (OverlayError, OSError) as exc:
            raise HTTPException(404, f"overlay not available: {exc}") from exc
        audited(who, "image_viewed", uid, f"{sop} {size}" + (" maps" if maps else ""))
        return Response(data, media_type="image/png")

    @app.get("/studies/{uid}/files/{kind}")
    def download(uid: str, kind: str, who: Viewer) -> FileResponse:
        outputs = _view(uid).current.outputs or {}
        stored: str | None = None
        if kind in ("sr", "json"):
            stored = outputs.get(kind)
        else:
            prefix, _, sop = kind.partition("-")
            group = DOWNLOAD_GROUPS.get(prefix)
            if group is not None:
                stored = (outputs.get(group) or {}).get(sop)
        if not stored:
            raise HTTPException(404, "no such file")
        if kind != "json" and not who.authenticated:
            # SEG, SR and key images carry the patient's name, ID and birth date.
            raise HTTPException(
                403,
                "the DICOM files carry patient identifiers: they are served to signed-in "
                "users only (configure [[web.users]] or a trusted proxy); result.json is "
                "available",
            )
        path = resolve_stored(stored, site.roots)
        if not path.is_file():
            raise HTTPException(404, "the file is no longer there")
        audited(who, "file_downloaded", uid, kind)
        media = "application/json" if kind == "json" else "application/dicom"
        return FileResponse(path, media_type=media, filename=path.name)

    @app.get("/operations", response_class=HTMLResponse)
    def operations(request: Request, who: Viewer) -> HTMLResponse:
        now = dt.datetime.now(dt.UTC)
        with reading() as session:
            figures = rows.operations(session, now)
        disk = []
        for name, folder in (("output", site.out_dir), ("spool", site.spool_dir)):
            probe = folder
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            usage = shutil.disk_usage(probe)
            disk.append((name, usage.free / 2**20, usage.total / 2**20))
        return page(
            request, "operations.html", who, figures=figures, disk=disk,
            watermark=site.settings.queue.min_free_disk_mb, synthetic=False,
        )  # fmt: skip

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get("/readyz", response_class=PlainTextResponse)
    def readyz() -> PlainTextResponse:
        """Ready: the database answers and its schema is this code's."""
        try:
            open_existing(site.database_url, readonly=True).dispose()
        except DatabaseNotReady as exc:
            return PlainTextResponse(f"not ready: {exc}", 503)
        except DatabaseError as exc:
            return PlainTextResponse(f"database unreachable: {type(exc).__name__}", 503)
        return PlainTextResponse("ready")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app

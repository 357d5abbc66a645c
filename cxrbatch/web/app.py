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
    GET /api/v1/studies, /api/v1/studies/{uid}
                                        the same as JSON (cxrbatch/web/api.py; the
                                        OpenAPI schema at /openapi.json)
    GET /healthz  /readyz  /metrics

The routes live in routers by kind (pages.py, files.py, api.py, health.py); what they
depend on (the user, a reading session, the audit trail, the filters) in deps.py.

The results are read through a read-only engine; the only writes are audit events (a
second engine) and the overlay cache. Patient names, IDs and accession numbers appear
only to authenticated users, never in URLs or the log. Every response carries the
security headers of cxrbatch/web/security.py; every value printed into a page shows
control and text-reordering characters as escapes (`errors.printable`).
"""

# No `from __future__ import annotations` here: FastAPI reads the annotations.

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry

from cxrbatch import __version__
from cxrbatch.db.session import Database
from cxrbatch.domain import FINDING_LABELS, Triage
from cxrbatch.errors import CxrBatchError, printable
from cxrbatch.files import sha256_file
from cxrbatch.metrics import ResultsCollector
from cxrbatch.models.preflight import bundle_files
from cxrbatch.site import Site
from cxrbatch.web import api, files, health, pages
from cxrbatch.web.auth import Authenticator
from cxrbatch.web.deps import Thresholds, WebState
from cxrbatch.web.security import SecurityHeaders

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"


def _shown(value: Any) -> Any:
    """What a template prints: text with control and bidirectional-override characters
    (NUL, U+202E, ...) as visible escapes; Jinja's autoescape then escapes the HTML."""
    return printable(value) if isinstance(value, str) else value


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


def create_app(site: Site) -> FastAPI:
    """The app for `site` (its database must exist with this code's schema)."""
    settings = site.settings.web
    results = site.database(readonly=True, existing=True)
    audit = Database(site.database_url, existing=True)
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
        title="cxrbatch",
        version=__version__,
        description=api.__doc__,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.cxrbatch = WebState(
        site=site,
        results=results,
        audit=audit,
        authenticator=Authenticator(settings),
        thresholds=bundle_thresholds(site),
        templates=templates,
        cache_dir=Path(settings.cache_dir) if settings.cache_dir else site.out_dir / "_web_cache",
        registry=registry,
    )
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for router in (pages.router, files.router, api.router, health.router):
        app.include_router(router)
    return app

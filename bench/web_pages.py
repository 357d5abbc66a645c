"""The web app's speed targets (issue 21), measured in one run on this machine:

- a filtered worklist page with 100,000 studies in the database (SQLite): median < 300 ms;
- a study page's overlay: < 500 ms uncached, < 50 ms cached.

    python -m bench.web_pages [--studies 100000] [--repeats 15] [--workdir DIR]

The database is filled by bench/web_data.py (current outcomes with findings, 30 days of
them); the overlay is of RG1 (the real chest CR, 2140 x 1760 after decoding) with a SEG
the real pipeline writes for it. Requests go through FastAPI's TestClient (the app, not
the network). Prints one JSON line: each median, its target and the ratio median/target
(< 1 meets it).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _median_ms(call: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    from fastapi.testclient import TestClient
    from pydicom.data import get_testdata_file

    from bench.web_data import populate
    from cxrbatch import logs, pipeline
    from cxrbatch.batch import run_batch
    from cxrbatch.config import load_settings
    from cxrbatch.site import Site
    from cxrbatch.web.app import create_app

    logs.configure("WARNING")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxrbatch-web-bench-"))
    out = work / "out"
    (work / "in").mkdir(parents=True, exist_ok=True)
    rg1 = Path(str(get_testdata_file("RG1_UNCR.dcm")))
    (work / "in" / "rg1.dcm").write_bytes(rg1.read_bytes())
    settings = load_settings(None, segmentation={"device": "cpu"})
    site = Site.at(settings, out)
    started = time.perf_counter()
    run_batch(work / "in", site, models=pipeline.load_models(settings))
    populate(site.database_url, args.studies, seed=1)
    fill_s = time.perf_counter() - started
    client = TestClient(create_app(site))

    def page(query: str) -> None:
        response = client.get("/" + query)
        assert response.status_code == 200, response.text[:300]

    def after(query: str, pages: int) -> str:
        """The query of the page `pages` after the first (following the next links)."""
        for _ in range(pages):
            link = re.search(r'href="/\?[^"]*after=([\w-]+)"', client.get("/" + query).text)
            assert link is not None, "fewer pages than asked"
            query = re.sub(r"&?after=[\w-]+", "", query)
            query = f"{query}{'&' if '?' in query else '?'}after={link.group(1)}"
        return query

    filtered = {
        "screening order, page 1": "",
        "triage abnormal, page 5": after("?triage=abnormal", 4),
        "Mass >= 0.7, last 7 days": "?label=Mass&min_probability=0.7&from="
        + time.strftime("%Y-%m-%d", time.gmtime(time.time() - 7 * 86400)),
        "newest first, page 200": after("?sort=recorded", 199),
    }
    pages = {name: _median_ms(lambda q=q: page(q), args.repeats) for name, q in filtered.items()}
    with site.database() as database, database.sessions() as session:
        from sqlalchemy import select

        from cxrbatch.db import models

        uid, sop = session.execute(
            select(models.Study.study_instance_uid, models.Image.sop_instance_uid)
            .join(models.Outcome, models.Outcome.study_id == models.Study.id)
            .join(models.Image, models.Image.outcome_id == models.Outcome.id)
            .where(models.Image.seg_path.is_not(None))
        ).first()
    cache = out / "_web_cache"
    url = f"/studies/{uid}/overlay/{sop}.png?size=large"

    def uncached() -> None:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
        assert client.get(url).status_code == 200

    overlay_uncached = _median_ms(uncached, max(3, args.repeats // 3))
    client.get(url)
    overlay_cached = _median_ms(lambda: client.get(url), args.repeats)
    worst_page = max(pages.values())
    report = {
        "studies": args.studies + 1,
        "fill_seconds": round(fill_s, 1),
        "page_median_ms": {k: round(v, 1) for k, v in pages.items()},
        "page_target_ms": 300,
        "page_ratio_to_target": round(worst_page / 300, 3),
        "overlay_uncached_median_ms": round(overlay_uncached, 1),
        "overlay_uncached_ratio_to_target": round(overlay_uncached / 500, 3),
        "overlay_cached_median_ms": round(overlay_cached, 1),
        "overlay_cached_ratio_to_target": round(overlay_cached / 50, 3),
    }
    print(json.dumps(report))
    met = (
        report["page_ratio_to_target"] < 1
        and report["overlay_uncached_ratio_to_target"] < 1
        and report["overlay_cached_ratio_to_target"] < 1
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

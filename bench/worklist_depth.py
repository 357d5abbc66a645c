"""The worklist and /metrics at depth (issue 34): N current outcomes in a fresh PostgreSQL
database (bench.web_data's rows), then each worklist query as the web app runs it, timed,
and the same pages the way they were read before (a count of every match, ORDER BY the
screening expression, OFFSET) for the ratio in one run.

    python -m bench.worklist_depth [--studies 1000000] [--repeats 5] [--db ADMIN_URL]

Prints one JSON line: milliseconds (median) per case, and the targets' ratio (300 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.postgres import ADMIN, scratch_database


def _median_ms(work: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(url: str, studies: int, repeats: int) -> dict[str, Any]:
    from sqlalchemy import case, func, select, text

    from bench.web_data import populate
    from cxrbatch.db import models
    from cxrbatch.db import reads as rows
    from cxrbatch.db.session import make_engine, session_factory
    from cxrbatch.domain import Triage

    started = time.perf_counter()
    populate(url, studies, seed=3)
    engine = make_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
    fill_s = time.perf_counter() - started
    sessions = session_factory(engine)
    everything = rows.WorklistFilter()
    abnormal = rows.WorklistFilter(triage="abnormal")
    size = 50

    def walk(where: rows.WorklistFilter, sort: str, pages: int) -> str | None:
        cursor = None
        with sessions() as session:
            for _ in range(pages):
                cursor = rows.worklist_page(session, where, sort, size, after=cursor).next_cursor
        return cursor

    with sessions() as session:  # a cursor half way down (found once, not timed)
        middle = session.scalar(
            select(models.Outcome)
            .where(models.Outcome.is_current)
            .order_by(
                models.Outcome.screening_rank,
                models.Outcome.score_missing,
                models.Outcome.sort_score,
                models.Outcome.id,
            )
            .offset(studies // 2)
            .limit(1)
        )
        assert middle is not None
        middle_cursor = rows._cursor(middle, "screening")

    def page(where: rows.WorklistFilter, sort: str, after: str | None) -> None:
        with sessions() as session:
            found = rows.worklist_page(session, where, sort, size, after=after)
            assert len(found.rows) == size

    fifth = walk(abnormal, "screening", 4)
    newest_200 = walk(everything, "recorded", 199)
    cases = {
        "screening order, first page": lambda: page(everything, "screening", None),
        "screening order, page at the middle": lambda: page(everything, "screening", middle_cursor),
        "triage abnormal, page 5": lambda: page(abnormal, "screening", fifth),
        "newest first, page 200": lambda: page(everything, "recorded", newest_200),
        "study date order, first page": lambda: page(everything, "study_date", None),
        "metrics counts": lambda: _metrics(sessions),
    }
    figures = {name: round(_median_ms(work, repeats), 1) for name, work in cases.items()}

    # Before: count every match, sort by the screening expression, OFFSET to the page.
    score = func.coalesce(
        models.Outcome.screening_no_finding_score, models.Outcome.no_finding_score
    )
    rank = case(
        (models.Outcome.triage.in_([Triage.ABNORMAL, Triage.NEEDS_REVIEW]), 0),
        (models.Outcome.triage.is_(None), 1),
        else_=2,
    )

    def offset_page(offset: int) -> None:
        with sessions() as session:
            base = select(models.Outcome.id).where(models.Outcome.is_current)
            session.scalar(select(func.count()).select_from(base.subquery()))
            ordered = base.order_by(
                rank, case((score.is_(None), 1), else_=0), score, models.Outcome.id
            )
            assert len(session.scalars(ordered.offset(offset).limit(size)).all()) == size

    offset_page(0)  # warm, as the cases above were by their first repeat
    before = {
        "screening order, first page": _median_ms(lambda: offset_page(0), 3),
        "screening order, page at the middle": _median_ms(lambda: offset_page(studies // 2), 3),
    }
    engine.dispose()
    worst = max(figures.values())
    return {
        "studies": studies,
        "fill_seconds": round(fill_s, 1),
        "ms": figures,
        "before_ms": {k: round(v, 1) for k, v in before.items()},
        "target_ms": 300,
        "worst_ratio_to_target": round(worst / 300, 3),
    }


def _metrics(sessions: Any) -> None:
    from cxrbatch.db import reads as rows

    with sessions() as session:
        rows.metric_counts(session)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--db", default=ADMIN, help="an admin URL of the PostgreSQL server")
    args = parser.parse_args(argv)

    with scratch_database(args.db) as url:
        report = measure(url, args.studies, args.repeats)
    print(json.dumps(report))
    return 0 if report["worst_ratio_to_target"] < 1 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Worklist pages by cursor (keyset, issue 34): each order is walked page by page on SQLite
and PostgreSQL and every current outcome comes exactly once, in the order the sort keys
say; going back gives the same pages; outcomes recorded before migration 0012 get their
sort keys from the migration.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.web_data import populate
from cxrbatch.db import models
from cxrbatch.db import reads as rows
from cxrbatch.db.session import make_engine, session_factory, upgrade


def _walk(url: str, sort: str, where: rows.WorklistFilter, size: int) -> list[list[str]]:
    sessions = session_factory(make_engine(url))
    pages: list[list[str]] = []
    cursor = None
    with sessions() as session:
        while True:
            page = rows.worklist_page(session, where, sort, size, after=cursor)
            pages.append([r.study_instance_uid for r in page.rows])
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        # Back from the last page, page by page: the same pages in reverse.
        back = [pages[-1]]
        cursor = rows.worklist_page(session, where, sort, size, after=cursor).previous_cursor
        while cursor is not None:
            page = rows.worklist_page(session, where, sort, size, before=cursor)
            back.append([r.study_instance_uid for r in page.rows])
            cursor = page.previous_cursor
        assert back[::-1] == pages, sort
    return pages


def _expected(url: str, sort: str, triage: str | None) -> list[str]:
    sessions = session_factory(make_engine(url))
    with sessions() as session:
        found = session.execute(
            select(models.Outcome, models.Study.study_instance_uid)
            .join(models.Study)
            .where(models.Outcome.is_current)
        ).all()

    def key(item: tuple[models.Outcome, str]) -> tuple[object, ...]:
        o = item[0]
        score = o.screening_no_finding_score
        score = o.no_finding_score if score is None else score
        rank = 0 if o.triage in ("abnormal", "needs-review") else 1 if o.triage is None else 2
        date = o.study.study_date or models.NO_DATE
        return {
            "screening": (rank, score is None, score or 0.0, o.id),
            "no_finding": (score is None, score or 0.0, o.id),
            "recorded": (o.created_at, o.id),
            "study_date": (date, o.id),
        }[sort]

    with sessions() as session:
        items = [(session.merge(o), uid) for o, uid in found]
        chosen = [i for i in items if triage is None or i[0].triage == triage]
        ordered = sorted(chosen, key=key, reverse=sort in ("recorded", "study_date"))
        return [uid for _, uid in ordered]


def _check_every_order(url: str) -> None:
    populate(url, 137, seed=9)
    for sort in rows.ORDERS:
        for triage in (None, "likely-normal"):
            pages = _walk(url, sort, rows.WorklistFilter(triage=triage), 20)
            walked = [uid for page in pages for uid in page]
            assert walked == _expected(url, sort, triage), (sort, triage)
            assert all(len(p) == 20 for p in pages[:-1])


def test_every_order_pages_through_each_outcome_once_on_sqlite(tmp_path: Path) -> None:
    _check_every_order(f"sqlite:///{tmp_path / 'cxrbatch.sqlite'}")


@pytest.mark.postgres
def test_every_order_pages_through_each_outcome_once_on_postgres(postgres_url: str) -> None:
    _check_every_order(postgres_url)


def test_outcomes_recorded_before_the_keys_get_them_from_the_migration(tmp_path: Path) -> None:
    path = tmp_path / "cxrbatch.sqlite"
    url = f"sqlite:///{path}"
    upgrade(url, "0011")
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO studies (id, study_instance_uid, study_date, first_seen_at, updated_at)"
            " VALUES (1, '1.2.3', '2026-11-30', '2026-12-01', '2026-12-01'),"
            " (2, '1.2.4', NULL, '2026-12-01', '2026-12-01')"
        )
        for oid, sid, triage, nf, screening in (
            (1, 1, "likely-normal", 0.8, 0.7),
            (2, 2, None, None, None),
        ):
            db.execute(
                "INSERT INTO outcomes (id, study_id, is_current, status, triage,"
                " no_finding_score, screening_no_finding_score, segmentation_only,"
                " synthetic_model, input_fingerprint, models, outputs, timings, created_at)"
                " VALUES (?, ?, 1, 'processed', ?, ?, ?, 0, 0, 'f', '[]', '{}', '{}',"
                " '2026-12-01 00:00:00')",
                (oid, sid, triage, nf, screening),
            )
    upgrade(url)
    sessions = session_factory(make_engine(url))
    with sessions() as session:
        first, second = session.scalars(select(models.Outcome).order_by(models.Outcome.id))
        assert (first.screening_rank, first.score_missing, first.sort_score) == (2, False, 0.7)
        assert str(first.sort_date) == "2026-11-30"
        assert (second.screening_rank, second.score_missing, second.sort_score) == (1, True, 0.0)
        assert second.sort_date == models.NO_DATE

"""The read-only SQLite engine the web app and the query commands open: many threads at
once (the web app's request threads while a page loads its images) each get a connection
of their own that nobody closes under them, and nothing can be written through it."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import SingletonThreadPool

from cxrbatch.db.session import make_engine


def _database(path: Path, rows: int) -> str:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE t (x INTEGER)")
    connection.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(rows)])
    connection.commit()
    connection.close()
    return f"sqlite:///{path}"


def test_sixteen_threads_read_at_once_without_losing_a_connection(tmp_path: Path) -> None:
    """With SQLite's in-memory pool (SingletonThreadPool, what the engine had) 11 of 16
    such threads failed here with "Cannot operate on a closed database", and the process
    could crash: the pool closes other threads' connections beyond five threads."""
    engine = make_engine(_database(tmp_path / "results.sqlite", 2000), readonly=True)
    assert not isinstance(engine.pool, SingletonThreadPool)
    failures: list[str] = []
    counts: list[int] = []
    start = threading.Barrier(16)

    def read() -> None:
        try:
            start.wait()
            for _ in range(60):
                with engine.connect() as connection:
                    counts.append(len(connection.execute(text("SELECT x FROM t")).fetchall()))
        except Exception as exc:  # every failure is the finding: collected, not raised here
            failures.append(repr(exc))

    threads = [threading.Thread(target=read) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    assert failures == []
    assert counts == [2000] * (16 * 60)


def test_nothing_can_be_written_through_it(tmp_path: Path) -> None:
    engine = make_engine(_database(tmp_path / "results.sqlite", 3), readonly=True)
    with engine.connect() as connection, pytest.raises(OperationalError, match="readonly"):
        connection.execute(text("INSERT INTO t VALUES (99)"))
    engine.dispose()
    assert sqlite3.connect(tmp_path / "results.sqlite").execute(
        "SELECT COUNT(*) FROM t"
    ).fetchone() == (3,)

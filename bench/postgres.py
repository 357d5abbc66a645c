"""A scratch PostgreSQL database for one benchmark run: created on the server of an admin
URL, dropped afterwards (also when the run fails). Default server: the PostgreSQL test
server (127.0.0.1:5432, trust auth, database `test`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextmanager
def scratch_database(admin_url: str = ADMIN, prefix: str = "cxrbatch_bench") -> Iterator[str]:
    """The URL of a new empty database named `<prefix>_<random>` on `admin_url`'s server."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

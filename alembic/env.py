"""Alembic environment: the URL comes from cxrbatch (Config main option sqlalchemy.url), or,
for a developer writing a revision with the `alembic` command and alembic.ini, from
`-x url=...` (the ini's own sqlalchemy.url otherwise)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from cxrbatch.db.models import Base
from cxrbatch.db.session import make_engine

config = context.config
target_metadata = Base.metadata

# PostgreSQL advisory lock key taken by every upgrade (any 64-bit number no other
# program on the database uses: "cxrbatch" in ASCII).
MIGRATION_LOCK = 0x6378726261746368


def _url() -> str | None:
    given: dict[str, str] = context.get_x_argument(as_dictionary=True)
    return given.get("url") or config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    assert url, "sqlalchemy.url must be set (cxrbatch.db.session.alembic_config, or -x url=)"
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Hosts started together on an empty database: one migrates, the others
                # wait here, then find the schema at head and do nothing (without it two
                # of three exited with UniqueViolation on alembic_version). Held to the
                # end of the transaction; SQLite's IMMEDIATE transactions serialise anyway.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                )
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

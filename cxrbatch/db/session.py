"""Engine and sessions; schema creation and upgrade only through alembic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from cxrbatch.errors import ConfigError, DatabaseNotReady
from cxrbatch.paths import StorageRoots

# Shipped inside the package (package data), so a non-editable install has it too.
ALEMBIC_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, *, readonly: bool = False) -> Engine:
    """An engine for `url`. SQLite gets WAL, a busy timeout and IMMEDIATE transactions.

    IMMEDIATE takes SQLite's write lock when a transaction begins, so two processes that
    read-then-update a queue row serialise instead of both reading the same row.
    `readonly`: the database is opened so that nothing can be written through the engine
    (SQLite: the file opened with mode=ro; PostgreSQL: read-only transactions).
    """
    if readonly:
        return _readonly_engine(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def _readonly_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise ConfigError("an in-memory SQLite database cannot be opened read-only")
        uri = f"file:{Path(database).resolve()}?mode=ro"
        # A pool that lends each connection to one thread at a time, as a file database's
        # engine gets by default. The "sqlite://" URL would otherwise give the pool SQLite
        # uses for in-memory databases (SingletonThreadPool), which closes other threads'
        # connections, in use or not, once more than five threads have asked: the web
        # app's request threads then failed ("Cannot operate on a closed database") or
        # crashed the process (a segmentation fault in CI while a page loaded its images).
        engine = create_engine(
            "sqlite://",
            creator=lambda: _sqlite_readonly(uri),
            poolclass=QueuePool,
            pool_pre_ping=False,
        )
        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(
            url,
            pool_pre_ping=True,
            connect_args={"options": "-c default_transaction_read_only=on"},
        )
    return create_engine(url, pool_pre_ping=True)


def _sqlite_readonly(uri: str) -> Any:
    import sqlite3

    connection = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
    connection.execute("PRAGMA busy_timeout=30000")
    return connection


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def head_revision() -> str:
    """The newest migration this code ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "the migrations have no head"
    return head


def open_existing(url: str, *, readonly: bool = True) -> Engine:
    """An engine on a results database that exists and whose schema is this code's, for the
    commands that query or tend it and must never create or migrate one (`results`,
    `worklist`, `status`, `send`, `jobs retry`, the web app). `readonly`: as `make_engine`.

    Raises DatabaseNotReady, saying what is wrong and what to do: no database at that place
    (a wrong --out?), no cxrbatch schema in it, a schema older than the code (`cxrbatch db
    upgrade`) or newer than it (upgrade cxrbatch).
    """
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise DatabaseNotReady(
            f"no results database at {path.resolve()}: give the --out of a batch that ran "
            "(or --db URL); `cxrbatch db upgrade` creates an empty one"
        )
    engine = make_engine(url, readonly=readonly)
    try:
        with engine.connect() as connection:
            from alembic.runtime.migration import MigrationContext

            current = MigrationContext.configure(connection).get_current_revision()
    except BaseException:
        engine.dispose()
        raise
    head = head_revision()
    if current == head:
        return engine
    engine.dispose()
    where = str(path.resolve()) if path is not None else make_url(url).render_as_string()
    if current is None:
        raise DatabaseNotReady(
            f"the database {where} holds no cxrbatch schema: check --out / --db, or run "
            "`cxrbatch db upgrade` to create it"
        )
    if current in known_revisions():
        raise DatabaseNotReady(
            f"the results database schema is at revision {current}, this cxrbatch needs "
            f"{head}: run `cxrbatch db upgrade` (with the same --out / --db)"
        )
    raise _newer_schema(current, head)


def known_revisions() -> set[str]:
    """Every migration this code ships."""
    from alembic.script import ScriptDirectory

    directory = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return {script.revision for script in directory.walk_revisions()}


def _newer_schema(current: str, head: str) -> DatabaseNotReady:
    return DatabaseNotReady(
        f"the results database schema is at revision {current}, which this cxrbatch "
        f"(newest revision {head}) does not know: a newer cxrbatch wrote it; upgrade "
        "cxrbatch, or, to go back to this release, restore the backup taken before the "
        "upgrade (deploy/INSTALL.md, 'Upgrade and roll back')"
    )


# File systems on which SQLite's locking is unreliable (sqlite.org/howtocorrupt.html 2.1).
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "glusterfs", "ceph", "afs"}
)


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system holding `path`, from /proc/mounts (Linux)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = path.resolve()
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = Path(fields[1].replace("\\040", " "))
        if target == mount_point or mount_point in target.parents:
            depth = len(mount_point.parts)
            if best is None or depth >= best[0]:
                best = (depth, fields[2])
    return best[1] if best else None


def ensure_local_sqlite(url: str, mounts: str | None = None) -> None:
    """Refuse a SQLite database on a network file system (its locks do not work there)."""
    if not url.startswith("sqlite"):
        return
    database = make_url(url).database
    if not database or database == ":memory:":
        return
    folder = Path(database).resolve().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    fstype = filesystem_type(folder, mounts)
    if fstype in NETWORK_FILESYSTEMS or (fstype or "").startswith("nfs"):
        raise ConfigError(
            f"Expected the SQLite database on a local file system, found {fstype!r} at "
            f"{folder}. SQLite locking is unsafe on network file systems: put the database "
            "on a local disk or use PostgreSQL (--db postgresql+psycopg://...)."
        )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


class Database:
    """An engine on one database and its session factory, set up and disposed together.

    `existing`: the database must exist with this code's schema (`open_existing`, which
    never creates or migrates); `readonly`: as `make_engine`. A unit of work is
    `with database.sessions.begin() as session: ...` (committed at the end, rolled back on
    an error), or a session the caller commits itself.
    """

    def __init__(self, url: str, *, readonly: bool = False, existing: bool = False) -> None:
        self.url = url
        self.engine = (
            open_existing(url, readonly=readonly)
            if existing
            else make_engine(url, readonly=readonly)
        )
        self.sessions: sessionmaker[Session] = session_factory(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def alembic_config(url: str, roots: StorageRoots | None = None) -> Any:
    """Alembic's configuration for `url`; `roots`: the site's storage roots, for the
    migrations that rewrite stored paths (0005)."""
    from alembic.config import Config

    if not (ALEMBIC_DIR / "env.py").is_file():
        raise ConfigError(
            f"Alembic migrations not found at {ALEMBIC_DIR}: this cxrbatch installation is "
            "incomplete (reinstall it: pip install --force-reinstall cxrbatch)"
        )
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if roots is not None:
        config.attributes["storage_roots"] = roots
    return config


def upgrade(url: str, revision: str = "head", roots: StorageRoots | None = None) -> None:
    """Create or upgrade the schema to `revision` (idempotent). `roots`: the site's storage
    roots, so that paths recorded by older versions become relative to them."""
    from alembic import command

    current = current_revision(url)
    if current is not None and current not in known_revisions():
        # Migrations never run backwards over a newer release's schema (a rollback
        # restores the backup instead); alembic would fail with a traceback here.
        raise _newer_schema(current, head_revision())
    command.upgrade(alembic_config(url, roots), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()

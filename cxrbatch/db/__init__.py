"""The results database: the only package that touches rows or imports SQLAlchemy.

    models      the tables (documented for SQL users in docs/schema.md)
    session     engines, sessions, the schema (alembic migrations in migrations/), opening
                an existing database for reading
    repository  outcomes, studies, findings, rejected files: recording and querying
    instances   the daemon's received instances (the spool's rows)
    leased      one leased-work mechanism (claim, lease, heartbeat, backoff, dead letters)
    jobs        the study queue, a user of `leased`
    deliveries  the send queue, a user of `leased`

Code outside this package names sessions and database errors through the aliases below,
never SQLAlchemy itself (tests/test_layout.py checks it).
"""

from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import SQLAlchemyError as DatabaseError
from sqlalchemy.orm import Session, sessionmaker

# A factory of sessions on one engine (what `session.session_factory` returns).
Sessions = sessionmaker[Session]

__all__ = ["DatabaseError", "IntegrityError", "Session", "Sessions"]

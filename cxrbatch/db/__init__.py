"""The results database: SQLAlchemy 2.0 tables, engine/session, and the only code touching rows."""

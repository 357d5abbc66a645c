"""paths relative to the site's storage roots

Paths recorded before this revision are absolute: a worker on a second host had to mount
the shared storage at the very same path. From here on they read `output:<relative>`,
`spool:<relative>` or `quarantine:<relative>` (cxrbatch.paths.StorageRoots) where they lie
under a root. This migration rewrites the existing rows the same way: instances.path,
images.seg_path, rejected_files.quarantine_path, outcomes.outputs and deliveries.files.

It needs the roots: `cxrbatch db upgrade --out OUT`, `process` and `watch` pass them. A
SQLite database named cxrbatch.sqlite without them is taken to sit in its output folder
with the default `_spool` and `_quarantine`. Otherwise (e.g. `db upgrade --db URL` alone)
the rows stay absolute, which keeps working: an absolute stored path is used as it is.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 06:10:00
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import context, op

from cxrbatch.paths import StorageRoots, resolve_stored

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _roots() -> StorageRoots | None:
    given = context.config.attributes.get("storage_roots")
    if isinstance(given, StorageRoots):
        return given
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        database = bind.engine.url.database
        if database and Path(database).name == "cxrbatch.sqlite":
            out = Path(database).absolute().parent
            return StorageRoots(out, out / "_spool", out / "_quarantine")
    return None


def _rewrite(convert: Callable[[str], str]) -> None:
    bind = op.get_bind()
    for table, column in (
        ("instances", "path"),
        ("images", "seg_path"),
        ("rejected_files", "quarantine_path"),
    ):
        rows = bind.execute(sa.text(f"SELECT id, {column} FROM {table} WHERE {column} IS NOT NULL"))
        for row_id, value in list(rows):
            new = convert(value)
            if new != value:
                bind.execute(
                    sa.text(f"UPDATE {table} SET {column} = :value WHERE id = :id"),
                    {"value": new, "id": row_id},
                )
    json_columns: list[tuple[str, str, Callable[[Any], Any]]] = [
        ("outcomes", "outputs", lambda doc: _document(doc, convert)),
        ("deliveries", "files", lambda files: [convert(str(f)) for f in files or []]),
    ]
    for table, column, change in json_columns:
        typed = sa.table(table, sa.column("id", sa.Integer), sa.column(column, sa.JSON))
        for row_id, value in list(bind.execute(sa.select(typed.c.id, typed.c[column]))):
            new = change(value)
            if new != value:
                bind.execute(typed.update().where(typed.c.id == row_id).values({column: new}))


def _document(outputs: Any, convert: Callable[[str], str]) -> Any:
    if not isinstance(outputs, dict):
        return outputs
    changed = dict(outputs)
    for key in ("seg", "key_images"):
        if isinstance(outputs.get(key), dict):
            changed[key] = {k: convert(str(v)) for k, v in outputs[key].items()}
    for key in ("sr", "json"):
        if outputs.get(key):
            changed[key] = convert(str(outputs[key]))
    return changed


def upgrade() -> None:
    roots = _roots()
    if roots is not None:
        _rewrite(lambda value: roots.store(value) if value.startswith("/") else value)


def downgrade() -> None:
    roots = _roots()
    if roots is not None:
        _rewrite(lambda value: str(resolve_stored(value, roots)))

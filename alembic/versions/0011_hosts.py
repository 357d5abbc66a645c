"""hosts: which worker recorded each outcome, and a claim index that serves the claim
query at any queue depth

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

DUE = "status IN ('queued', 'failed')"


def upgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.add_column(sa.Column("processed_by", sa.String(200), nullable=True))
    # The claim (`db.leased.LeasedWork.claim`) orders the due rows by (run_after, id) and
    # takes the first: with only the due rows in the index that is one index probe, where
    # ix_jobs_claim made PostgreSQL sort every due row (3.6-5.4 s at 1,000,000).
    op.create_index(
        "ix_jobs_due",
        "jobs",
        ["run_after", "id"],
        postgresql_where=sa.text(DUE),
        sqlite_where=sa.text(DUE),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_due", table_name="jobs")
    with op.batch_alter_table("outcomes") as batch:
        batch.drop_column("processed_by")

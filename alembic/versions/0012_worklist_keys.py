"""worklist keys: each worklist order as columns of the outcome and a partial index over
the current outcomes, so a page is read from where the last one ended (keyset) instead
of sorting every outcome

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 23:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_outcomes_screening", ["screening_rank", "score_missing", "sort_score", "id"]),
    ("ix_outcomes_no_finding", ["score_missing", "sort_score", "id"]),
    ("ix_outcomes_recorded", ["created_at", "id"]),
    ("ix_outcomes_study_date", ["sort_date", "id"]),
    ("ix_outcomes_current_triage", ["status", "triage"]),
)


def upgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.add_column(
            sa.Column("screening_rank", sa.Integer(), nullable=False, server_default="1")
        )
        batch.add_column(
            sa.Column("score_missing", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch.add_column(sa.Column("sort_score", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("sort_date", sa.Date(), nullable=False, server_default="0001-01-01")
        )
    # The same keys as cxrbatch.db.models.worklist_keys, for the outcomes recorded before.
    op.execute(
        """
        UPDATE outcomes SET
            screening_rank = CASE WHEN triage IN ('abnormal', 'needs-review') THEN 0
                                  WHEN triage IS NULL THEN 1 ELSE 2 END,
            score_missing = (COALESCE(screening_no_finding_score, no_finding_score) IS NULL),
            sort_score = COALESCE(screening_no_finding_score, no_finding_score, 0.0),
            sort_date = COALESCE(
                (SELECT studies.study_date FROM studies WHERE studies.id = outcomes.study_id),
                '0001-01-01')
        """
    )
    for name, columns in INDEXES:
        op.create_index(
            name,
            "outcomes",
            columns,
            postgresql_where=sa.text("is_current"),
            sqlite_where=sa.text("is_current"),
        )


def downgrade() -> None:
    for name, _ in INDEXES:
        op.drop_index(name, table_name="outcomes")
    with op.batch_alter_table("outcomes") as batch:
        for column in ("sort_date", "sort_score", "score_missing", "screening_rank"):
            batch.drop_column(column)

"""the web app: images.source_path (the radiograph an overlay is drawn on) and audit_events
(who viewed which study or exported which list, when)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("source_path", sa.Text(), nullable=True))
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_study", "audit_events", ["study_instance_uid"])
    # The worklist's order and filters over many studies (the web app pages through them).
    op.create_index("ix_outcomes_current_status", "outcomes", ["is_current", "status"])
    op.create_index("ix_outcomes_created_at", "outcomes", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_outcomes_created_at", table_name="outcomes")
    op.drop_index("ix_outcomes_current_status", table_name="outcomes")
    op.drop_index("ix_audit_events_study", table_name="audit_events")
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.drop_table("audit_events")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("source_path")

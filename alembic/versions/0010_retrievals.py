"""retrievals: the series a running pull asked a PACS to send (C-MOVE), so a receiver
refuses instances nobody asked for

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retrievals",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("originator", sa.String(16), nullable=False),
        sa.Column("source_ae_title", sa.String(16), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refused", sa.Integer(), nullable=False),
    )
    op.create_index("ix_retrievals_originator", "retrievals", ["originator"])


def downgrade() -> None:
    op.drop_index("ix_retrievals_originator", table_name="retrievals")
    op.drop_table("retrievals")

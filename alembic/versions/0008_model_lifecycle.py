"""findings.threshold/positive (per-label calls) and outcomes.shadow (shadow runs)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 18:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("findings") as batch:
        batch.add_column(sa.Column("threshold", sa.Float(), nullable=True))
        batch.add_column(sa.Column("positive", sa.Boolean(), nullable=True))
    with op.batch_alter_table("outcomes") as batch:
        batch.add_column(sa.Column("shadow", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.drop_column("shadow")
    with op.batch_alter_table("findings") as batch:
        batch.drop_column("positive")
        batch.drop_column("threshold")

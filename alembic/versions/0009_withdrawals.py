"""deliveries.objects (what a delivery carries) and deliveries.withdraws (the objects its
IOCM rejection note withdraws)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("objects", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("withdraws", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("withdraws")
        batch.drop_column("objects")

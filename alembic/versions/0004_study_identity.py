"""studies: accession number, patient ID and name, study date and modality

For people querying results (`cxrbatch results`, `worklist`, the web app); filled from the
headers when a study is recorded. Existing rows get them at their next processing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("accession_number", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("patient_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("patient_name", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("study_date", sa.Date(), nullable=True))
        batch.add_column(sa.Column("modality", sa.String(length=16), nullable=True))
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_index("ix_studies_patient_id", "studies", ["patient_id"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])


def downgrade() -> None:
    op.drop_index("ix_studies_study_date", table_name="studies")
    op.drop_index("ix_studies_patient_id", table_name="studies")
    op.drop_index("ix_studies_accession_number", table_name="studies")
    with op.batch_alter_table("studies") as batch:
        for column in ("modality", "study_date", "patient_name", "patient_id", "accession_number"):
            batch.drop_column(column)

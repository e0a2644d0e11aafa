"""The patient and study of images that came as DICOM: `dicom_instances`, one row per image.

Revision ID: 0007_dicom_instances
Revises: 0006_web_sessions
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_dicom_instances"
down_revision = "0006_web_sessions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create dicom_instances."""
    op.create_table(
        "dicom_instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer,
                  sa.ForeignKey("images.id", name="fk_dicom_instances_image_id_images"),
                  nullable=False),
        sa.Column("patient_id", sa.String(128), nullable=True),
        sa.Column("patient_name", sa.String(256), nullable=True),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("series_uid", sa.String(64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("accession_number", sa.String(64), nullable=True),
        sa.Column("body_part", sa.String(64), nullable=True),
        sa.Column("anatomic_region", sa.String(256), nullable=True),
        sa.Column("laterality", sa.String(16), nullable=True),
        sa.Column("acquired_at", sa.String(32), nullable=True),
        sa.Column("pseudonymised", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.UniqueConstraint("image_id", name="uq_dicom_instances_image_id"),
    )
    op.create_index("ix_dicom_instances_patient_id", "dicom_instances", ["patient_id"])
    op.create_index("ix_dicom_instances_study_uid", "dicom_instances", ["study_uid"])
    op.create_index("ix_dicom_instances_sop_instance_uid", "dicom_instances", ["sop_instance_uid"])


def downgrade() -> None:
    """Drop dicom_instances."""
    op.drop_index("ix_dicom_instances_sop_instance_uid", table_name="dicom_instances")
    op.drop_index("ix_dicom_instances_study_uid", table_name="dicom_instances")
    op.drop_index("ix_dicom_instances_patient_id", table_name="dicom_instances")
    op.drop_table("dicom_instances")

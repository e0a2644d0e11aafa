"""Images, duplicates and predictions.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the three tables of the screening pipeline."""
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("location", sa.String(1024), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("screened_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.UniqueConstraint("sha256", name="uq_images_sha256"),
        sa.CheckConstraint("status IN ('queued', 'screening', 'screened', 'rejected', 'failed')",
                           name="ck_images_status"),
    )
    op.create_index("ix_images_status", "images", ["status"])
    op.create_table(
        "duplicates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer, nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("location", sa.String(1024), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_duplicates"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"],
                                name="fk_duplicates_image_id_images"),
    )
    op.create_index("ix_duplicates_image_id", "duplicates", ["image_id"])
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer, nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("probabilities", sa.JSON, nullable=False),
        sa.Column("melanoma_probability", sa.Float, nullable=False),
        sa.Column("predicted_class", sa.String(64), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("flagged", sa.Boolean, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_predictions"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"],
                                name="fk_predictions_image_id_images"),
        sa.UniqueConstraint("image_id", "model_version", name="uq_predictions_image"),
    )
    op.create_index("ix_predictions_image_id", "predictions", ["image_id"])
    op.create_index("ix_predictions_flagged", "predictions", ["flagged"])


def downgrade() -> None:
    """Drop the three tables."""
    op.drop_table("predictions")
    op.drop_table("duplicates")
    op.drop_table("images")

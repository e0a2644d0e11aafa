"""The review app: users, reviews (append-only), the audit log; the worklist's columns and
indexes on images.

`images` gains the latest prediction's `melanoma_probability` and `flagged`, the latest
review's time (`reviewed_at`) and `needs_review` (flagged and not reviewed since), backfilled
from the existing predictions, so the worklist filters and pages on one table's indexes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create users, reviews, audit_log; add and backfill the worklist columns of images."""
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("failed_logins", sa.Integer, nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("name", name="uq_users_name"),
        sa.CheckConstraint("role IN ('reviewer', 'admin')", name="ck_users_role"),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer, nullable=False),
        sa.Column("reviewer_id", sa.Integer, nullable=False),
        sa.Column("prediction_id", sa.Integer, nullable=True),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("diagnosis", sa.String(64), nullable=True),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_reviews_image_id_images"),
        sa.ForeignKeyConstraint(["reviewer_id"], ["users.id"], name="fk_reviews_reviewer_id_users"),
        sa.ForeignKeyConstraint(["prediction_id"], ["predictions.id"],
                                name="fk_reviews_prediction_id_predictions"),
        sa.CheckConstraint("verdict IN ('refer', 'benign', 'not_assessable')",
                           name="ck_reviews_verdict"),
    )
    op.create_index("ix_reviews_image_id", "reviews", ["image_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("image_id", sa.Integer, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_audit_log_user_id_users"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_audit_log_image_id_images"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_image_id", "audit_log", ["image_id"])

    op.add_column("images", sa.Column("melanoma_probability", sa.Float, nullable=True))
    op.add_column("images", sa.Column("flagged", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("images", sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("images", sa.Column("needs_review", sa.Boolean, nullable=False,
                                      server_default=sa.false()))
    # Backfill from each image's latest prediction (the one `results` shows).
    latest = "(SELECT max(p.id) FROM predictions p WHERE p.image_id = images.id)"
    op.execute(f"UPDATE images SET "
               f"melanoma_probability = (SELECT melanoma_probability FROM predictions "
               f"WHERE id = {latest}), "
               f"flagged = coalesce((SELECT flagged FROM predictions WHERE id = {latest}), false)")
    op.execute("UPDATE images SET needs_review = flagged")
    op.create_index("ix_images_flagged", "images", ["flagged"])
    op.create_index("ix_images_reviewed_at", "images", ["reviewed_at"])
    op.create_index("ix_images_received_at", "images", ["received_at"])
    op.create_index("ix_images_worklist", "images", ["needs_review", "melanoma_probability", "id"])


def downgrade() -> None:
    """Drop what upgrade added."""
    for name in ("ix_images_worklist", "ix_images_received_at", "ix_images_reviewed_at",
                 "ix_images_flagged"):
        op.drop_index(name, table_name="images")
    with op.batch_alter_table("images") as batch:
        for column in ("needs_review", "reviewed_at", "flagged", "melanoma_probability"):
            batch.drop_column(column)
    op.drop_table("audit_log")
    op.drop_table("reviews")
    op.drop_table("users")

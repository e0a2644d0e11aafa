"""Alert and digest outbox, the images each alert is about, digest dates, delivery attempts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create outbox, alert_images, digests and delivery_attempts."""
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("raw", sa.LargeBinary, nullable=True),
        sa.Column("digest_date", sa.Date, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.String(64), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("message_id", "recipient", name="uq_outbox_message_id"),
        sa.CheckConstraint("kind IN ('alert', 'digest')", name="ck_outbox_kind"),
        sa.CheckConstraint("status IN ('pending', 'sending', 'sent', 'failed')",
                           name="ck_outbox_status"),
    )
    op.create_index("ix_outbox_status", "outbox", ["status"])
    op.create_table(
        "alert_images",
        sa.Column("outbox_id", sa.Integer, nullable=False),
        sa.Column("image_id", sa.Integer, nullable=False),
        sa.Column("prediction_id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("outbox_id", "image_id", name="pk_alert_images"),
        sa.ForeignKeyConstraint(["outbox_id"], ["outbox.id"],
                                name="fk_alert_images_outbox_id_outbox"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"],
                                name="fk_alert_images_image_id_images"),
        sa.ForeignKeyConstraint(["prediction_id"], ["predictions.id"],
                                name="fk_alert_images_prediction_id_predictions"),
    )
    op.create_index("ix_alert_images_image_id", "alert_images", ["image_id"])
    op.create_table(
        "digests",
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recipients", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("day", name="pk_digests"),
    )
    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("outbox_id", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_delivery_attempts"),
        sa.ForeignKeyConstraint(["outbox_id"], ["outbox.id"],
                                name="fk_delivery_attempts_outbox_id_outbox"),
    )
    op.create_index("ix_delivery_attempts_outbox_id", "delivery_attempts", ["outbox_id"])


def downgrade() -> None:
    """Drop the four tables."""
    op.drop_table("delivery_attempts")
    op.drop_table("digests")
    op.drop_table("alert_images")
    op.drop_table("outbox")

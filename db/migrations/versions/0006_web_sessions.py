"""Server-side review-app sessions: a login can be ended (logout, new password, disabled account).

`web_sessions` keeps the SHA-256 of each session's cookie token, the secret path segment the
cookie is scoped to, its CSRF token, a stamp of the password it was made with and its expiry.

Revision ID: 0006_web_sessions
Revises: 0005_clinics
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_web_sessions"
down_revision = "0005_clinics"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create web_sessions."""
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("path_key", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", name="fk_web_sessions_user_id_users"),
                  nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("credential_stamp", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("token_hash", name="uq_web_sessions_token_hash"),
    )
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"])
    op.create_index("ix_web_sessions_expires_at", "web_sessions", ["expires_at"])


def downgrade() -> None:
    """Drop web_sessions."""
    op.drop_index("ix_web_sessions_expires_at", table_name="web_sessions")
    op.drop_index("ix_web_sessions_user_id", table_name="web_sessions")
    op.drop_table("web_sessions")

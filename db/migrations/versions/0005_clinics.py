"""A clinic's life with the service: escalation and reviewers' clinics.

`images.escalated_at`: when the one reminder about a flagged image left unreviewed was written
(NULL: none yet); the UPDATE that sets it is the exactly-once guard. `users.prefixes`: the
source prefixes (clinics) a reviewer's worklist shows by default, one per line ('' = all).
`outbox.label`: why an alert was sent beside the first ('re-screen', 'reminder').

Revision ID: 0005_clinics
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_clinics"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add images.escalated_at, users.prefixes and outbox.label."""
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("escalated_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("prefixes", sa.Text, nullable=False, server_default=""))
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("label", sa.String(32), nullable=True))


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("label")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("prefixes")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("escalated_at")

"""Predictions record whether the image was out of scope (not like a dermoscopic lesion image)
and its scope distance.

Existing predictions read `out_of_scope` false (the models that made them had no scope rule)
and `scope_distance` null; their model_version is left as it was.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add predictions.out_of_scope (not null, default false) and predictions.scope_distance."""
    op.add_column("predictions", sa.Column("out_of_scope", sa.Boolean, nullable=False,
                                           server_default=sa.false()))
    op.add_column("predictions", sa.Column("scope_distance", sa.Float, nullable=True))


def downgrade() -> None:
    """Drop the two columns."""
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("scope_distance")
        batch.drop_column("out_of_scope")

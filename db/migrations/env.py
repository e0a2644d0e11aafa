"""Alembic environment: runs on the connection that `db.migrate.upgrade` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from db.schema import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    """Online migrations on the given connection, or on sqlalchemy.url."""
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations()

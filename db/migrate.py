"""Run the Alembic migrations shipped inside this package."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db.session import make_engine

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: PostgreSQL advisory lock key, so that many workers starting at once upgrade one at a time.
_LOCK_KEY = 0x6D656C61


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migrations."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (idempotent; safe when several start at once)."""
    engine = make_engine(url)
    try:
        for attempt in range(5):
            try:
                with engine.begin() as connection:
                    if connection.dialect.name == "postgresql":
                        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
                    config = alembic_config()
                    config.attributes["connection"] = connection
                    command.upgrade(config, revision)
                return
            except DBAPIError as exc:
                # Two SQLite processes upgrading at once: the loser sees "already exists".
                message = str(exc.orig).lower()
                if attempt == 4 or not ("already exists" in message or "locked" in message
                                        or "duplicate" in message):
                    raise
                logger.warning("schema upgrade collided (%s); retrying", exc.orig)
                time.sleep(0.5 * (attempt + 1))
    finally:
        engine.dispose()

"""What every command shares: the settings or one error line naming the variable, and `fail`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from melanoscreen.settings import Settings


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """The settings, or one error line naming the bad variable."""
    from pydantic import ValidationError

    from melanoscreen.settings import describe_error, get_settings

    # Alembic logs every plugin and step at INFO: keep command output to what matters.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return get_settings()
    except ValidationError as exc:
        fail(describe_error(exc))


#: `up` writes the URL of the Redis it started here, so commands in another shell can find it.
BROKER_FILE = "broker.url"


def known_broker(settings: Settings) -> str | None:
    """MELANOSCREEN_BROKER_URL, else the Redis that a running `up` recorded, else None."""
    if settings.broker_url:
        return settings.broker_url
    recorded = settings.data_path / BROKER_FILE
    return recorded.read_text().strip() if recorded.is_file() else None


def upgrade_schema(settings: Settings) -> None:
    """Bring the schema to the latest revision, or fail with one line."""
    from db.migrate import upgrade

    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.database)
    except Exception as exc:
        fail(f"MELANOSCREEN_DATABASE_URL: cannot open or upgrade the database: "
             f"{str(exc).splitlines()[0]}")

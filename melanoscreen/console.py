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

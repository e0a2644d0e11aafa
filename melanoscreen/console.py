"""What every command shares: one error line and a non-zero exit."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)

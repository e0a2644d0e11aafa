"""The `melanoscreen` command: one Typer app; each command reads settings, calls library code, prints."""

from __future__ import annotations

import logging
import sys

import typer

from melanoscreen.cli import clinic, health, mail, model, results, review, services
from melanoscreen.text import printable

app = typer.Typer(
    name="melanoscreen",
    help="Batch screening of dermoscopic skin-lesion images for dermatology clinics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Each command module adds its commands; none of them imports this one back.
for _commands in (model, services, results, mail, review, clinic, health):
    _commands.register(app)


class _PrintableFormatter(logging.Formatter):
    """Log lines name inbox files: their control characters are shown as escapes, so a name
    cannot forge a log line or drive the terminal (tracebacks keep their line breaks)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def main() -> None:
    """Console entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    app()

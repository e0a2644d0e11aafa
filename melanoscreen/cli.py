"""The `melanoscreen` command: one Typer app; each command reads settings, calls library code, prints."""

from __future__ import annotations

import logging
import sys

import typer

from melanoscreen import alerts_cli, model_cli, service_cli

app = typer.Typer(
    name="melanoscreen",
    help="Batch screening of dermoscopic skin-lesion images for dermatology clinics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Each command module adds its commands; none of them imports this one back.
for _commands in (model_cli, service_cli, alerts_cli):
    _commands.register(app)


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    app()

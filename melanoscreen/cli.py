"""The `melanoscreen` command: one Typer app; each command reads settings, calls library code, prints."""

from __future__ import annotations

import logging
import sys

import typer

from melanoscreen.console import fail  # noqa: F401  (service_cli still imports it from here)

app = typer.Typer(
    name="melanoscreen",
    help="Batch screening of dermoscopic skin-lesion images for dermatology clinics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


from melanoscreen.model_cli import register as _register_model  # noqa: E402, I001
_register_model(app)
from melanoscreen.service_cli import register as _register_service  # noqa: E402, I001
_register_service(app)
from melanoscreen.alerts_cli import register as _register_alerts  # noqa: E402, I001
_register_alerts(app)


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    app()

"""Flower with every page behind its login: Flower itself leaves `/metrics` and `/healthcheck`
open to anyone who can reach its port. `melanoscreen flower` runs this module in place of
`celery flower`; the arguments are Celery's."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any


def _behind_login(handler: Any) -> None:
    """Make a Flower handler's GET pass Flower's own login check (basic auth) first."""
    import tornado.web

    original: Callable[..., Awaitable[Any]] = handler.get

    @tornado.web.authenticated
    async def get(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await original(self, *args, **kwargs)

    handler.get = get


def main() -> None:
    """Guard Flower's open handlers, then run `celery` with this process's arguments."""
    from celery.__main__ import main as celery_main
    from flower.views import monitor

    for handler in (monitor.Metrics, monitor.Healthcheck):
        _behind_login(handler)
    # Flower asks the workers for their configuration at start and every minute; a worker
    # still loading its model does not answer in time, and each unanswered question was a
    # warning line in the service log. A worker's own error answer still logs (ERROR).
    logging.getLogger("flower.inspector").setLevel(logging.ERROR)
    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()

"""A clinic's commands: `rescreen` (a new model version looks again at screened
images) and `export` (reviewed images as a folder-per-diagnosis training set)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer

from melanoscreen.cli._common import fail, known_broker, load_settings, parse_when, upgrade_schema


def rescreen(
    since: Annotated[str | None, typer.Option(help="Only images received at or after this ISO "
                                              "date/time (UTC unless it says otherwise).")] = None,
    until: Annotated[str | None, typer.Option(help="Only images received before this ISO "
                                              "date/time.")] = None,
    source_prefix: Annotated[str | None, typer.Option(
        "--source-prefix", help="Only images whose inbox-relative name starts with this.")] = None,
    only_unreviewed: Annotated[bool, typer.Option(
        "--only-unreviewed", help="Only images nobody has reviewed.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say how many, queue nothing.")] = False,
    wait: Annotated[bool, typer.Option(help="Show progress until the workers are done.")] = True,
) -> None:
    """Queue screened images for the current model version (each image once per version)."""
    settings = load_settings()
    from db.session import make_session_factory
    from scheduler.queue import make_producer, send_screen_batch
    from service.rescreen import (
        ModelCardError,
        Selection,
        model_version,
        queue_rescreen,
        wait_for_rescreen,
    )

    selection = Selection(parse_when("--since", since), parse_when("--until", until),
                          source_prefix, only_unreviewed)
    try:
        version = model_version(settings.model)
    except ModelCardError as exc:
        fail(f"MELANOSCREEN_MODEL: {exc}")
    upgrade_schema(settings)
    sessions = make_session_factory(settings.database)

    def connect() -> Callable[[Sequence[int]], None]:
        broker = known_broker(settings)
        if broker is None:
            fail("MELANOSCREEN_BROKER_URL: not set, and no running `melanoscreen up` recorded one")
        producer = make_producer(broker, settings.visibility_timeout)
        return lambda batch: send_screen_batch(producer, batch)

    queued = queue_rescreen(sessions, selection, version=version, batch_size=settings.batch.size,
                            dry_run=dry_run, connect=connect)
    ids = queued.image_ids
    if dry_run or not ids:
        verb = "would be" if dry_run else "are"
        typer.echo(f"{len(ids)} screened image(s) {verb} re-screened with model {version}"
                   + ("" if ids else " (each matching image has a prediction by it)"))
        return
    typer.echo(f"queued {queued.queued} image(s) for model {version} in batches of "
               f"{settings.batch.size}", err=True)
    if not wait:
        return
    with typer.progressbar(length=len(ids), label="re-screening", file=sys.stderr) as bar:
        by_version = wait_for_rescreen(sessions, queued, bar.update)
    typer.echo(f"re-screened {by_version} of {len(ids)} image(s) with model {version}")
    if by_version < len(ids):
        typer.echo(f"{len(ids) - by_version} image(s) have no prediction by {version}: rejected, "
                   "failed, or the worker runs another model (restart it after changing "
                   "MELANOSCREEN_MODEL)", err=True)


def export(
    reviewed: Annotated[Path, typer.Option("--reviewed", help="The folder to write: a folder per "
                                           "diagnosis and reviewed.csv.")],
) -> None:
    """Write the reviewed images as a training set: a folder per diagnosis, plus a CSV."""
    settings = load_settings()
    from db.session import make_session_factory
    from service.export import export_reviewed

    upgrade_schema(settings)
    done = export_reviewed(make_session_factory(settings.database), reviewed)
    for folder, count in sorted(done.by_folder.items()):
        typer.echo(f"{folder:<28}{count:>6}")
    for why, count in sorted(done.skipped.items()):
        typer.echo(f"skipped ({why}): {count}", err=True)
    typer.echo(f"wrote {done.written} reviewed image(s) to {reviewed} and {done.table.name}")


def register(app: typer.Typer) -> None:
    """Add the clinic commands to the `melanoscreen` app."""
    app.command()(rescreen)
    app.command()(export)

"""A clinic's commands: `rescreen` (a new model version looks again at screened
images) and `export` (reviewed images as a folder-per-diagnosis training set)."""

from __future__ import annotations

import csv
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from melanoscreen.cli._common import csv_cell, fail, known_broker, load_settings, parse_when, upgrade_schema

if TYPE_CHECKING:
    from melanoscreen.settings import Settings

#: Where `export` puts a `refer` verdict that names no diagnosis: not one of the nine classes,
#: so training skips it unless told to count it as melanoma (`train --suspected-as-melanoma`).
SUSPECTED = "melanoma-suspected"
#: The export's table of what it wrote, one row per exported image.
EXPORT_CSV = "reviewed.csv"
EXPORT_COLUMNS = ("sha256", "source", "verdict", "diagnosis", "reviewer", "date", "file")


def current_model_version(settings: Settings) -> str:
    """The version in the card of MELANOSCREEN_MODEL (else the shipped model), without TensorFlow."""
    from model.card import ModelCard, card_path_for, shipped_model_path

    path = settings.model or shipped_model_path()
    try:
        return ModelCard.read(card_path_for(path)).version
    except (OSError, ValueError, KeyError) as exc:
        fail(f"MELANOSCREEN_MODEL: cannot read the model card of {path}: {exc}")


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
    from db import images, predictions
    from db.schema import ImageStatus, utcnow
    from db.session import make_session_factory
    from scheduler.queue import chunks, make_producer, send_screen_batch

    start, end = parse_when("--since", since), parse_when("--until", until)
    version = current_model_version(settings)
    upgrade_schema(settings)
    sessions = make_session_factory(settings.database)
    with sessions.begin() as session:
        ids = images.rescreen_candidates(session, model_version=version, since=start, until=end,
                                          source_prefix=source_prefix,
                                          only_unreviewed=only_unreviewed)
    if dry_run or not ids:
        verb = "would be" if dry_run else "are"
        typer.echo(f"{len(ids)} screened image(s) {verb} re-screened with model {version}"
                   + ("" if ids else " (each matching image has a prediction by it)"))
        return
    broker = known_broker(settings)
    if broker is None:
        fail("MELANOSCREEN_BROKER_URL: not set, and no running `melanoscreen up` recorded one")
    producer = make_producer(broker, settings.visibility_timeout)
    queued = 0
    # Committed before it is sent (commit, then enqueue): a lost message is found by the sweep.
    for batch in chunks(ids, settings.batch.size):
        with sessions.begin() as session:
            queued += images.queue_for_rescreen(session, batch, utcnow())
        send_screen_batch(producer, batch)
    typer.echo(f"queued {queued} image(s) for model {version} in batches of "
               f"{settings.batch.size}", err=True)
    if not wait:
        return
    waiting = (ImageStatus.QUEUED, ImageStatus.SCREENING)
    with typer.progressbar(length=len(ids), label="re-screening", file=sys.stderr) as bar:
        done = 0
        while done < len(ids):
            time.sleep(0.5)
            with sessions.begin() as session:
                left = images.count_in_status(session, ids, waiting)
            now_done = len(ids) - left
            bar.update(now_done - done)
            done = now_done
    with sessions.begin() as session:
        by_version = len(predictions.predicted_by(session, ids, version))
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
    from db import reviews
    from db.session import make_session_factory
    from model.data import ISIC_CLASSES

    upgrade_schema(settings)
    with make_session_factory(settings.database).begin() as session:
        images = reviews.reviewed_images(session)
        latest = reviews.latest_reviews(session, [image.id for image in images])
        found = [(image.sha256, image.source, image.location, latest[image.id])
                 for image in images if image.id in latest]
    reviewed.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    skipped: dict[str, int] = {}
    rows = []
    for sha256, source, location, review in found:
        diagnosis = review.diagnosis if review.diagnosis in ISIC_CLASSES else None
        if diagnosis is not None:
            folder = diagnosis
        elif review.verdict.value == "refer":
            folder = SUSPECTED
        else:
            why = f"{review.verdict.value} without a diagnosis"
            skipped[why] = skipped.get(why, 0) + 1
            continue
        stored = Path(location)
        if not stored.is_file():
            skipped["file missing from the store"] = skipped.get("file missing from the store", 0) + 1
            continue
        target = reviewed / folder / f"{sha256}{stored.suffix.lower()}"
        target.parent.mkdir(exist_ok=True)
        if not target.exists():
            partial = target.with_name(f".{target.name}.part")
            shutil.copyfile(stored, partial)
            partial.replace(target)
        # A later review that changed the diagnosis: the image lives in one folder only.
        for other in reviewed.glob(f"*/{sha256}.*"):
            if other != target:
                other.unlink()
        counts[folder] = counts.get(folder, 0) + 1
        rows.append({"sha256": sha256, "source": source, "verdict": review.verdict.value,
                     "diagnosis": review.diagnosis or "", "reviewer": review.reviewer,
                     "date": review.created_at.isoformat(),
                     "file": str(target.relative_to(reviewed))})
    table = reviewed / EXPORT_CSV
    partial_table = table.with_name(f".{table.name}.part")
    with partial_table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(EXPORT_COLUMNS))
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    partial_table.replace(table)
    for folder, count in sorted(counts.items()):
        typer.echo(f"{folder:<28}{count:>6}")
    for why, count in sorted(skipped.items()):
        typer.echo(f"skipped ({why}): {count}", err=True)
    typer.echo(f"wrote {len(rows)} reviewed image(s) to {reviewed} and {table.name}")


def register(app: typer.Typer) -> None:
    """Add the clinic commands to the `melanoscreen` app."""
    app.command()(rescreen)
    app.command()(export)

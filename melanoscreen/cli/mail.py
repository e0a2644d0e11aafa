"""The mail commands: `digest` (print, preview or send one) and `alerts retry`."""

from __future__ import annotations

import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from melanoscreen.cli._common import fail, known_broker, load_settings, parse_option, upgrade_schema

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from melanoscreen.settings import Settings

alerts_app = typer.Typer(help="Alert emails: re-queue the ones that failed.", no_args_is_help=True)


def _digest_day(settings: Settings, value: str | None) -> date:
    """The --date given (not in the future), else the latest digest due now."""
    from zoneinfo import ZoneInfo

    from db.schema import utcnow
    from service.digests import digest_due_dates

    at = settings.digest.time
    latest = digest_due_dates(None, utcnow(), at, ZoneInfo(settings.timezone))[-1]
    if value is None:
        return latest
    day = parse_option("--date", value, date.fromisoformat, "a date (YYYY-MM-DD)")
    if day > latest:
        fail(f"--date: the digest of {day} is not due yet (the latest due is {latest}, "
             f"at {at:%H:%M} {settings.timezone})")
    return day


def digest(
    day: Annotated[str | None, typer.Option("--date", help="The digest's date, YYYY-MM-DD "
                                            "(default: the latest one due).")] = None,
    today: Annotated[bool, typer.Option("--today", help="The period running now, so far (the "
                                        "digest it will become; shown, not sent).")] = False,
    send: Annotated[bool, typer.Option("--send", help="Send it now to "
                                       "MELANOSCREEN_ALERT_RECIPIENTS (once per date).")] = False,
    preview: Annotated[Path | None, typer.Option("--preview", help="Write it as a standalone "
                                                 "HTML file instead of sending.")] = None,
) -> None:
    """Print the digest of a day, write it as HTML (--preview FILE.html), or send it (--send)."""
    if send and preview is not None:
        fail("--send and --preview exclude each other")
    if today and (send or day is not None):
        fail("--today: the period so far can be shown or previewed, not sent or given a --date")
    settings = load_settings()
    from db.session import make_session_factory
    from service.digest_message import render_digest_html, render_digest_text
    from service.digests import build_digest_content

    when = _digest_day(settings, day) + timedelta(days=1 if today else 0)
    upgrade_schema(settings)
    sessions = make_session_factory(settings.database)
    if not send:
        with sessions.begin() as session:
            content = build_digest_content(session, when, settings.digest.time, settings.timezone,
                                           settings.model, settings.public_url)
        if preview is None:
            typer.echo(render_digest_text(content))
            return
        preview.parent.mkdir(parents=True, exist_ok=True)
        preview.write_text(render_digest_html(content, inline_images="data"), encoding="utf-8")
        typer.echo(f"wrote {preview} (digest of {when}: {content.screened} screened, "
                   f"{content.flagged} flagged)")
        return
    _send_digest(settings, sessions, when)


def _send_digest(settings: Settings, sessions: sessionmaker[Session], when: date) -> None:
    from db.schema import utcnow
    from service.delivery import deliver_outbox
    from service.digests import take_and_write_digest

    if not settings.alert.anyone:
        fail("MELANOSCREEN_ALERT_RECIPIENTS: empty, so there is nobody to send the digest to")
    ids = take_and_write_digest(sessions, settings, when, utcnow())
    if ids is None:
        fail(f"the digest of {when} was already sent (each date goes out once)")
    unsent = 0
    for outbox_id in ids:
        outcome = deliver_outbox(sessions, outbox_id, token=uuid.uuid4().hex, settings=settings)
        if outcome.status != "sent":
            unsent += 1
        typer.echo(f"digest {when} (outbox {outbox_id}): {outcome.status}"
                   + (f": {outcome.detail}" if outcome.status != "sent" else ""))
    if unsent:
        typer.echo("messages left pending are retried by the worker's sweep; failed ones with "
                   "`melanoscreen alerts retry --digests`", err=True)
        raise typer.Exit(1)


@alerts_app.command("retry")
def retry(
    digests: Annotated[bool, typer.Option("--digests", help="Also re-queue failed digest "
                                          "messages.")] = False,
) -> None:
    """Re-queue failed alerts: a fresh set of delivery attempts, sent by the worker."""
    settings = load_settings()
    from db import outbox
    from db.schema import OutboxKind, utcnow
    from db.session import make_session_factory

    upgrade_schema(settings)
    kinds = (OutboxKind.ALERT, OutboxKind.DIGEST) if digests else (OutboxKind.ALERT,)
    with make_session_factory(settings.database).begin() as session:
        ids = outbox.requeue_failed(session, now=utcnow(), kinds=kinds)
    if not ids:
        typer.echo("no failed alerts")
        return
    broker = known_broker(settings)
    if broker:
        from scheduler.queue import make_producer, send_deliver_message

        producer = make_producer(broker, settings.visibility_timeout)
        try:
            for outbox_id in ids:
                send_deliver_message(producer, outbox_id)
        except Exception as exc:  # the broker is down: the sweep still finds the rows
            typer.echo(f"could not reach the broker ({exc}); the worker's sweep will send them",
                       err=True)
        finally:
            producer.close()
    else:
        typer.echo("no broker known: the worker's sweep will send them", err=True)
    typer.echo(f"re-queued {len(ids)} message(s)")


def register(app: typer.Typer) -> None:
    """Add `digest` and `alerts` to the `melanoscreen` app."""
    app.command()(digest)
    app.add_typer(alerts_app, name="alerts")

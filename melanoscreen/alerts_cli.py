"""The mail commands: `digest` (print, preview or send one) and `alerts retry`."""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from melanoscreen.service_cli import BROKER_FILE, _fail, _settings, _upgrade

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from melanoscreen.settings import Settings

alerts_app = typer.Typer(help="Alert emails: re-queue the ones that failed.", no_args_is_help=True)


def _digest_day(settings: Settings, value: str | None) -> date:
    """The --date given (not in the future), else the latest digest due now."""
    from zoneinfo import ZoneInfo

    from db.schema import utcnow
    from scheduler.digest import digest_due_dates

    latest = digest_due_dates(None, utcnow(), settings.digest_time, ZoneInfo(settings.timezone))[-1]
    if value is None:
        return latest
    try:
        day = date.fromisoformat(value)
    except ValueError:
        _fail(f"--date: not a date (YYYY-MM-DD): {value!r}")
        raise
    if day > latest:
        _fail(f"--date: the digest of {day} is not due yet (the latest due is {latest}, "
              f"at {settings.digest_time:%H:%M} {settings.timezone})")
    return day


def digest(
    day: Annotated[str | None, typer.Option("--date", help="The digest's date, YYYY-MM-DD "
                                            "(default: the latest one due).")] = None,
    send: Annotated[bool, typer.Option("--send", help="Send it now to "
                                       "MELANOSCREEN_ALERT_RECIPIENTS (once per date).")] = False,
    preview: Annotated[Path | None, typer.Option("--preview", help="Write it as a standalone "
                                                 "HTML file instead of sending.")] = None,
) -> None:
    """Print the digest of a day, write it as HTML (--preview FILE.html), or send it (--send)."""
    if send and preview is not None:
        _fail("--send and --preview exclude each other")
    settings = _settings()
    from db.session import make_session_factory
    from scheduler.digest import render_digest_html, render_digest_text
    from scheduler.digest_job import build_digest_content

    when = _digest_day(settings, day)
    _upgrade(settings)
    sessions = make_session_factory(settings.database)
    if not send:
        with sessions.begin() as session:
            content = build_digest_content(session, when, settings.digest_time, settings.timezone)
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
    from scheduler.digest_job import DigestJobConfig, take_and_write_digest
    from worker.delivery import DeliveryOptions, deliver_outbox

    factory = sessions
    if not settings.alert_recipients:
        _fail("MELANOSCREEN_ALERT_RECIPIENTS: empty, so there is nobody to send the digest to")
    config = DigestJobConfig(database_url=settings.database,
                             recipients=tuple(settings.alert_recipients),
                             digest_time=settings.digest_time, timezone=settings.timezone,
                             sender=settings.smtp_sender)
    ids = take_and_write_digest(factory, config, when, utcnow())
    if ids is None:
        _fail(f"the digest of {when} was already sent (each date goes out once)")
        return
    options = DeliveryOptions(smtp=settings.smtp_config(),
                              outbox_dir=settings.data_dir.absolute() / "outbox",
                              timezone=settings.timezone,
                              max_attempts=settings.alert_max_attempts,
                              retry_base=settings.alert_retry_base,
                              stale_after=settings.sweep_limit)
    unsent = 0
    for outbox_id in ids:
        outcome = deliver_outbox(factory, outbox_id, token=uuid.uuid4().hex, options=options)
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
    settings = _settings()
    from db import outbox
    from db.schema import utcnow
    from db.session import make_session_factory

    _upgrade(settings)
    kinds = ("alert", "digest") if digests else ("alert",)
    with make_session_factory(settings.database).begin() as session:
        ids = outbox.requeue_failed(session, now=utcnow(), kinds=kinds)
    if not ids:
        typer.echo("no failed alerts")
        return
    broker = settings.broker_url
    recorded = settings.data_dir / BROKER_FILE
    if not broker and recorded.is_file():
        broker = recorded.read_text().strip()
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

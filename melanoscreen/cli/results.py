"""The reading commands: `status` (counts, queue, alerts, the last digest) and `results`
(every image with its latest prediction, as a table, CSV or JSON)."""

from __future__ import annotations

import csv
import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from melanoscreen.cli._common import (
    existing_data_folder,
    fail,
    known_broker,
    load_settings,
    parse_when,
    upgrade_schema,
)
from melanoscreen.text import csv_cell, printable

if TYPE_CHECKING:
    from melanoscreen.settings import Settings


def _queue_length(broker: str | None) -> int | None:
    if not broker or not broker.startswith(("redis://", "rediss://")):
        return None
    import redis

    from melanoscreen.celeryconfig import QUEUE

    try:
        client = redis.Redis.from_url(broker, socket_connect_timeout=1, socket_timeout=1)
        return int(client.llen(QUEUE))
    except redis.RedisError:
        return None


def service_recipients(settings: Settings) -> dict[str, Any]:
    """Who alerts go to as the running worker sees them (what it recorded at its start), else
    as this shell's settings say, with where the answer came from."""
    try:
        recorded = json.loads(settings.recipients_file.read_text())
        recipients, routes = list(recorded["recipients"]), dict(recorded["routes"])
        return {"recipients": recipients, "routes": routes, "from": "service",
                "recorded_at": recorded.get("recorded_at")}
    except (OSError, ValueError, KeyError, TypeError):
        return {"recipients": list(settings.alert.recipients), "routes": dict(settings.alert.routes),
                "from": "this shell", "recorded_at": None}


def status(json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
           = False) -> None:
    """Images per state, flagged, queue length, alerts pending/sent/failed, the last digest."""
    settings = load_settings()
    from db import digests, images, outbox, reviews
    from db.schema import ImageStatus, OutboxKind
    from db.session import make_session_factory

    data_dir = existing_data_folder(settings)
    upgrade_schema(settings)
    with make_session_factory(settings.database).begin() as session:
        counts = images.status_counts(session)
        flagged = images.flagged_count(session)
        unreviewed = reviews.unreviewed_flagged_count(session)
        out_of_scope = images.out_of_scope_count(session)
        duplicates = images.duplicate_count(session)
        alerts = outbox.outbox_counts(session, OutboxKind.ALERT)
        digest_messages = outbox.outbox_counts(session, OutboxKind.DIGEST)
        last = digests.last_digest(session)
    last_digest: dict[str, Any] | None = None if last is None else {
        "date": last.day.isoformat(), "created_at": last.created_at.isoformat(),
        "recipients": last.recipients}
    told = service_recipients(settings)
    report: dict[str, Any] = {
        "counts": counts, "flagged": flagged, "queue_length": _queue_length(known_broker(settings)),
        "duplicates": duplicates, "alerts": alerts, "digest_messages": digest_messages,
        "last_digest": last_digest, "alert_recipients": len(told["recipients"]),
        "alert_recipient_addresses": told["recipients"], "alert_routes": told["routes"],
        "alert_recipients_from": told["from"],
        "out_of_scope": out_of_scope, "unreviewed_flagged": unreviewed, "data_dir": str(data_dir)}
    if json_output:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"data folder: {data_dir}")
    for name in (status.value for status in ImageStatus):
        typer.echo(f"{name:<10}{counts.get(name, 0):>8}")
    typer.echo(f"{'flagged':<10}{flagged:>8}  ({unreviewed} not reviewed)")
    typer.echo(f"{'off-scope':<10}{out_of_scope:>8}  (unlike the images the model learnt from; "
               "alerted as unusual pictures when they reach the threshold)")
    typer.echo(f"{'duplicate':<10}{duplicates:>8}")
    queue = report["queue_length"]
    typer.echo(f"{'in queue':<10}{'unknown' if queue is None else queue:>8}")
    typer.echo("alerts    " + "  ".join(f"{k} {v}" for k, v in alerts.items()))
    where = ("as the worker recorded at its start" + (f" ({told['recorded_at']})"
                                                     if told["recorded_at"] else "")
             if told["from"] == "service"
             else "from this shell's settings: no worker has recorded its own yet")
    if told["recipients"] or told["routes"]:
        addresses = ", ".join(printable(a) for a in told["recipients"]) or "none besides the routes"
        typer.echo(f"recipients {len(told['recipients'])}: {addresses}  ({where})")
        for prefix, routed in told["routes"].items():
            typer.echo(f"  route {printable(prefix)} -> {', '.join(printable(a) for a in routed)}")
    else:
        typer.echo(f"recipients none: flagged images are recorded, nobody is emailed  ({where})")
    if last_digest is None:
        typer.echo("last digest: none yet")
    else:
        typer.echo(f"last digest: {last_digest['date']} (written {last_digest['created_at'][:19]}, "
                   f"{last_digest['recipients']} recipient(s))")


def results(
    since: Annotated[str | None, typer.Option(help="Only images received at or after this ISO "
                                              "date/time (UTC unless it says otherwise).")] = None,
    flagged: Annotated[bool, typer.Option("--flagged", help="Only flagged images.")] = False,
    output_format: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Every image with its status and prediction."""
    if output_format not in ("table", "csv", "json"):
        fail("--format must be table, csv or json")
    settings = load_settings()

    from db import readmodel
    from db.session import make_session_factory

    when = parse_when("--since", since)
    data_dir = existing_data_folder(settings)
    upgrade_schema(settings)
    with make_session_factory(settings.database).begin() as session:
        found = readmodel.results(session, since=when, flagged_only=flagged)
    rows = [row.to_json() for row in found]
    if output_format != "json":
        from model.scores import probability_text
        from service.flags import UNUSUAL_PICTURE
        from service.reasons import plain_reason

        # Written, not raw: p never reads like the threshold it was judged against (JSON keeps
        # the floats). The CSV keeps a digit more than the table.
        digits = 4 if output_format == "csv" else 3
        for row, result in zip(rows, found, strict=True):
            if result.melanoma_probability is not None:
                row["melanoma_probability"] = probability_text(
                    result.melanoma_probability, result.threshold, digits=digits)
            if result.reason:  # for people: plain words (the JSON keeps the recorded reason)
                row["reason"] = plain_reason(result.reason)
    if output_format == "json":
        typer.echo(json.dumps(rows, indent=2))  # control characters come out as \u escapes
    elif output_format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(readmodel.RESULT_COLUMNS))
        writer.writeheader()
        for row in rows:
            # One cell for the latest review: its verdict (the JSON has the whole review).
            row["review"] = row["review"]["verdict"] if row["review"] else ""
            row["model_versions"] = " ".join(row["model_versions"])
        writer.writerows({key: csv_cell(value) for key, value in row.items()} for row in rows)
    else:
        from zoneinfo import ZoneInfo

        zone = ZoneInfo(settings.timezone)
        typer.echo(f"data folder: {data_dir}")  # the machine formats stay pure CSV and JSON
        typer.echo(f"{'received':<25} {'status':<10} {'class':<26} {'p(mel)':>7}  source")
        for row, result in zip(rows, found, strict=True):
            p = row["melanoma_probability"]
            mark = ("" if not (row["flagged"] or row["out_of_scope"]) else
                    f"  ALERT ({UNUSUAL_PICTURE})" if row["flagged"] and row["out_of_scope"] else
                    "  ALERT" if row["flagged"] else
                    "  OUT OF SCOPE (unlike the images the model learnt from)")
            if row["flag_changed"]:
                mark += "  (flag changed by re-screen)"
            if row["reason"]:  # whole, after the name: it can be longer than a column
                mark += f"  {printable(row['reason'])}"
            received = result.received_at.astimezone(zone).isoformat(timespec="seconds")
            detail = printable(row["predicted_class"] or "")
            typer.echo(f"{received:<25} {row['status']:<10} {detail[:26]:<26} "
                       f"{p or '':>7}  {printable(row['source'])}{mark}")


def register(app: typer.Typer) -> None:
    """Add `status` and `results` to the `melanoscreen` app."""
    for command in (status, results):
        app.command()(command)

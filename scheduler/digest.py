"""The nightly digest: which days are owed, which window each covers, and the email itself.

Pure: plain data in, strings and `EmailMessage` out; no settings, database or model imports.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage
from typing import Literal
from zoneinfo import ZoneInfo

from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

THUMBNAIL_PX = 96  # digest rows are small; the alert email carries the large image
MAX_THUMBNAILS = 60  # beyond this the rows stay, without pictures, to keep the email light
DISCLAIMER = (
    "MelanoScreen is a screening aid, not a diagnosis: a dermatologist must examine every flagged lesion."
)


@dataclass(frozen=True)
class DigestImage:
    """One flagged image in the digest."""

    source: str
    melanoma_probability: float
    predicted_class: str
    received_at: datetime  # aware; a naive value is taken as UTC
    thumbnail: bytes | None = None  # any format Pillow reads; shrunk to THUMBNAIL_PX


@dataclass(frozen=True)
class FileProblem:
    """A file that was rejected (not a readable image) or whose screening failed."""

    source: str
    reason: str


@dataclass(frozen=True)
class UndeliveredAlert:
    """An alert email that has not reached its recipients (yet)."""

    subject: str
    reason: str
    recipients: tuple[str, ...] = ()
    attempts: int = 0


@dataclass(frozen=True)
class DigestContent:
    """Everything one digest says, for the window [period_start, period_end)."""

    day: date  # the local date on which the digest is due
    period_start: datetime  # aware
    period_end: datetime  # aware
    timezone: str
    screened: int
    flagged: int
    rejected: int
    failed: int
    flagged_images: Sequence[DigestImage] = ()
    rejected_files: Sequence[FileProblem] = ()
    failed_files: Sequence[FileProblem] = ()
    undelivered_alerts: Sequence[UndeliveredAlert] = ()
    model_version: str | None = None
    threshold: float | None = None
    extra: dict[str, str] = field(default_factory=dict)  # label -> value, shown in the footer


def _instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of local wall-clock `day` `at`.

    A time skipped by a spring-forward gap is read with the offset before the gap, so 02:30
    becomes 03:30 (zoneinfo's fold=0); a time repeated on a fall-back night means its first
    occurrence.
    """
    return datetime.combine(day, at.replace(tzinfo=None), tzinfo=tz).astimezone(UTC)


def digest_period(day: date, digest_time: time, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC window the digest of `day` covers: the day before at digest time, to `day` at it."""
    return _instant(day - timedelta(days=1), digest_time, tz), _instant(day, digest_time, tz)


def digest_due_dates(last_sent: date | None, now: datetime, digest_time: time, tz: ZoneInfo) -> list[date]:
    """The digest dates owed at `now`, oldest first: missed days are caught up, none is doubled.

    Works on local calendar dates, so a 23- or 25-hour day neither skips nor repeats a digest.
    With nothing sent yet, only the latest due digest is owed.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    today = now.astimezone(tz).date()
    latest = today if now >= _instant(today, digest_time, tz) else today - timedelta(days=1)
    if last_sent is None:
        return [latest]
    return [last_sent + timedelta(days=n) for n in range(1, (latest - last_sent).days + 1)]


def digest_subject(content: DigestContent) -> str:
    """`MelanoScreen digest DATE: N flagged of M screened`, or `nothing flagged (M screened)`."""
    head = f"MelanoScreen digest {content.day.isoformat()}"
    if content.flagged:
        subject = f"{head}: {content.flagged} flagged of {content.screened} screened"
    else:
        subject = f"{head}: nothing flagged ({content.screened} screened)"
    if content.undelivered_alerts:
        count = len(content.undelivered_alerts)
        subject += f", {count} alert{'s' if count != 1 else ''} NOT delivered"
    return subject


def _local(moment: datetime, tz_name: str, fmt: str = "%Y-%m-%d %H:%M") -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(ZoneInfo(tz_name)).strftime(fmt)


def _ranked(content: DigestContent) -> list[DigestImage]:
    return sorted(content.flagged_images, key=lambda i: i.melanoma_probability, reverse=True)


def _period_text(content: DigestContent) -> str:
    start = _local(content.period_start, content.timezone)
    end = _local(content.period_end, content.timezone)
    return f"{start} to {end} ({content.timezone})"


def _shrink(data: bytes) -> bytes | None:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=80)
            return out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        logger.warning("cannot make a digest thumbnail: %s", exc)
        return None


def _thumbnails(content: DigestContent) -> list[tuple[str, bytes] | None]:
    """(content-id, JPEG bytes) per ranked flagged image, or None where there is no picture."""
    result: list[tuple[str, bytes] | None] = []
    for number, item in enumerate(_ranked(content), start=1):
        jpeg = _shrink(item.thumbnail) if item.thumbnail and number <= MAX_THUMBNAILS else None
        cid = f"thumb{number}.digest-{content.day.isoformat()}@melanoscreen.invalid"
        result.append((cid, jpeg) if jpeg else None)
    return result


_FONT = "font-family:Arial,Helvetica,sans-serif;"
_TH = f"{_FONT}font-size:12px;color:#6b7280;text-align:left;padding:6px 8px;"
_TD = f"{_FONT}font-size:13px;color:#111827;padding:6px 8px;border-top:1px solid #e5e7eb;"


def _section(title: str, body: str) -> str:
    return (
        f'<tr><td style="padding:18px 24px 4px 24px;{_FONT}font-size:16px;font-weight:bold;'
        f'color:#111827;">{html.escape(title)}</td></tr>'
        f'<tr><td style="padding:0 24px 8px 24px;">{body}</td></tr>'
    )


def _table(head: Sequence[str], rows: Sequence[str]) -> str:
    header = "".join(f'<th style="{_TH}">{html.escape(h)}</th>' for h in head)
    return (
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0" '
        f'style="border-collapse:collapse;"><tr>{header}</tr>{"".join(rows)}</table>'
    )


def _count_cell(label: str, value: int, alarm: bool) -> str:
    colour = "#b91c1c" if alarm and value else "#111827"
    return (
        f'<td width="25%" style="padding:12px 8px;text-align:center;background:#f9fafb;'
        f'border:1px solid #e5e7eb;">'
        f'<div style="{_FONT}font-size:26px;font-weight:bold;color:{colour};">{value}</div>'
        f'<div style="{_FONT}font-size:12px;color:#6b7280;">{html.escape(label)}</div></td>'
    )


def render_digest_html(content: DigestContent, inline_images: Literal["cid", "data"] = "cid") -> str:
    """The digest as email-safe HTML: tables and inline CSS; thumbnails by cid: or data: URI."""
    if inline_images not in ("cid", "data"):
        raise ValueError("inline_images must be 'cid' or 'data'")
    esc = html.escape
    parts: list[str] = []

    if content.undelivered_alerts:
        count = len(content.undelivered_alerts)
        parts.append(
            '<tr><td style="padding:12px 24px 0 24px;"><div style="background:#fef2f2;'
            f'border:1px solid #b91c1c;padding:10px 12px;{_FONT}font-size:14px;color:#7f1d1d;">'
            f"<strong>{count} alert email{'s' if count != 1 else ''} could not be delivered."
            "</strong> The images concerned are listed below; please review them here.</div>"
            "</td></tr>"
        )

    parts.append(
        '<tr><td style="padding:16px 24px 4px 24px;">'
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="6"><tr>'
        + _count_cell("screened", content.screened, False)
        + _count_cell("flagged", content.flagged, True)
        + _count_cell("rejected", content.rejected, False)
        + _count_cell("failed", content.failed, True)
        + "</tr></table></td></tr>"
    )

    ranked = _ranked(content)
    if ranked:
        rows = []
        for item, thumb in zip(ranked, _thumbnails(content), strict=True):
            if thumb is None:
                picture = f'<span style="{_FONT}font-size:11px;color:#9ca3af;">no preview</span>'
            else:
                cid, jpeg = thumb
                src = (
                    f"cid:{cid}"
                    if inline_images == "cid"
                    else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
                )
                picture = (
                    f'<img src="{esc(src)}" width="{THUMBNAIL_PX}" alt="lesion" '
                    'style="display:block;border:0;border-radius:4px;">'
                )
            rows.append(
                f'<tr><td style="{_TD}width:{THUMBNAIL_PX + 16}px;">{picture}</td>'
                f'<td style="{_TD}overflow-wrap:anywhere;word-break:break-word;">{esc(item.source)}</td>'
                f'<td style="{_TD}font-weight:bold;color:#b91c1c;text-align:right;">'
                f"{item.melanoma_probability:.3f}</td>"
                f'<td style="{_TD}">{esc(item.predicted_class)}</td>'
                f'<td style="{_TD}white-space:nowrap;">'
                f"{esc(_local(item.received_at, content.timezone))}</td></tr>"
            )
        parts.append(
            _section(
                f"Flagged images ({len(ranked)})",
                _table(["", "image", "p(melanoma)", "predicted class", "received"], rows),
            )
        )
    else:
        parts.append(
            _section(
                "Flagged images",
                f'<p style="{_FONT}font-size:14px;color:#065f46;margin:4px 0;">'
                "Nothing was flagged in this period.</p>",
            )
        )

    if content.undelivered_alerts:
        rows = [
            f'<tr><td style="{_TD}">{esc(a.subject)}</td><td style="{_TD}">{esc(a.reason)}</td>'
            f'<td style="{_TD}text-align:right;">{a.attempts}</td></tr>'
            for a in content.undelivered_alerts
        ]
        parts.append(_section("Undelivered alerts", _table(["alert", "reason", "attempts"], rows)))

    for title, problems in (
        ("Rejected files", content.rejected_files),
        ("Failed screenings", content.failed_files),
    ):
        if problems:
            rows = [
                f'<tr><td style="{_TD}overflow-wrap:anywhere;word-break:break-word;">{esc(p.source)}</td>'
                f'<td style="{_TD}">{esc(p.reason)}</td></tr>'
                for p in problems
            ]
            parts.append(_section(f"{title} ({len(problems)})", _table(["file", "reason"], rows)))

    footer = [f"Period: {_period_text(content)}"]
    if content.model_version:
        footer.append(f"Model version: {content.model_version}")
    if content.threshold is not None:
        footer.append(f"Alert threshold: {content.threshold:.2f}")
    footer += [f"{label}: {value}" for label, value in content.extra.items()]
    footer_html = "<br>".join(esc(line) for line in footer)

    title = f"MelanoScreen digest {content.day.isoformat()}"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title></head>"
        '<body style="margin:0;padding:0;background:#f3f4f6;">'
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0" '
        'style="background:#f3f4f6;"><tr><td align="center" style="padding:24px 8px;">'
        '<table role="presentation" width="680" cellpadding="0" cellspacing="0" '
        'style="max-width:680px;width:100%;background:#ffffff;border:1px solid #e5e7eb;">'
        f'<tr><td style="background:#1f2937;padding:16px 24px;{_FONT}color:#ffffff;">'
        '<div style="font-size:20px;font-weight:bold;">MelanoScreen daily digest</div>'
        f'<div style="font-size:13px;color:#d1d5db;margin-top:4px;">'
        f"{esc(content.day.strftime('%A %d %B %Y'))} &middot; {esc(_period_text(content))}"
        "</div></td></tr>"
        + "".join(parts)
        + f'<tr><td style="padding:16px 24px 20px 24px;{_FONT}font-size:12px;color:#6b7280;'
        f'border-top:1px solid #e5e7eb;">{footer_html}<br><br><em>{esc(DISCLAIMER)}</em>'
        "</td></tr></table></td></tr></table></body></html>"
    )


def render_digest_text(content: DigestContent) -> str:
    """The digest as plain text, the alternative to the HTML part."""
    lines = [
        f"MelanoScreen daily digest {content.day.isoformat()}",
        f"Period: {_period_text(content)}",
        "",
        f"Screened: {content.screened}   Flagged: {content.flagged}   "
        f"Rejected: {content.rejected}   Failed: {content.failed}",
        "",
    ]
    if content.undelivered_alerts:
        lines.append(f"WARNING: {len(content.undelivered_alerts)} alert email(s) NOT delivered:")
        lines += [f"  - {a.subject}: {a.reason} ({a.attempts} attempts)" for a in content.undelivered_alerts]
        lines.append("")
    ranked = _ranked(content)
    if ranked:
        lines.append(f"Flagged images ({len(ranked)}), highest melanoma probability first:")
        lines += [
            f"  {i.melanoma_probability:.3f}  {i.source}  ({i.predicted_class}, received "
            f"{_local(i.received_at, content.timezone)})"
            for i in ranked
        ]
    else:
        lines.append("Nothing was flagged in this period.")
    for title, problems in (
        ("Rejected files", content.rejected_files),
        ("Failed screenings", content.failed_files),
    ):
        if problems:
            lines += ["", f"{title} ({len(problems)}):"]
            lines += [f"  - {p.source}: {p.reason}" for p in problems]
    lines.append("")
    if content.model_version:
        lines.append(f"Model version: {content.model_version}")
    if content.threshold is not None:
        lines.append(f"Alert threshold: {content.threshold:.2f}")
    lines += [f"{label}: {value}" for label, value in content.extra.items()]
    lines += ["", DISCLAIMER, ""]
    return "\n".join(lines)


def digest_message_id(day: date, domain: str = "melanoscreen.invalid") -> str:
    """The stable Message-ID of the digest of `day`: a resend carries the same one."""
    return f"<digest-{day.isoformat()}@{domain}>"


def compose_digest(
    content: DigestContent,
    *,
    message_id: str,
    sender: str | None = None,
    recipients: Sequence[str] = (),
) -> EmailMessage:
    """Build the digest email: text and HTML alternatives, thumbnails inline by cid."""
    message_id = message_id.strip()
    if not message_id.startswith("<"):
        message_id = f"<{message_id}>"
    if not re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", message_id):
        raise ValueError(f"not a valid Message-ID: {message_id!r}")

    message = EmailMessage()
    message["Subject"] = digest_subject(content)
    message["Message-ID"] = message_id
    if sender:
        message["From"] = sender
    if recipients:
        message["To"] = ", ".join(recipients)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(render_digest_text(content))
    message.add_alternative(render_digest_html(content, inline_images="cid"), subtype="html")
    html_part = message.get_body(preferencelist=("html",))
    assert isinstance(html_part, EmailMessage)
    for number, thumb in enumerate(_thumbnails(content), start=1):
        if thumb is not None:
            cid, jpeg = thumb
            html_part.add_related(
                jpeg,
                maintype="image",
                subtype="jpeg",
                cid=f"<{cid}>",
                filename=f"flagged{number}.jpg",
                disposition="inline",
            )
    return message

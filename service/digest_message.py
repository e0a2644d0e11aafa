"""What the nightly digest email says: the day's counts, flagged images, problems and
reminders, composed into the bytes that are sent (or a standalone HTML page). Pure: plain data
in, `ComposedMessage` out (the shared assembly is `service.messages`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from service.flags import UNUSUAL_PICTURE
from service.messages import DOMAIN, ComposedMessage, assemble, inline_image, local_time, render

DIGEST_THUMBNAIL_PX = 96  # digest rows are small
MAX_DIGEST_THUMBNAILS = 60  # beyond this the rows stay, without pictures, to keep the email light


def digest_key(day: date) -> str:
    """The key of the digest of `day`: its copies' Message-IDs derive from it."""
    return f"digest-{day.isoformat()}"


@dataclass(frozen=True)
class DigestImage:
    """One flagged image in the digest."""

    source: str
    melanoma_probability: float
    predicted_class: str
    received_at: datetime  # aware; a naive value is taken as UTC
    thumbnail: bytes | None = None  # any format Pillow reads; shrunk to DIGEST_THUMBNAIL_PX
    threshold: float | None = None  # the threshold it was flagged against
    url: str | None = None  # its case page in the review app, when MELANOSCREEN_PUBLIC_URL is set
    unusual: bool = False  # out of scope: an unusual picture that needs a look
    verdict: str | None = None  # the latest review's verdict ("benign"); None: not reviewed yet
    reviewer: str | None = None  # who gave that verdict


@dataclass(frozen=True)
class UnreviewedImage:
    """A flagged image nobody has reviewed for more than a day: the digest lists these first."""

    source: str
    melanoma_probability: float
    threshold: float | None
    screened_at: datetime  # aware
    url: str | None = None  # its case page, when MELANOSCREEN_PUBLIC_URL is set


@dataclass(frozen=True)
class OutOfScopeImage:
    """A screened image unlike the images the model learnt from: listed apart (and alerted as an
    unusual picture when it reached the threshold)."""

    source: str
    received_at: datetime  # aware; a naive value is taken as UTC


@dataclass(frozen=True)
class FileProblem:
    """A file that was rejected (not a readable image) or whose screening failed."""

    source: str
    reason: str


@dataclass(frozen=True)
class UndeliveredAlert:
    """An alert email that has not reached its recipient (yet)."""

    subject: str
    reason: str
    attempts: int = 0


@dataclass(frozen=True)
class LostFlag:
    """An image the version before flagged and a re-screen with a newer one does not."""

    source: str
    melanoma_probability: float  # the new version's
    model_version: str
    earlier_probability: float
    earlier_version: str
    url: str | None = None  # its case page, when MELANOSCREEN_PUBLIC_URL is set


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
    out_of_scope_images: Sequence[OutOfScopeImage] = ()
    threshold_meaning: str | None = None  # as in `AlertContent`
    #: Flagged images still unreviewed 24 h after they were screened (any day), listed at the top.
    unreviewed_images: Sequence[UnreviewedImage] = ()
    #: Images a re-screen in this period no longer flags though the version before did.
    lost_flags: Sequence[LostFlag] = ()


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


def review_state(item: DigestImage) -> str:
    """`reviewed: benign by dr.lee`, or `not reviewed yet`."""
    if item.verdict is None:
        return "not reviewed yet"
    return f"reviewed: {item.verdict.replace('_', ' ')} by {item.reviewer}"


def _digest_context(content: DigestContent) -> dict[str, Any]:
    ranked = sorted(content.flagged_images, key=lambda i: i.melanoma_probability, reverse=True)
    base = f"{digest_key(content.day)}@{DOMAIN}"
    rows = [{"item": item, "review": review_state(item),
             "received": local_time(item.received_at, content.timezone, with_zone=False),
             "thumbnail": inline_image(item.thumbnail, DIGEST_THUMBNAIL_PX, base, f"thumb{number}")
             if number <= MAX_DIGEST_THUMBNAILS else None}
            for number, item in enumerate(ranked, start=1)]
    out_of_scope = [{"item": item, "received": local_time(item.received_at, content.timezone,
                                                           with_zone=False)}
                    for item in content.out_of_scope_images]
    unreviewed = [{"item": item, "screened": local_time(item.screened_at, content.timezone,
                                                        with_zone=False)}
                  for item in content.unreviewed_images]
    start = local_time(content.period_start, content.timezone, with_zone=False)
    end = local_time(content.period_end, content.timezone, with_zone=False)
    return {"digest": content, "rows": rows, "out_of_scope": out_of_scope, "unusual": UNUSUAL_PICTURE,
            "unreviewed": unreviewed,
            "period": f"{start} to {end} ({content.timezone})",
            # The window, not the due date: the digest due Saturday 07:00 covers Friday 07:00 on.
            "covers": f"{_long_time(content.period_start, content.timezone)} to "
                      f"{_long_time(content.period_end, content.timezone)}",
            "counts": [("screened", content.screened, False), ("flagged", content.flagged, True),
                       ("rejected", content.rejected, False), ("failed", content.failed, True)],
            "problems": [(title, problems) for title, problems in
                         (("Rejected files", content.rejected_files),
                          ("Failed screenings", content.failed_files)) if problems]}


def _long_time(moment: datetime, tz_name: str) -> str:
    """`Friday 04 December 2026 07:00` on the clinic's clock (a naive value is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(ZoneInfo(tz_name)).strftime("%A %d %B %Y %H:%M")


def render_digest_text(content: DigestContent) -> str:
    """The digest as plain text, the alternative to the HTML part."""
    return render("digest.txt", **_digest_context(content))


def render_digest_html(content: DigestContent, inline_images: Literal["cid", "data"] = "cid") -> str:
    """The digest as email-safe HTML (tables, inline CSS); thumbnails by cid: or data: URI."""
    if inline_images not in ("cid", "data"):
        raise ValueError("inline_images must be 'cid' or 'data'")
    return render("digest.html", inline=inline_images, **_digest_context(content))


def compose_digest(content: DigestContent, *, message_id: str, sender: str,
                   recipient: str) -> ComposedMessage:
    """The digest email: text and HTML, the flagged images' thumbnails inline."""
    context = _digest_context(content)
    images = [row["thumbnail"] for row in context["rows"] if row["thumbnail"] is not None]
    return assemble(subject=digest_subject(content), message_id=message_id, sender=sender,
                     recipient=recipient, text=render("digest.txt", **context),
                     html=render("digest.html", inline="cid", **context), images=images,
                     headers={})

"""What the emails say: the alert and the nightly digest, composed into the bytes that are sent.

One home for both: the shared MIME assembly, thumbnails, local times, the Message-ID rule, the
disclaimer; the bodies are Jinja2 templates in `service/templates/` (HTML autoescaped). Pure:
plain data in, `ComposedMessage` out; no settings or database imports, and of the model only
`model.scores`, the one rule for writing a probability beside its threshold.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email import policy
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Literal
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from PIL import Image, ImageOps, UnidentifiedImageError

from melanoscreen.text import printable
from model.scores import probability_text, threshold_text
from service.flags import MELANOMA_SUSPECTED, UNUSUAL_CAVEAT, UNUSUAL_PICTURE

logger = logging.getLogger(__name__)

DISCLAIMER = (
    "MelanoScreen is a screening aid, not a diagnosis: a dermatologist must examine every "
    "flagged lesion before any decision."
)
#: The right-hand side of every Message-ID and Content-ID we make.
DOMAIN = "melanoscreen.invalid"
ALERT_IMAGE_PX = 512  # the alert carries the lesion large enough to judge
DIGEST_THUMBNAIL_PX = 96  # digest rows are small
MAX_DIGEST_THUMBNAILS = 60  # beyond this the rows stay, without pictures, to keep the email light

_TEMPLATES = Environment(
    loader=PackageLoader("service", "templates"),
    autoescape=select_autoescape(["html"], default_for_string=False, default=False),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    # Names come from the inbox: a newline in one must not start a line of the text part.
    # Control characters become visible escapes; Markup (already escaped HTML) is left alone.
    finalize=lambda value: printable(value) if type(value) is str else value,
)
# `{{ p|probability(threshold) }}`: never reads like the threshold it is compared with.
_TEMPLATES.filters["probability"] = probability_text
_TEMPLATES.filters["threshold"] = threshold_text


def sentence(text: str) -> str:
    """`text` as a sentence: capital first letter, full stop at the end."""
    text = text.strip()
    if not text:
        return text
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


_TEMPLATES.filters["sentence"] = sentence


# ---- shared by every message -------------------------------------------------------------------

@dataclass(frozen=True)
class ComposedMessage:
    """One email to one recipient, as the bytes that every attempt sends (CRLF line ends)."""

    recipient: str
    message_id: str  # "<left@right>", the same on every resend
    subject: str
    raw: bytes


@dataclass(frozen=True)
class InlineImage:
    """A picture shown inside the HTML part, referenced as `cid:<content_id>`."""

    content_id: str
    filename: str
    data: bytes
    subtype: str  # "jpeg" or "png"

    def data_uri(self) -> str:
        """The picture as a `data:` URI, for a standalone HTML page."""
        return f"data:image/{self.subtype};base64," + base64.b64encode(self.data).decode("ascii")


def normalise_message_id(message_id: str) -> str:
    """Return `message_id` in angle brackets, checking it looks like `<left@right>`."""
    value = message_id.strip()
    if not (value.startswith("<") and value.endswith(">")):
        value = f"<{value}>"
    if not re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", value):
        raise ValueError(f"not a valid Message-ID: {message_id!r}")
    return value


def recipient_message_id(key: str, recipient: str) -> str:
    """The stable Message-ID of one recipient's copy of the message `key` (kept on every resend):
    `<KEY.HASH@melanoscreen.invalid>`, short enough that the header is never folded."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", key)
    digest = hashlib.sha256(recipient.strip().lower().encode()).hexdigest()[:10]
    return normalise_message_id(f"{safe}.{digest}@{DOMAIN}")


def new_alert_key() -> str:
    """A fresh key for one alert; each recipient's copy gets a Message-ID derived from it."""
    return f"alert-{uuid.uuid4().hex[:16]}"


def case_url(public_url: str | None, sha256: str) -> str | None:
    """The review app's case page of an image, when MELANOSCREEN_PUBLIC_URL is set."""
    return f"{public_url.rstrip('/')}/images/{sha256}" if public_url else None


def digest_key(day: date) -> str:
    """The key of the digest of `day`: its copies' Message-IDs derive from it."""
    return f"digest-{day.isoformat()}"


def content_id(base: str, label: str) -> str:
    """A Content-ID derived from a stable base, so a recomposed message is byte-stable."""
    left, right = normalise_message_id(base).strip("<>").split("@", 1)
    return f"{label}.{left}@{right}"


def clean_header_text(text: str) -> str:
    """Collapse whitespace and control characters so a file name cannot break a header."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def local_time(moment: datetime, tz_name: str, *, with_zone: bool = True) -> str:
    """`2026-11-24 10:15 CET`: an instant on the clinic's clock (a naive value is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(ZoneInfo(tz_name)).strftime(
        "%Y-%m-%d %H:%M %Z" if with_zone else "%Y-%m-%d %H:%M")


def thumbnail(data: bytes, max_px: int) -> tuple[bytes, str] | None:
    """Shrink image bytes to `max_px` a side: (bytes, 'jpeg' or 'png'), None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened)
            image.thumbnail((max_px, max_px))
            out = io.BytesIO()
            if image.mode in ("RGBA", "LA", "P"):
                image.convert("RGBA").save(out, format="PNG", optimize=True)
                return out.getvalue(), "png"
            image.convert("RGB").save(out, format="JPEG", quality=85)
            return out.getvalue(), "jpeg"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        logger.warning("cannot make a thumbnail: %s", exc)
        return None


def inline_image(data: bytes | None, max_px: int, base: str, label: str) -> InlineImage | None:
    """A thumbnail of `data` ready to be shown inline, or None when there is no picture."""
    shrunk = thumbnail(data, max_px) if data else None
    if shrunk is None:
        return None
    pixels, subtype = shrunk
    return InlineImage(content_id(base, label), f"{label}.{'jpg' if subtype == 'jpeg' else 'png'}",
                       pixels, subtype)


def _render(name: str, **context: Any) -> str:
    return _TEMPLATES.get_template(name).render(disclaimer=DISCLAIMER, **context)


def _assemble(*, subject: str, message_id: str, sender: str, recipient: str, text: str, html: str,
              images: Sequence[InlineImage], headers: Mapping[str, str]) -> ComposedMessage:
    """Text and HTML alternatives, pictures inline by cid, every header set: the final bytes."""
    message_id = normalise_message_id(message_id)
    message = EmailMessage(policy=policy.SMTP)
    message["Subject"] = subject
    message["Message-ID"] = message_id
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = formatdate(usegmt=True)
    message["Auto-Submitted"] = "auto-generated"
    for name, value in headers.items():
        message[name] = value
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    html_part = message.get_body(preferencelist=("html",))
    assert isinstance(html_part, EmailMessage)
    for image in images:
        html_part.add_related(image.data, maintype="image", subtype=image.subtype,
                              cid=f"<{image.content_id}>", filename=image.filename,
                              disposition="inline")
    return ComposedMessage(recipient, message_id, subject, message.as_bytes())


# ---- the alert ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlaggedImage:
    """One screened image whose melanoma probability reached the threshold."""

    source: str  # the name it arrived under, relative to the inbox
    melanoma_probability: float
    probabilities: Mapping[str, float]  # class name -> probability, in the model's class order
    predicted_class: str
    received_at: datetime  # aware; a naive value is taken as UTC
    image: bytes | None  # the lesion image as stored, any format Pillow reads
    gradcam_png: bytes | None = None  # Grad-CAM overlay, PNG
    url: str | None = None  # its case page in the review app, when MELANOSCREEN_PUBLIC_URL is set


@dataclass(frozen=True)
class AlertContent:
    """Everything one alert email says: the flagged images of one batch and the model used."""

    images: Sequence[FlaggedImage]
    model_version: str
    threshold: float
    timezone: str = "UTC"  # the zone in which arrival times are shown
    #: What the threshold means ("at this threshold the model caught 95% of melanomas in
    #: validation ..."), or that the clinic set it; None: nothing is said.
    threshold_meaning: str | None = None
    #: 're-screen' (a new model version flags what the old did not) or 'reminder' (still
    #: unreviewed): shown in the subject and at the top; None: a first alert.
    label: str | None = None
    #: The images are unusual pictures (out of scope): the alert says their scores may be
    #: unreliable and that they need a look, never "melanoma suspected".
    unusual: bool = False

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("an alert needs at least one flagged image")


def alert_subject(flagged: Sequence[tuple[str, float]], threshold: float | None = None,
                  label: str | None = None, *, unusual: bool = False) -> str:
    """The subject line from (source, melanoma probability) pairs: the highest and how many;
    p is written with enough digits that it never reads like the threshold; a label
    ('re-screen', 'reminder') goes first in brackets. An alert about `unusual` pictures (out of
    scope) never says "melanoma suspected": it says they need a look."""
    if not flagged:
        raise ValueError("an alert needs at least one flagged image")
    source, p = max(flagged, key=lambda pair: pair[1])
    name = clean_header_text(source)
    written = probability_text(p, threshold)
    mark = f"[{label}] " if label else ""
    what = UNUSUAL_PICTURE if unusual else MELANOMA_SUSPECTED
    if len(flagged) == 1:
        return f"{mark}{what} (p={written}): {name}"
    return (f"{mark}{what} in {len(flagged)} images (highest p={written}): {name} and "
            f"{len(flagged) - 1} more")


def compose_alert(alert: AlertContent, *, message_id: str, sender: str,
                  recipient: str) -> ComposedMessage:
    """The alert email: text and HTML, each image's lesion and Grad-CAM overlay inline."""
    message_id = normalise_message_id(message_id)
    ranked = sorted(alert.images, key=lambda item: item.melanoma_probability, reverse=True)
    images: list[InlineImage] = []
    rows = []
    for number, item in enumerate(ranked, start=1):
        lesion = inline_image(item.image, ALERT_IMAGE_PX, message_id, f"lesion{number}")
        cam = inline_image(item.gradcam_png, ALERT_IMAGE_PX, message_id, f"gradcam{number}")
        images += [picture for picture in (lesion, cam) if picture is not None]
        width = max((len(name) for name in item.probabilities), default=0)
        rows.append({
            "item": item, "lesion": lesion, "gradcam": cam,
            "received": local_time(item.received_at, alert.timezone),
            "classes": [{"name": name, "padded": name.ljust(width), "value": value,
                         "text": probability_text(
                             value, alert.threshold if name == "melanoma" else None, digits=3),
                         "strong": name in (item.predicted_class, "melanoma"),
                         "bar": max(1, round(value * 120)),
                         "colour": "#b91c1c" if name == "melanoma" else "#6b7280"}
                        for name, value in item.probabilities.items()],
        })
    context = {"alert": alert, "rows": rows, "caveat": UNUSUAL_CAVEAT,
               "heading": UNUSUAL_PICTURE if alert.unusual else MELANOMA_SUSPECTED}
    return _assemble(
        subject=alert_subject([(i.source, i.melanoma_probability) for i in ranked], alert.threshold,
                              alert.label, unusual=alert.unusual),
        message_id=message_id, sender=sender, recipient=recipient,
        text=_render("alert.txt", **context), html=_render("alert.html", **context),
        images=images, headers={"Importance": "high"})


# ---- the digest --------------------------------------------------------------------------------

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


def _digest_context(content: DigestContent) -> dict[str, Any]:
    ranked = sorted(content.flagged_images, key=lambda i: i.melanoma_probability, reverse=True)
    base = f"{digest_key(content.day)}@{DOMAIN}"
    rows = [{"item": item, "received": local_time(item.received_at, content.timezone,
                                                  with_zone=False),
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
            "long_day": content.day.strftime("%A %d %B %Y"),
            "counts": [("screened", content.screened, False), ("flagged", content.flagged, True),
                       ("rejected", content.rejected, False), ("failed", content.failed, True)],
            "problems": [(title, problems) for title, problems in
                         (("Rejected files", content.rejected_files),
                          ("Failed screenings", content.failed_files)) if problems]}


def render_digest_text(content: DigestContent) -> str:
    """The digest as plain text, the alternative to the HTML part."""
    return _render("digest.txt", **_digest_context(content))


def render_digest_html(content: DigestContent, inline_images: Literal["cid", "data"] = "cid") -> str:
    """The digest as email-safe HTML (tables, inline CSS); thumbnails by cid: or data: URI."""
    if inline_images not in ("cid", "data"):
        raise ValueError("inline_images must be 'cid' or 'data'")
    return _render("digest.html", inline=inline_images, **_digest_context(content))


def compose_digest(content: DigestContent, *, message_id: str, sender: str,
                   recipient: str) -> ComposedMessage:
    """The digest email: text and HTML, the flagged images' thumbnails inline."""
    context = _digest_context(content)
    images = [row["thumbnail"] for row in context["rows"] if row["thumbnail"] is not None]
    return _assemble(subject=digest_subject(content), message_id=message_id, sender=sender,
                     recipient=recipient, text=_render("digest.txt", **context),
                     html=_render("digest.html", inline="cid", **context), images=images,
                     headers={})

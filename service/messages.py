"""What every email shares, the alert (`service.alert_message`) and the nightly digest
(`service.digest_message`): the MIME assembly, thumbnails, local times, the Message-ID rule, the
disclaimer and the templates' environment; the bodies are Jinja2 templates in
`service/templates/` (HTML autoescaped). Pure: plain data in, `ComposedMessage` out; no settings
or database imports, and of the model only `model.scores`, the one rule for writing a
probability beside its threshold.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from PIL import Image, ImageOps, UnidentifiedImageError

from melanoscreen.text import printable
from model.scores import probability_text, threshold_text

logger = logging.getLogger(__name__)

DISCLAIMER = (
    "MelanoScreen is a screening aid, not a diagnosis: a dermatologist must examine every "
    "flagged lesion before any decision."
)
#: The right-hand side of every Message-ID and Content-ID we make.
DOMAIN = "melanoscreen.invalid"

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


def case_url(public_url: str | None, sha256: str) -> str | None:
    """The review app's case page of an image, when MELANOSCREEN_PUBLIC_URL is set."""
    return f"{public_url.rstrip('/')}/images/{sha256}" if public_url else None


def review_hint(local_url: str) -> str:
    """Where the review app answers when MELANOSCREEN_PUBLIC_URL is not set, and how to get there."""
    port = local_url.rsplit(":", 1)[-1].strip("/")
    return (f"Review in the review app at {local_url} on the computer that runs MelanoScreen. "
            f"From another computer: ssh -L {port}:127.0.0.1:{port} <that computer>, then open "
            f"http://127.0.0.1:{port}; or ask IT to set MELANOSCREEN_PUBLIC_URL, which puts a "
            "link to each case page in every alert.")


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


def render(name: str, **context: Any) -> str:
    """The template `name` rendered with `context` and the disclaimer."""
    return _TEMPLATES.get_template(name).render(disclaimer=DISCLAIMER, **context)


def assemble(*, subject: str, message_id: str, sender: str, recipient: str, text: str, html: str,
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

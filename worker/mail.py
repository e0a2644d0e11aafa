"""Melanoma alert emails: composition from plain data, and delivery by SMTP or to the outbox folder.

Pure of the rest of the project: no settings, database or model imports. The Celery delivery
task wires these functions to the alert outbox table and retries on `TransientMailError`.
"""

from __future__ import annotations

import html
import io
import logging
import os
import random
import re
import smtplib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

Security = Literal["none", "starttls", "tls"]
_DEFAULT_PORTS: dict[str, int] = {"none": 25, "starttls": 587, "tls": 465}

THUMBNAIL_MAX_PX = 512
DISCLAIMER = (
    "MelanoScreen is a screening aid, not a diagnosis: "
    "a dermatologist must examine the lesion before any decision."
)


class MailError(Exception):
    """Base class of the delivery errors."""


class TransientMailError(MailError):
    """The message may be delivered later: a connection error, a timeout or a 4xx reply."""


class PermanentMailError(MailError):
    """Retrying will not help: a refused login, a bad certificate, a 5xx for the whole message."""


@dataclass(frozen=True)
class SmtpConfig:
    """How to reach the SMTP server; `host=None` means: write `.eml` files to the outbox folder."""

    host: str | None = None
    port: int | None = None  # None: 25, 587 or 465 by `security`
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    security: Security = "none"
    sender: str = "melanoscreen@localhost"
    timeout: float = 30.0  # seconds, per socket operation
    verify: bool = True  # verify the server's certificate and host name (starttls, tls)
    cafile: Path | None = None  # extra trust anchor, e.g. a private CA or a test certificate

    def __post_init__(self) -> None:
        if self.security not in _DEFAULT_PORTS:
            raise ValueError(f"SMTP security must be none, starttls or tls, not {self.security!r}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"SMTP port out of range: {self.port}")

    @property
    def effective_port(self) -> int:
        """The configured port, else the standard one for the security mode."""
        return self.port if self.port is not None else _DEFAULT_PORTS[self.security]


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


@dataclass(frozen=True)
class AlertContent:
    """Everything one alert email says: the flagged images of one batch and the model used."""

    images: Sequence[FlaggedImage]
    model_version: str
    threshold: float
    timezone: str = "UTC"  # the zone in which arrival times are shown

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("an alert needs at least one flagged image")


@dataclass(frozen=True)
class DeliveryResult:
    """What happened to each recipient of one message."""

    message_id: str
    accepted: tuple[str, ...]
    rejected: Mapping[str, str] = field(default_factory=dict)  # permanent (5xx): address -> reply
    deferred: Mapping[str, str] = field(default_factory=dict)  # temporary (4xx): retry these
    outbox_path: Path | None = None  # set in outbox mode

    @property
    def complete(self) -> bool:
        """True when no recipient is left to retry."""
        return not self.deferred


def normalise_message_id(message_id: str) -> str:
    """Return `message_id` in angle brackets, checking it looks like `<left@right>`."""
    value = message_id.strip()
    if not (value.startswith("<") and value.endswith(">")):
        value = f"<{value}>"
    if not re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", value):
        raise ValueError(f"not a valid Message-ID: {message_id!r}")
    return value


def alert_message_id(key: str, domain: str = "melanoscreen.invalid") -> str:
    """A stable Message-ID for the alert identified by `key` (e.g. the outbox row id)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", key)
    return normalise_message_id(f"alert-{safe}@{domain}")


def _clean_header_text(text: str) -> str:
    """Collapse whitespace and control characters so a file name cannot break a header."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _local_time(moment: datetime, tz_name: str) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    local = moment.astimezone(ZoneInfo(tz_name))
    return local.strftime("%Y-%m-%d %H:%M %Z")


def make_thumbnail(data: bytes, max_px: int = THUMBNAIL_MAX_PX) -> tuple[bytes, str] | None:
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


def alert_subject(alert: AlertContent) -> str:
    """The subject line: the highest probability and its source, and how many images."""
    ranked = _ranked(alert.images)
    top = ranked[0]
    name = _clean_header_text(top.source)
    if len(ranked) == 1:
        return f"Melanoma suspected (p={top.melanoma_probability:.2f}): {name}"
    return (
        f"Melanoma suspected in {len(ranked)} images "
        f"(highest p={top.melanoma_probability:.2f}): {name} and {len(ranked) - 1} more"
    )


def _ranked(images: Sequence[FlaggedImage]) -> list[FlaggedImage]:
    return sorted(images, key=lambda item: item.melanoma_probability, reverse=True)


def _content_id(message_id: str, label: str) -> str:
    """A Content-ID derived from the Message-ID, so a recomposed message is byte-stable."""
    left, right = message_id.strip("<>").split("@", 1)
    return f"{label}.{left}@{right}"


def _alert_text(alert: AlertContent, ranked: list[FlaggedImage]) -> str:
    lines = [
        "MelanoScreen: melanoma suspected",
        "",
        f"{len(ranked)} image(s) reached the melanoma alert threshold "
        f"({alert.threshold:.2f}). Please review.",
        "",
    ]
    for number, item in enumerate(ranked, start=1):
        lines += [
            f"{number}. {item.source}",
            f"   Melanoma probability: {item.melanoma_probability:.3f}",
            f"   Predicted class:      {item.predicted_class}",
            f"   Received:             {_local_time(item.received_at, alert.timezone)}",
            "   Class probabilities:",
        ]
        width = max(len(name) for name in item.probabilities) if item.probabilities else 0
        lines += [f"     {name:<{width}}  {value:.3f}" for name, value in item.probabilities.items()]
        lines.append("")
    lines += [
        f"Model version: {alert.model_version}",
        f"Alert threshold: {alert.threshold:.2f}",
        "",
        DISCLAIMER,
        "",
    ]
    return "\n".join(lines)


_CELL = "padding:4px 8px;border-bottom:1px solid #e5e7eb;font-size:13px;"


def _probability_rows(item: FlaggedImage) -> str:
    rows = []
    for name, value in item.probabilities.items():
        strong = name == item.predicted_class or name == "melanoma"
        weight = "font-weight:bold;" if strong else ""
        bar = max(1, round(value * 120))
        colour = "#b91c1c" if name == "melanoma" else "#6b7280"
        rows.append(
            f'<tr><td style="{_CELL}{weight}">{html.escape(name)}</td>'
            f'<td style="{_CELL}{weight}text-align:right;">{value:.3f}</td>'
            f'<td style="{_CELL}"><div style="background:{colour};height:8px;width:{bar}px;">'
            "</div></td></tr>"
        )
    return "".join(rows)


def _alert_html(
    alert: AlertContent, ranked: list[FlaggedImage], cids: list[tuple[str | None, str | None]]
) -> str:
    blocks = []
    for number, (item, (lesion_cid, cam_cid)) in enumerate(zip(ranked, cids, strict=True), 1):
        arrived = _local_time(item.received_at, alert.timezone)
        pictures = []
        if lesion_cid:
            pictures.append(
                f'<td style="padding:4px;vertical-align:top;"><img src="cid:{lesion_cid}" '
                f'alt="lesion image" width="240" style="display:block;border:0;"><br>'
                '<span style="font-size:12px;color:#6b7280;">lesion</span></td>'
            )
        else:
            pictures.append(
                '<td style="padding:4px;font-size:12px;color:#6b7280;">(image could not be previewed)</td>'
            )
        if cam_cid:
            pictures.append(
                f'<td style="padding:4px;vertical-align:top;"><img src="cid:{cam_cid}" '
                f'alt="Grad-CAM overlay" width="240" style="display:block;border:0;"><br>'
                '<span style="font-size:12px;color:#6b7280;">Grad-CAM: where the model looked'
                "</span></td>"
            )
        blocks.append(
            f'<h2 style="font-size:16px;margin:20px 0 6px 0;">{number}. '
            f"{html.escape(item.source)}</h2>"
            '<p style="margin:0 0 8px 0;font-size:14px;">Melanoma probability '
            f'<strong style="color:#b91c1c;font-size:18px;">{item.melanoma_probability:.3f}'
            f"</strong> &middot; predicted class <strong>{html.escape(item.predicted_class)}"
            f"</strong> &middot; received {html.escape(arrived)}</p>"
            f'<table role="presentation" cellpadding="0" cellspacing="0"><tr>{"".join(pictures)}'
            "</tr></table>"
            '<table cellpadding="0" cellspacing="0" '
            'style="border-collapse:collapse;margin-top:8px;">'
            f'<tr><th style="{_CELL}text-align:left;">class</th>'
            f'<th style="{_CELL}text-align:right;">probability</th><th style="{_CELL}"></th></tr>'
            f"{_probability_rows(item)}</table>"
        )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        "<title>Melanoma suspected</title></head>"
        '<body style="margin:0;padding:16px;font-family:Arial,Helvetica,sans-serif;color:#111827;">'
        '<div style="background:#b91c1c;color:#ffffff;padding:10px 14px;font-size:18px;'
        'font-weight:bold;">MelanoScreen: melanoma suspected</div>'
        f'<p style="font-size:14px;">{len(ranked)} image(s) reached the melanoma alert threshold '
        f"({alert.threshold:.2f}). Please review.</p>"
        f"{''.join(blocks)}"
        '<p style="font-size:12px;color:#6b7280;margin-top:20px;">'
        f"Model version {html.escape(alert.model_version)} &middot; alert threshold "
        f"{alert.threshold:.2f}</p>"
        f'<p style="font-size:12px;color:#6b7280;"><em>{html.escape(DISCLAIMER)}</em></p>'
        "</body></html>"
    )


def compose_alert(
    alert: AlertContent,
    *,
    message_id: str,
    sender: str | None = None,
    recipients: Sequence[str] = (),
) -> EmailMessage:
    """Build the alert: text and HTML alternatives, lesion and Grad-CAM images inline by cid."""
    message_id = normalise_message_id(message_id)
    ranked = _ranked(alert.images)
    attachments: list[tuple[str, str, bytes, str]] = []  # (content-id, label, bytes, subtype)
    cids: list[tuple[str | None, str | None]] = []
    for number, item in enumerate(ranked, start=1):
        lesion = make_thumbnail(item.image) if item.image else None
        cam = make_thumbnail(item.gradcam_png) if item.gradcam_png else None
        lesion_cid = _content_id(message_id, f"lesion{number}") if lesion else None
        cam_cid = _content_id(message_id, f"gradcam{number}") if cam else None
        if lesion and lesion_cid:
            attachments.append((lesion_cid, f"lesion{number}", *lesion))
        if cam and cam_cid:
            attachments.append((cam_cid, f"gradcam{number}", *cam))
        cids.append((lesion_cid, cam_cid))

    message = EmailMessage()
    message["Subject"] = alert_subject(alert)
    message["Message-ID"] = message_id
    if sender:
        message["From"] = sender
    if recipients:
        message["To"] = ", ".join(recipients)
    message["Auto-Submitted"] = "auto-generated"
    message["Importance"] = "high"
    message.set_content(_alert_text(alert, ranked))
    message.add_alternative(_alert_html(alert, ranked, cids), subtype="html")
    html_part = message.get_body(preferencelist=("html",))
    assert isinstance(html_part, EmailMessage)
    for cid, label, data, subtype in attachments:
        html_part.add_related(
            data,
            maintype="image",
            subtype=subtype,
            cid=f"<{cid}>",
            filename=f"{label}.{'jpg' if subtype == 'jpeg' else subtype}",
            disposition="inline",
        )
    return message


def backoff_delay(
    attempt: int, base: float = 30.0, cap: float = 3600.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry `attempt` (0-based): exponential backoff with full jitter."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling = cap if attempt >= 63 else min(cap, base * (2**attempt))
    return (rng or random).uniform(0.0, ceiling)


def _ssl_context(config: SmtpConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(config.cafile) if config.cafile is not None else None)
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def outbox_file_name(message_id: str) -> str:
    """The `.eml` file name for a Message-ID: safe characters only, stable across resends."""
    inner = normalise_message_id(message_id).strip("<>")
    return re.sub(r"[^A-Za-z0-9._@-]", "_", inner) + ".eml"


def _write_outbox(message: EmailMessage, outbox_dir: Path) -> Path:
    outbox_dir.mkdir(parents=True, exist_ok=True)
    target = outbox_dir / outbox_file_name(str(message["Message-ID"]))
    temporary = outbox_dir / f".{target.name}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(message.as_bytes())
        handle.flush()
        os.fsync(handle.fileno())
    # Atomic: a reader sees the whole message or none; a resend replaces it with the same one.
    os.replace(temporary, target)
    return target


def _fill_headers(message: EmailMessage, recipients: Sequence[str], sender: str) -> None:
    if message["Message-ID"] is None:
        raise ValueError("the message needs a Message-ID: resends must carry the same one")
    if message["From"] is None:
        message["From"] = sender
    if message["To"] is None:
        message["To"] = ", ".join(recipients)
    if message["Date"] is None:
        message["Date"] = formatdate(localtime=False, usegmt=True)


def _reply_text(code: int, reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return f"{code} {text}".strip()


def _classify(code: int, what: str) -> MailError:
    if 400 <= code < 500:
        return TransientMailError(what)
    return PermanentMailError(what)


def deliver(
    message: EmailMessage, recipients: Sequence[str], config: SmtpConfig, outbox_dir: Path
) -> DeliveryResult:
    """Send `message` to `recipients` by SMTP, or write it to `outbox_dir` when no host is set.

    Returns per-recipient outcomes; raises `TransientMailError` when nothing could be handed
    over but a retry may succeed, and `PermanentMailError` when a retry cannot.
    """
    recipients = list(dict.fromkeys(recipients))
    if not recipients:
        raise ValueError("no recipients")
    _fill_headers(message, recipients, config.sender)
    message_id = str(message["Message-ID"])

    if config.host is None:
        path = _write_outbox(message, Path(outbox_dir))
        logger.info("no SMTP host: wrote %s to %s", message_id, path)
        return DeliveryResult(message_id, tuple(recipients), outbox_path=path)

    where = f"{config.host}:{config.effective_port}"
    refused: dict[str, tuple[int, bytes]]
    try:
        refused = _send(message, recipients, config)
    except smtplib.SMTPRecipientsRefused as exc:  # every recipient refused
        refused = dict(exc.recipients)
    except smtplib.SMTPAuthenticationError as exc:
        reply = _reply_text(exc.smtp_code, exc.smtp_error)
        raise _classify(exc.smtp_code, f"SMTP login as {config.user!r} at {where} refused: {reply}") from exc
    except smtplib.SMTPNotSupportedError as exc:
        raise PermanentMailError(f"SMTP server {where}: {exc}") from exc
    except smtplib.SMTPResponseException as exc:  # sender refused, data refused, bad greeting
        reply = _reply_text(exc.smtp_code, exc.smtp_error)
        raise _classify(exc.smtp_code, f"SMTP server {where} refused {message_id}: {reply}") from exc
    except smtplib.SMTPServerDisconnected as exc:
        raise TransientMailError(f"SMTP server {where} disconnected: {exc}") from exc
    except smtplib.SMTPException as exc:  # e.g. no common AUTH mechanism
        raise PermanentMailError(f"SMTP with {where} failed: {exc}") from exc
    except ssl.SSLCertVerificationError as exc:
        raise PermanentMailError(f"the certificate of {where} is not trusted: {exc.verify_message}") from exc
    except (OSError, TimeoutError) as exc:  # refused connection, timeout, DNS, TLS handshake
        raise TransientMailError(f"cannot reach SMTP server {where}: {exc}") from exc

    rejected = {a: _reply_text(c, r) for a, (c, r) in refused.items() if c >= 500}
    deferred = {a: _reply_text(c, r) for a, (c, r) in refused.items() if c < 500}
    accepted = tuple(a for a in recipients if a not in refused)
    if not accepted and not rejected:
        raise TransientMailError(f"SMTP server {where} deferred every recipient: {deferred}")
    for address, reply in rejected.items():
        logger.error("recipient %s of %s rejected permanently: %s", address, message_id, reply)
    for address, reply in deferred.items():
        logger.warning("recipient %s of %s deferred: %s", address, message_id, reply)
    logger.info("sent %s to %d of %d recipients", message_id, len(accepted), len(recipients))
    return DeliveryResult(message_id, accepted, rejected, deferred)


def _send(message: EmailMessage, recipients: list[str], config: SmtpConfig) -> dict[str, tuple[int, bytes]]:
    assert config.host is not None
    smtp: smtplib.SMTP
    if config.security == "tls":
        smtp = smtplib.SMTP_SSL(
            config.host,
            config.effective_port,
            timeout=config.timeout,
            context=_ssl_context(config),
        )
    else:
        smtp = smtplib.SMTP(config.host, config.effective_port, timeout=config.timeout)
    with smtp:
        smtp.ehlo()
        if config.security == "starttls":
            if not smtp.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError("STARTTLS is not offered")
            smtp.starttls(context=_ssl_context(config))
            smtp.ehlo()
        if config.user:
            if config.security == "none":
                logger.warning("SMTP login without TLS: the password crosses the network in clear")
            smtp.login(config.user, config.password or "")
        return smtp.send_message(message, from_addr=config.sender, to_addrs=recipients)

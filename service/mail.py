"""How a composed email goes out: by SMTP (none, STARTTLS or TLS, optional login), or as an `.eml`
file in the outbox folder when no SMTP host is configured.

The stored bytes are sent as they are: the message was composed once (`service.messages`) and
every attempt hands over the very same bytes, Message-ID included.
"""

from __future__ import annotations

import logging
import os
import random
import re
import smtplib
import ssl
from pathlib import Path

from melanoscreen.settings import SmtpSettings
from service.messages import ComposedMessage, normalise_message_id

logger = logging.getLogger(__name__)


class MailError(Exception):
    """Base class of the delivery errors."""


class TransientMailError(MailError):
    """The message may be delivered later: a connection error, a timeout or a 4xx reply."""


class PermanentMailError(MailError):
    """Retrying will not help: a refused login, a bad certificate, a 5xx reply."""


def backoff_delay(
    attempt: int, base: float = 30.0, cap: float = 3600.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry `attempt` (0-based): exponential backoff with full jitter."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling = cap if attempt >= 63 else min(cap, base * (2**attempt))
    return (rng or random).uniform(0.0, ceiling)


def outbox_file_name(message_id: str) -> str:
    """The `.eml` file name for a Message-ID: safe characters only, stable across resends."""
    inner = normalise_message_id(message_id).strip("<>")
    return re.sub(r"[^A-Za-z0-9._@-]", "_", inner) + ".eml"


def _write_outbox(message: ComposedMessage, outbox_dir: Path) -> Path:
    outbox_dir.mkdir(parents=True, exist_ok=True)
    target = outbox_dir / outbox_file_name(message.message_id)
    temporary = outbox_dir / f".{target.name}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(message.raw)
        handle.flush()
        os.fsync(handle.fileno())
    # Atomic: a reader sees the whole message or none; a resend replaces it with the same one.
    os.replace(temporary, target)
    return target


def _reply_text(code: int, reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return f"{code} {text}".strip()


def _classify(code: int, what: str) -> MailError:
    if 400 <= code < 500:
        return TransientMailError(what)
    return PermanentMailError(what)


def deliver(message: ComposedMessage, smtp: SmtpSettings, outbox_dir: Path) -> Path | None:
    """Hand `message` to its recipient's SMTP server, or write it into `outbox_dir` when no host
    is set (returns the file's path).

    Raises `TransientMailError` when a retry may succeed (no connection, a timeout, a 4xx
    reply) and `PermanentMailError` when it cannot (a 5xx reply, a refused login, a bad
    certificate).
    """
    if smtp.host is None:
        path = _write_outbox(message, outbox_dir)
        logger.debug("no SMTP host: wrote %s to %s", message.message_id, path)
        return path

    where = f"{smtp.host}:{smtp.effective_port}"
    try:
        _send(message, smtp)
    except smtplib.SMTPRecipientsRefused as exc:
        [(code, refusal)] = exc.recipients.values()
        raise _classify(code, f"{message.recipient} refused by {where}: "
                              f"{_reply_text(code, refusal)}") from exc
    except smtplib.SMTPAuthenticationError as exc:
        reply = _reply_text(exc.smtp_code, exc.smtp_error)
        raise _classify(exc.smtp_code, f"SMTP login as {smtp.user!r} at {where} refused: {reply}") from exc
    except smtplib.SMTPNotSupportedError as exc:
        raise PermanentMailError(f"SMTP server {where}: {exc}") from exc
    except smtplib.SMTPResponseException as exc:  # sender refused, data refused, bad greeting
        reply = _reply_text(exc.smtp_code, exc.smtp_error)
        raise _classify(exc.smtp_code, f"SMTP server {where} refused {message.message_id}: {reply}") from exc
    except smtplib.SMTPServerDisconnected as exc:
        raise TransientMailError(f"SMTP server {where} disconnected: {exc}") from exc
    except smtplib.SMTPException as exc:  # e.g. no common AUTH mechanism
        raise PermanentMailError(f"SMTP with {where} failed: {exc}") from exc
    except ssl.SSLCertVerificationError as exc:
        raise PermanentMailError(f"the certificate of {where} is not trusted: {exc.verify_message}") from exc
    except (OSError, TimeoutError) as exc:  # refused connection, timeout, DNS, TLS handshake
        raise TransientMailError(f"cannot reach SMTP server {where}: {exc}") from exc
    logger.debug("sent %s to %s", message.message_id, message.recipient)
    return None


def _ssl_context(smtp: SmtpSettings) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(smtp.cafile.absolute()) if smtp.cafile else None)


def _send(message: ComposedMessage, smtp: SmtpSettings) -> None:
    assert smtp.host is not None
    client: smtplib.SMTP
    if smtp.security == "tls":
        client = smtplib.SMTP_SSL(smtp.host, smtp.effective_port, timeout=smtp.timeout,
                                  context=_ssl_context(smtp))
    else:
        client = smtplib.SMTP(smtp.host, smtp.effective_port, timeout=smtp.timeout)
    with client:
        client.ehlo()
        if smtp.security == "starttls":
            if not client.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError("STARTTLS is not offered")
            client.starttls(context=_ssl_context(smtp))
            client.ehlo()
        if smtp.user:
            if smtp.security == "none":
                logger.warning("SMTP login without TLS: the password crosses the network in clear")
            password = smtp.password.get_secret_value() if smtp.password else ""
            client.login(smtp.user, password)
        raw = message.raw
        if b"\r\n" not in raw:  # stored before messages were kept with SMTP's CRLF line ends
            raw = raw.replace(b"\n", b"\r\n")
        client.sendmail(smtp.sender, [message.recipient], raw)

"""The web side of logins: CSRF tokens and HTTP Basic (passwords and the lock: `service.accounts`)."""

from __future__ import annotations

import base64
import binascii
import secrets


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(name, password) from an `Authorization: Basic ...` header, else None."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(":")
    return (name, password) if sep else None


def new_csrf_token() -> str:
    """A fresh random token for a session's forms."""
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    """Whether the form's token is the session's (constant time)."""
    return bool(expected) and bool(given) and secrets.compare_digest(str(expected), str(given))

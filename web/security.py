"""The web side of logins: sessions bound to a secret path, CSRF tokens, HTTP Basic, and the
guard that refuses a body before it is read (passwords and the lock: `service.accounts`).

Why a secret path: browsers send a 127.0.0.1 cookie to every port of 127.0.0.1, so any local
program that a reviewer's browser visits would receive a cookie scoped to `/`. A session's
cookie is scoped to `/s/<key>/` instead, where `key` is random and known only to that browser
tab's URLs, so the browser never sends it anywhere else (docs/security.md weighs the options).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

#: The session cookie (a random token; the session itself is a `web_sessions` row).
SESSION_COOKIE = "melanoscreen_session"
#: The login form's CSRF cookie (double submit: before a login there is no session yet).
LOGIN_COOKIE = "melanoscreen_login"
#: Where a session lives: every page of a logged-in browser is under `/s/<key>`.
SESSION_PREFIX = "/s/"
#: The ASGI scope key that carries the session path's key to the routes.
SCOPE_KEY = "melanoscreen.session_key"
_SESSION_PATH = re.compile(r"/s/([A-Za-z0-9_-]{20,64})(?=/|$)")
#: The largest request body the app reads (forms and reviews are a few kilobytes).
MAX_BODY_BYTES = 256 * 1024
#: Paths that take a body without a login (the login form itself).
_PUBLIC_POSTS = frozenset({"/login", "/logout"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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


def new_token() -> str:
    """A fresh random token (sessions, their path keys, CSRF)."""
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    """Whether the form's token is the session's (constant time)."""
    return bool(expected) and bool(given) and secrets.compare_digest(str(expected), str(given))


def cookie_values(header: str | None, name: str, limit: int = 4) -> list[str]:
    """Every value of cookie `name` in a Cookie header (one per path the browser holds), at most
    `limit`: a cookie set at `/` by another local program must not hide the session's."""
    values = []
    for part in (header or "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name and value:
            values.append(value.strip('"'))
            if len(values) >= limit:
                break
    return values


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class SessionPathAndBodyGuard:
    """ASGI middleware: `/s/<key>/rest` is served as `/rest` with the key in the scope; a body
    is refused unread (401) without any login credential, and over MAX_BODY_BYTES (413)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = _SESSION_PATH.match(scope["path"])
        if found:
            scope = dict(scope)
            scope["root_path"] = scope.get("root_path", "") + found.group(0)
            scope[SCOPE_KEY] = found.group(1)
        route = scope["path"][len(found.group(0)):] if found else scope["path"]
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            has_login = (found and cookie_values(_header(scope, b"cookie"), SESSION_COOKIE)) or \
                parse_basic(_header(scope, b"authorization")) is not None
            if route not in _PUBLIC_POSTS and not has_login:
                await _answer(send, 401, b'{"detail":"login required"}',
                              [(b"www-authenticate", b'Basic realm="melanoscreen"')])
                return
            length = _header(scope, b"content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                await _answer(send, 413, b'{"detail":"request body too large"}')
                return
            receive = _capped(receive, MAX_BODY_BYTES)
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """A chunked body grew past MAX_BODY_BYTES while it was read (413; an HTTPException so that
    the framework's body parsing passes it on instead of calling it a parse error)."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


def _capped(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge()
        return message

    return capped


async def _answer(send: Send, status: int, body: bytes,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
        *(extra or [])]})
    await send({"type": "http.response.body", "body": body})

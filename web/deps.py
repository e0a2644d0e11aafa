"""What routes depend on: the app's configuration, a database session, the current user, CSRF."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Form, HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker

from db import accounts
from db.images import find_image_by_sha256
from db.schema import Image, Role, User, WebSession
from service.accounts import REFUSED, LoginRefused, authenticate
from web import security


@dataclass(frozen=True)
class WebConfig:
    """Plain values the app is built from (the CLI reads them from the settings)."""

    database_url: str
    secret: str
    overlays_dir: Path
    timezone: str = "UTC"
    session_seconds: int = 12 * 3600
    #: Set the cookie's Secure flag (the app is reached over HTTPS).
    secure_cookies: bool = False
    #: `open` or `enforced` (MELANOSCREEN_WEB_CLINIC_ACCESS): see `clinics_of`.
    clinic_access: str = "open"
    #: The thumbnails the worker stored (`service.pictures`); None: no thumbnails are shown.
    thumbnails_dir: Path | None = None
    #: The worker's JPEG pictures of DICOM images; None: `previews` beside `overlays_dir`.
    previews_dir: Path | None = None

    @property
    def previews(self) -> Path:
        """Where the DICOM images' pictures are."""
        return self.previews_dir or self.overlays_dir.with_name("previews")


#: Password checks at once, per process: each argon2 check takes 64 MiB and a tenth of a second
#: of a core, so a burst of guesses waits in line instead of taking memory (and no more of them
#: are in flight than the lock can count).
PASSWORD_CHECKS = threading.BoundedSemaphore(2)
#: Seconds a login waits for its turn before it is refused.
PASSWORD_CHECK_WAIT = 30.0
#: `Sec-Fetch-Site` values of requests this app's own pages (or a person typing the address)
#: make; browsers send the header, scripts do not.
_OWN_SITE = frozenset({"same-origin", "none"})


#: The largest page number and offset a list takes: past them a request is refused (422) rather
#: than handed to the database as a number it cannot hold.
MAX_PAGE = 1_000_000
MAX_OFFSET = 100_000_000


class LoginRequired(Exception):
    """No valid login: pages redirect to /login, the API answers 401."""


class Forbidden(Exception):
    """Logged in, but this user's role may not do this."""


class CsrfRefused(Exception):
    """A form without the session's CSRF token."""


def now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


def config(request: Request) -> WebConfig:
    """The app's configuration."""
    config: WebConfig = request.app.state.config
    return config


def db_session(request: Request) -> Iterator[Session]:
    """One session per request, committed when the route returns normally, else rolled back.

    Routes that write commit themselves before they answer, so that the next request (the
    redirect after a form) sees what they wrote.
    """
    factory: sessionmaker[Session] = request.app.state.sessions
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


DbSession = Annotated[Session, Depends(db_session)]


def web_session(request: Request, session: Session) -> WebSession | None:
    """The live server-side session of this request: its cookie, at its own secret path."""
    if hasattr(request.state, "web_session"):
        found: WebSession | None = request.state.web_session
        return found
    request.state.web_session = None
    key = request.scope.get(security.SCOPE_KEY)
    if key:
        for token in security.cookie_values(request.headers.get("cookie"), security.SESSION_COOKIE):
            live = accounts.find_session(session, token=token, path_key=key, now=now())
            if live is not None:
                request.state.web_session, request.state.session_user = live
                break
    return request.state.web_session


def current_user(request: Request, session: DbSession) -> User:
    """The logged-in user: by the session (cookie at its path), or (the API, for scripts) by HTTP Basic."""
    if web_session(request, session) is not None:
        user: User = request.state.session_user
        return user
    if route_path(request).startswith("/api/"):
        credentials = security.parse_basic(request.headers.get("authorization"))
        if credentials is not None:
            try:
                user = checked_login(request, session, *credentials)
            except LoginRefused:
                # The failure count and the audit entry are kept: commit them, then refuse.
                session.commit()
                raise LoginRequired() from None
            request.state.basic_auth = True
            return user
    raise LoginRequired()


def checked_login(request: Request, session: Session, name: str, password: str) -> User:
    """`authenticate`, at most PASSWORD_CHECKS at a time, and never for a request that another
    site's page (another port of this host included) made the browser send: such a request
    neither logs in nor counts towards the lock, so no page can lock a reviewer out."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in _OWN_SITE:
        raise LoginRefused(REFUSED)
    if not PASSWORD_CHECKS.acquire(timeout=PASSWORD_CHECK_WAIT):
        raise LoginRefused("too many logins at once: try again in a minute")
    try:
        try:
            return authenticate(session, name, password, now())
        finally:
            # The count, the lock and the audit entry are committed before the next check
            # starts: a check waiting in line sees them.
            session.commit()
    finally:
        PASSWORD_CHECKS.release()


CurrentUser = Annotated[User, Depends(current_user)]


def admin_user(user: CurrentUser) -> User:
    """The current user, who must be an admin."""
    if user.role != Role.ADMIN:
        raise Forbidden()
    return user


AdminUser = Annotated[User, Depends(admin_user)]


def route_path(request: Request) -> str:
    """The path the routes see (without the session's `/s/<key>`)."""
    return request.url.path[len(base_path(request)):]


def base_path(request: Request) -> str:
    """The session's secret path (`/s/<key>`), '' outside a session: links and redirects
    start with it, so that the browser keeps sending the session's cookie."""
    return str(request.scope.get("root_path", ""))


def csrf_token(request: Request) -> str:
    """The CSRF token for this page's forms: the session's, or before a login the login form's
    (which the login page also sets as a cookie: double submit)."""
    live: WebSession | None = getattr(request.state, "web_session", None)
    if live is not None:
        return live.csrf
    token = getattr(request.state, "login_csrf", None)
    if not isinstance(token, str):
        given = request.cookies.get(security.LOGIN_COOKIE, "")
        token = given if 30 <= len(given) <= 64 else security.new_token()
        request.state.login_csrf = token
    return token


def checked_form(request: Request, session: DbSession,
                 csrf: Annotated[str | None, Form(alias="csrf_token")] = None) -> None:
    """Refuse a form whose CSRF token is missing or not this session's (before a login: not the
    login cookie's)."""
    live = web_session(request, session)
    expected = live.csrf if live is not None else request.cookies.get(security.LOGIN_COOKIE)
    if not security.csrf_matches(expected, csrf):
        raise CsrfRefused()


CheckedForm = Depends(checked_form)


def clinics_of(request: Request, user: User) -> tuple[str, ...] | None:
    """The source prefixes this user may see, or None for every image: with clinic access
    `enforced`, a reviewer given clinics sees only theirs; admins, reviewers without clinics
    and every user under `open` access see every image."""
    if config(request).clinic_access != "enforced" or user.role == Role.ADMIN:
        return None
    return tuple(p for p in user.prefixes.split("\n") if p) or None


def may_see(request: Request, user: User, image: Image) -> bool:
    """Whether this user may open this image (clinic access, see `clinics_of`)."""
    clinics = clinics_of(request, user)
    return clinics is None or image.source.startswith(clinics)


def image_or_404(session: Session, sha256: str, request: Request | None = None,
                 user: User | None = None) -> Image:
    """The image with this content, else 404; also 404 (never 403: it would say the image
    exists) when `user` may not see it."""
    image = find_image_by_sha256(session, sha256)
    if image is None or (request is not None and user is not None
                         and not may_see(request, user, image)):
        raise HTTPException(404, "no such image")
    return image

"""What routes depend on: the app's configuration, a database session, the current user, CSRF."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Form, HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker

from db.images import find_image_by_sha256
from db.schema import Image, Role, User
from service.accounts import LoginRefused, authenticate
from web import security

#: The session cookie's keys.
USER_KEY = "uid"
CSRF_KEY = "csrf"


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


def _user_from_cookie(request: Request, session: Session) -> User | None:
    user_id = request.session.get(USER_KEY)
    if not isinstance(user_id, int):
        return None
    user = session.get(User, user_id)
    if user is None or not user.active:
        request.session.clear()
        return None
    return user


def current_user(request: Request, session: DbSession) -> User:
    """The logged-in user: by the session cookie, or (the API, for scripts) by HTTP Basic."""
    user = _user_from_cookie(request, session)
    if user is not None:
        return user
    if request.url.path.startswith("/api/"):
        credentials = security.parse_basic(request.headers.get("authorization"))
        if credentials is not None:
            try:
                user = authenticate(session, *credentials, now())
            except LoginRefused:
                # The failure count and the audit entry are kept: commit them, then refuse.
                session.commit()
                raise LoginRequired() from None
            request.state.basic_auth = True
            return user
    raise LoginRequired()


CurrentUser = Annotated[User, Depends(current_user)]


def admin_user(user: CurrentUser) -> User:
    """The current user, who must be an admin."""
    if user.role != Role.ADMIN:
        raise Forbidden()
    return user


AdminUser = Annotated[User, Depends(admin_user)]


def csrf_token(request: Request) -> str:
    """This session's CSRF token for its forms (made on first use)."""
    token = request.session.get(CSRF_KEY)
    if not isinstance(token, str):
        token = security.new_csrf_token()
        request.session[CSRF_KEY] = token
    return token


def checked_form(request: Request, csrf: Annotated[str | None, Form(alias="csrf_token")] = None) -> None:
    """Refuse a form whose CSRF token is missing or not this session's."""
    if not security.csrf_matches(request.session.get(CSRF_KEY), csrf):
        raise CsrfRefused()


CheckedForm = Depends(checked_form)


def image_or_404(session: Session, sha256: str) -> Image:
    """The image with this content, else 404."""
    image = find_image_by_sha256(session, sha256)
    if image is None:
        raise HTTPException(404, "no such image")
    return image

"""Logging in and out (the two routes open to anyone)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse

from db import accounts, audit
from service.accounts import LoginRefused
from web import security
from web.deps import (
    CheckedForm,
    DbSession,
    base_path,
    checked_login,
    config,
    csrf_token,
    now,
    web_session,
)

router = APIRouter(tags=["auth"])


def _safe_next(target: str | None) -> str:
    """Only a path of this site: never `//elsewhere` or `https://elsewhere`."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _login_page(request: Request, *, error: str | None = None, next_path: str = "/",
                status: int = 200, name: str = "") -> Response:
    templates = request.app.state.templates
    response: Response = templates.TemplateResponse(
        request, "login.html", {"error": error, "next": next_path, "user": None, "name": name},
        status_code=status)
    # The form's token, also as a cookie only /login receives (checked on the POST).
    response.set_cookie(security.LOGIN_COOKIE, csrf_token(request), path="/login", httponly=True,
                        samesite="strict", secure=config(request).secure_cookies, max_age=3600)
    return response


@router.get("/login", summary="public: the login form")
def login_form(request: Request, next: str | None = None) -> Response:
    """The login form."""
    return _login_page(request, next_path=_safe_next(next))


@router.post("/login", summary="public: log in", dependencies=[CheckedForm])
def login(request: Request, session: DbSession, name: Annotated[str, Form()],
          password: Annotated[str, Form()], next: Annotated[str, Form()] = "/") -> Response:
    """Check the name and password; on success a new server-side session at its own secret path
    (`/s/<key>/`, where its cookie is scoped), else the form again."""
    try:
        user = checked_login(request, session, name, password)
    except LoginRefused as refused:
        session.commit()  # the failure count and the audit entry stay
        # The name stays (autoescaped by the template); only the password is typed again.
        return _login_page(request, error=str(refused), next_path=_safe_next(next), status=401,
                           name=name[:200])
    settings = config(request)
    token, key = security.new_token(), security.new_token()
    accounts.add_session(session, user, token=token, path_key=key, csrf=security.new_token(),
                         now=now(), lifetime=timedelta(seconds=settings.session_seconds))
    audit.audit(session, user=user, username=user.name, action="login", now=now())
    session.commit()
    home = f"{security.SESSION_PREFIX}{key}"
    response = RedirectResponse(home + _safe_next(next), status_code=303)
    response.set_cookie(security.SESSION_COOKIE, token, path=home, httponly=True, samesite="strict",
                        secure=settings.secure_cookies, max_age=settings.session_seconds)
    response.delete_cookie(security.LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout", summary="public: log out", dependencies=[CheckedForm])
def logout(request: Request, session: DbSession) -> Response:
    """End the session: its row goes, so its cookie is worth nothing anywhere."""
    live = web_session(request, session)
    response = RedirectResponse("/login", status_code=303)
    if live is not None:
        accounts.end_session(session, live.id)
        session.commit()
        response.delete_cookie(security.SESSION_COOKIE, path=base_path(request))
    return response

"""Logging in and out (the two routes open to anyone)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse

from db import audit
from service.accounts import LoginRefused, authenticate
from web import security
from web.deps import CSRF_KEY, USER_KEY, CheckedForm, DbSession, now

router = APIRouter(tags=["auth"])


def _safe_next(target: str | None) -> str:
    """Only a path of this site: never `//elsewhere` or `https://elsewhere`."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _login_page(request: Request, *, error: str | None = None, next_path: str = "/",
                status: int = 200) -> Response:
    templates = request.app.state.templates
    return templates.TemplateResponse(request, "login.html", {"error": error, "next": next_path,
                                                             "user": None}, status_code=status)


@router.get("/login", summary="public: the login form")
def login_form(request: Request, next: str | None = None) -> Response:
    """The login form."""
    return _login_page(request, next_path=_safe_next(next))


@router.post("/login", summary="public: log in", dependencies=[CheckedForm])
def login(request: Request, session: DbSession, name: Annotated[str, Form()],
          password: Annotated[str, Form()], next: Annotated[str, Form()] = "/") -> Response:
    """Check the name and password; on success a fresh session, else the form again."""
    try:
        user = authenticate(session, name, password, now())
    except LoginRefused as refused:
        session.commit()  # the failure count and the audit entry stay
        return _login_page(request, error=str(refused), next_path=_safe_next(next), status=401)
    audit.audit(session, user=user, username=user.name, action="login", now=now())
    session.commit()
    # A fresh session (and CSRF token) at login: nothing from before the login carries over.
    request.session.clear()
    request.session[USER_KEY] = user.id
    request.session[CSRF_KEY] = security.new_csrf_token()
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout", summary="public: log out", dependencies=[CheckedForm])
def logout(request: Request) -> Response:
    """End the session."""
    request.session.clear()
    return RedirectResponse("/login", status_code=303)

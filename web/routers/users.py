"""Accounts: the list and the form to add one (admins only; the CLI does the same)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, Response
from fastapi.responses import RedirectResponse

from db import accounts
from db.schema import Role
from service.accounts import AccountIn, AccountRefused, NameTaken, add_account
from web.deps import AdminUser, CheckedForm, DbSession, base_path, now

router = APIRouter(tags=["users"])


@router.get("/users", summary="admin: the accounts")
def users_page(request: Request, session: DbSession, user: AdminUser) -> Response:
    """Every account, and a form to add one."""
    return request.app.state.templates.TemplateResponse(request, "users.html", {
        "user": user, "users": accounts.list_users(session), "roles": [r.value for r in Role]})


@router.post("/users", summary="admin: add an account", dependencies=[CheckedForm])
def add_user(request: Request, session: DbSession, user: AdminUser, name: Annotated[str, Form()],
             email: Annotated[str, Form()], password: Annotated[str, Form()],
             role: Annotated[str, Form()] = "reviewer") -> Response:
    """Add an account (audited)."""
    try:
        add_account(session, AccountIn.parse(name, email, password, role), by=user, now=now())
    except NameTaken:
        raise HTTPException(422, "that name is taken") from None
    except AccountRefused as refused:
        raise HTTPException(422, str(refused)) from None
    session.commit()
    return RedirectResponse(f"{base_path(request)}/users", status_code=303)

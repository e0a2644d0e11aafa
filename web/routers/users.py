"""Accounts: the list and the form to add one (admins only; the CLI does the same)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import IntegrityError

from db import accounts, audit
from db.schema import Role
from web import security
from web.deps import AdminUser, CheckedForm, DbSession, now

router = APIRouter(tags=["users"])
MIN_PASSWORD = 10


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
    problem = check_new_account(name, email, password, role)
    if problem:
        raise HTTPException(422, problem)
    try:
        accounts.add_user(session, name=name, email=email, role=Role(role),
                         password_hash=security.hash_password(password), now=now())
        session.flush()
    except IntegrityError:
        raise HTTPException(422, "that name is taken") from None
    audit.audit(session, user=user, username=user.name, action="user_add", now=now(),
                  detail=f"{name} ({role})")
    session.commit()
    return RedirectResponse("/users", status_code=303)


def check_new_account(name: str, email: str, password: str, role: str) -> str | None:
    """What is wrong with these account details, or None."""
    from pydantic import EmailStr

    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-" for c in name):
        return "name: 1 to 64 letters, digits, '.', '_' or '-'"
    try:
        TypeAdapter(EmailStr).validate_python(email)
    except ValidationError:
        return "email: not a valid address"
    if role not in set(Role):
        return "role: reviewer or admin"
    if len(password) < MIN_PASSWORD:
        return f"password: at least {MIN_PASSWORD} characters"
    return None

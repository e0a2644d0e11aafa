"""Passwords (argon2id), logins with their lock after wrong passwords, CSRF tokens, HTTP Basic."""

from __future__ import annotations

import base64
import binascii
import secrets
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.orm import Session

from db import accounts, audit
from db.schema import User

_HASHER = PasswordHasher()
#: Verified against when the name is unknown, so that a wrong name takes as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


def hash_password(password: str) -> str:
    """The argon2id hash (PHC string) to store."""
    return _HASHER.hash(password)


def password_matches(stored_hash: str, password: str) -> bool:
    """Whether `password` is the one `stored_hash` was made from."""
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class LoginRefused(Exception):
    """A login that did not succeed; the message is safe to show (it never says which part was wrong)."""


def authenticate(session: Session, name: str, password: str, now: datetime) -> User:
    """The user whose name and password these are, or LoginRefused.

    Five wrong passwords in a row for a name lock it for a while (db.accounts.LOCK_FOR), even
    for the right password; each attempt is written to the audit log.
    """
    user = accounts.find_user(session, name)
    if user is None:
        password_matches(_DUMMY_HASH, password)
        audit.audit(session, user=None, username=name[:64], action="login_failed", now=now,
                      detail="unknown name")
        raise LoginRefused("wrong name or password")
    if accounts.is_locked(user, now):
        audit.audit(session, user=user, username=user.name, action="login_locked", now=now)
        raise LoginRefused("too many wrong passwords: this account is locked for a while")
    if not password_matches(user.password_hash, password) or not user.active:
        if user.active:
            accounts.record_login_failure(session, user, now)
        audit.audit(session, user=user, username=user.name, action="login_failed", now=now,
                      detail="locked" if accounts.is_locked(user, now) else None)
        raise LoginRefused("wrong name or password")
    accounts.record_login_success(session, user)
    return user


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

"""Accounts of the review app: find, add, list, and the lockout after wrong passwords.

Each function takes the session first and never commits (the caller owns the transaction).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import Role, User

#: Wrong passwords in a row after which an account is locked, and for how long.
MAX_FAILED_LOGINS = 5


LOCK_FOR = timedelta(minutes=15)


def find_user(session: Session, name: str) -> User | None:
    """The account with this name, if any."""
    return session.scalars(select(User).where(User.name == name)).one_or_none()


def add_user(session: Session, *, name: str, email: str, role: Role, password_hash: str,
             now: datetime) -> User:
    """A new active account; flushed, so it has its id (a taken name raises IntegrityError)."""
    user = User(name=name, email=email, role=role, password_hash=password_hash, active=True,
                failed_logins=0, created_at=now)
    session.add(user)
    session.flush()
    return user


def list_users(session: Session) -> list[User]:
    """Every account, by name."""
    return list(session.scalars(select(User).order_by(User.name)))


def is_locked(user: User, now: datetime) -> bool:
    """Whether too many wrong passwords in a row keep this account out for now."""
    return user.locked_until is not None and user.locked_until > now


def record_login_failure(session: Session, user: User, now: datetime) -> None:
    """One more wrong password; the fifth in a row locks the account for LOCK_FOR."""
    user.failed_logins += 1
    if user.failed_logins >= MAX_FAILED_LOGINS:
        user.locked_until = now + LOCK_FOR
        user.failed_logins = 0
    session.flush()


def record_login_success(session: Session, user: User) -> None:
    """A right password: the count of failures starts again."""
    if user.failed_logins or user.locked_until is not None:
        user.failed_logins = 0
        user.locked_until = None
        session.flush()

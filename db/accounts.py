"""Accounts of the review app: find, add, list, and the lockout after wrong passwords.

Each function takes the session first and never commits (the caller owns the transaction).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from sqlalchemy import case, delete, select, update
from sqlalchemy.orm import Session

from db.schema import Role, User, WebSession

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
    """One more wrong password; the fifth in a row locks the account for LOCK_FOR.

    Counted and locked in one UPDATE on the row's current value: concurrent wrong passwords
    each count (a read-modify-write here lost most of forty parallel guesses)."""
    locks = User.failed_logins + 1 >= MAX_FAILED_LOGINS
    session.execute(
        update(User).where(User.id == user.id)
        .values(failed_logins=case((locks, 0), else_=User.failed_logins + 1),
                locked_until=case((locks, now + LOCK_FOR), else_=User.locked_until))
        .execution_options(synchronize_session=False))
    session.refresh(user)


def reload(session: Session, user: User) -> None:
    """Read the account's row again (its count and lock, as other logins left them)."""
    session.refresh(user)


def record_login_success(session: Session, user: User) -> None:
    """A right password: the count of failures starts again."""
    if user.failed_logins or user.locked_until is not None:
        user.failed_logins = 0
        user.locked_until = None
        session.flush()

def credential_stamp(user: User) -> str:
    """What a session remembers of the password it was made with (a new one ends it)."""
    return hashlib.sha256(user.password_hash.encode()).hexdigest()


def token_hash(token: str) -> str:
    """How a session's cookie token is stored: its SHA-256, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def add_session(session: Session, user: User, *, token: str, path_key: str, csrf: str,
                now: datetime, lifetime: timedelta) -> WebSession:
    """A new login of `user`; expired sessions (of anyone) go at the same time."""
    session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    web_session = WebSession(token_hash=token_hash(token), path_key=path_key, user_id=user.id,
                             csrf=csrf, credential_stamp=credential_stamp(user), created_at=now,
                             expires_at=now + lifetime)
    session.add(web_session)
    session.flush()
    return web_session


def find_session(session: Session, *, token: str, path_key: str,
                 now: datetime) -> tuple[WebSession, User] | None:
    """The live session with this token at this path, and its user; None when it was ended,
    expired, made with a password since changed, or its account is disabled."""
    found = session.execute(
        select(WebSession, User).join(User, User.id == WebSession.user_id)
        .where(WebSession.token_hash == token_hash(token), WebSession.path_key == path_key,
               WebSession.expires_at > now)).one_or_none()
    if found is None:
        return None
    web_session, user = found.tuple()
    if not user.active or web_session.credential_stamp != credential_stamp(user):
        return None
    return web_session, user


def end_session(session: Session, web_session_id: int) -> None:
    """Log out: the session is gone for good."""
    session.execute(delete(WebSession).where(WebSession.id == web_session_id))


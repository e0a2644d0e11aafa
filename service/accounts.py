"""Accounts of the review app: the one account rule (`AccountIn`), adding one, passwords
(argon2id) and logins with their lock after wrong passwords. TensorFlow-free.

The CLI (`melanoscreen users`) and the web form (`/users`) both take an account through
`AccountIn`, so an address that is good enough for alerts (`melanoscreen.settings`'s one email
rule: special-use domains such as `alice@clinic.local` are accepted) is good enough for a login.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import accounts, audit
from db.schema import Role, User
from melanoscreen.settings import is_email_address

#: The shortest password an account may have.
MIN_PASSWORD = 10
#: Who did it, in the audit log, when an account is changed from the command line.
COMMAND_LINE = "(command line)"

_HASHER = PasswordHasher()
#: Verified against when the name is unknown, so that a wrong name takes as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


class AccountRefused(ValueError):
    """Account details that cannot be stored; the message names the field, in one line."""


class NameTaken(AccountRefused):
    """An account with this name exists already."""


def password_problem(password: str) -> str | None:
    """What is wrong with this password, or None."""
    if len(password) < MIN_PASSWORD:
        return f"password: at least {MIN_PASSWORD} characters"
    return None


@dataclass(frozen=True)
class AccountIn:
    """A new account as given: checked once, here, for every entry point."""

    name: str
    email: str
    password: str
    role: Role

    @classmethod
    def parse(cls, name: str, email: str, password: str, role: str) -> AccountIn:
        """The account, or AccountRefused naming what is wrong."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "._-" for c in name):
            raise AccountRefused("name: 1 to 64 letters, digits, '.', '_' or '-'")
        if not is_email_address(email):
            raise AccountRefused("email: not a valid address")
        if role not in set(Role):
            raise AccountRefused("role: reviewer or admin")
        problem = password_problem(password)
        if problem:
            raise AccountRefused(problem)
        return cls(name=name, email=email, password=password, role=Role(role))


def add_account(session: Session, account: AccountIn, *, by: User | None, now: datetime) -> User:
    """Store the account and its audit entry (`by`: the admin, None from the command line);
    NameTaken when the name is in use."""
    try:
        with session.begin_nested():
            user = accounts.add_user(session, name=account.name, email=account.email,
                                     role=account.role, password_hash=hash_password(account.password),
                                     now=now)
    except IntegrityError:
        raise NameTaken(f"a user named {account.name!r} exists already") from None
    audit.audit(session, user=by, username=by.name if by else COMMAND_LINE, action="user_add",
                now=now, detail=f"{account.name} ({account.role.value})")
    return user


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
    """A login that did not succeed; the message is safe to show (it never says which part was
    wrong, nor whether the name exists or is locked)."""


#: The one answer to every refused login: a locked name answers exactly as a wrong password
#: (and takes as long), so the lock tells nobody which names exist.
REFUSED = ("wrong name or password (after 5 wrong passwords a name waits 15 minutes; "
           "an admin can let it in at once with `melanoscreen users set-password`)")


def authenticate(session: Session, name: str, password: str, now: datetime) -> User:
    """The user whose name and password these are, or LoginRefused.

    Five wrong passwords in a row for a name lock it for a while (db.accounts.LOCK_FOR), even
    for the right password; refused attempts are counted in the audit log (a row per name and
    kind every ten minutes, one for all names that are no account). Every refusal says the
    same and costs one password check, whatever the reason.
    """
    user = accounts.find_user(session, name)
    if user is None:
        password_matches(_DUMMY_HASH, password)
        # Never the name typed: it may be a password typed into the wrong field.
        audit.count_refusal(session, user=None, action="login_failed", now=now)
        raise LoginRefused(REFUSED)
    right = password_matches(user.password_hash, password)
    # Re-read the row: concurrent wrong guesses may have locked it while the password was checked.
    accounts.reload(session, user)
    if accounts.is_locked(user, now):
        audit.count_refusal(session, user=user, action="login_locked", now=now)
        raise LoginRefused(REFUSED)
    if not right or not user.active:
        if user.active:
            accounts.record_login_failure(session, user, now)
        audit.count_refusal(session, user=user, action="login_failed", now=now,
                            locked=accounts.is_locked(user, now))
        raise LoginRefused(REFUSED)
    accounts.record_login_success(session, user)
    return user

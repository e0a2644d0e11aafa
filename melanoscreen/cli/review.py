"""The review app's commands: `web` (serve it) and `users` (accounts)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from melanoscreen.cli._common import (
    existing_data_folder,
    fail,
    load_settings,
    make_private,
    upgrade_schema,
    web_address,
    web_secret,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from melanoscreen.settings import Settings

users_app = typer.Typer(help="Review-app accounts: add, list, disable, set-password.",
                        no_args_is_help=True)


def web() -> None:
    """Serve the review app (worklist, case pages, reviews, JSON API), every page behind a login."""
    import uvicorn

    from web.app import create_app
    from web.deps import WebConfig

    settings = load_settings()
    upgrade_schema(settings)
    config = WebConfig(
        database_url=settings.database, secret=web_secret(settings),
        overlays_dir=settings.overlays_dir, thumbnails_dir=settings.thumbnails_dir,
        previews_dir=settings.previews_dir,
        timezone=settings.timezone,
        session_seconds=int(settings.web.session_hours * 3600),
        clinic_access=settings.web.clinic_access,
        secure_cookies=bool(settings.public_url and settings.public_url.startswith("https://")))
    typer.echo(f"review app: {web_address(settings)}  (accounts: melanoscreen users add)")
    uvicorn.run(create_app(config), host=settings.web.address, port=settings.web.port,
                log_level="warning", server_header=False, proxy_headers=False)


def _read_password(password_stdin: bool) -> str:
    if not password_stdin:
        fail("give the password on standard input with --password-stdin (never on the command line)")
    password = sys.stdin.readline().rstrip("\r\n")
    from service.accounts import password_problem

    problem = password_problem(password)
    if problem:
        fail(problem)
    return password


def _require_database(settings: Settings) -> None:
    """Accounts go into the database the running service reads: with the default SQLite one,
    a missing data folder means the wrong folder, never a new install to create here."""
    if settings.database_url is None:
        existing_data_folder(settings)


def _sessions(settings: Settings) -> sessionmaker[Session]:
    from db.session import make_session_factory

    _require_database(settings)
    upgrade_schema(settings)
    return make_session_factory(settings.database)


@users_app.command("add")
def users_add(name: str,
              email: Annotated[str, typer.Option(help="The user's email address.")],
              role: Annotated[str, typer.Option(help="reviewer or admin.")] = "reviewer",
              password_stdin: Annotated[bool, typer.Option("--password-stdin",
                                                           help="Read the password from stdin.")] = False,
              ) -> None:
    """Add an account (the password is read from standard input)."""
    from service.accounts import AccountIn, AccountRefused, add_account

    settings = load_settings()
    password = _read_password(password_stdin)
    try:
        account = AccountIn.parse(name, email, password, role)
        _require_database(settings)
        make_private(settings)
        with _sessions(settings).begin() as session:
            add_account(session, account, by=None, now=datetime.now(UTC))
    except AccountRefused as refused:
        fail(str(refused))
    typer.echo(f"added {name} ({role})")


@users_app.command("list")
def users_list() -> None:
    """Every account: name, email, role, active or disabled, locked."""


    from db import accounts

    settings = load_settings()
    now = datetime.now(UTC)
    with _sessions(settings).begin() as session:
        for user in accounts.list_users(session):
            state = "active" if user.active else "disabled"
            if accounts.is_locked(user, now):
                state += ", locked"
            clinics = " ".join(user.prefixes.split("\n")) if user.prefixes else ""
            typer.echo(f"{user.name:<20} {user.email:<32} {user.role.value:<9} {state}"
                       + (f"  {clinics}" if clinics else ""))


def _change(name: str, action: str, **values: object) -> None:
    from db import accounts, audit


    settings = load_settings()
    with _sessions(settings).begin() as session:
        user = accounts.find_user(session, name)
        if user is None:
            fail(f"no user named {name!r}")
        for key, value in values.items():
            setattr(user, key, value)
        audit.audit(session, user=None, username="(command line)", action=action,
                      now=datetime.now(UTC), detail=name)


@users_app.command("disable")
def users_disable(name: str) -> None:
    """Disable an account: it can no longer log in (its reviews stay)."""
    _change(name, "user_disable", active=False)
    typer.echo(f"disabled {name}")


@users_app.command("set-password")
def users_set_password(name: str, password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from stdin.")] = False) -> None:
    """Set an account's password (read from standard input); this also lifts a lock."""
    from service.accounts import hash_password

    password = _read_password(password_stdin)
    _change(name, "user_set_password", password_hash=hash_password(password), failed_logins=0,
            locked_until=None)
    typer.echo(f"password set for {name}")


@users_app.command("set-prefixes")
def users_set_prefixes(name: str, prefixes: Annotated[list[str] | None, typer.Argument(
        help="Source prefixes, as in MELANOSCREEN_ALERT_ROUTES (clinic-a/); none: every image.")]
        = None) -> None:
    """Give a reviewer their clinics: their worklist shows images under these prefixes by default."""
    given = [p.strip() for p in prefixes or [] if p.strip()]
    if any("\n" in p for p in given):
        fail("a prefix is one line")
    _change(name, "user_set_prefixes", prefixes="\n".join(dict.fromkeys(given)))
    typer.echo(f"{name}'s worklist shows " + (", ".join(given) if given else "every image"))


def register(app: typer.Typer) -> None:
    """Add `web` and `users` to the `melanoscreen` app."""
    app.command()(web)
    app.add_typer(users_app, name="users")

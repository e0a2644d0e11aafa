"""What every command shares: the settings or one error line naming the variable, and `fail`."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from pydantic import SecretStr

    from melanoscreen.settings import Settings

T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """The settings, or one error line naming the bad variable."""
    from pydantic import ValidationError

    from melanoscreen.settings import describe_error, get_settings

    # Alembic logs every plugin and step at INFO: keep command output to what matters.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        settings = get_settings()
    except ValidationError as exc:
        fail(describe_error(exc))
    logging.getLogger().setLevel(settings.log_level)
    return settings


#: `up` writes the URL of the Redis it started here, so commands in another shell can find it.
BROKER_FILE = "broker.url"


def known_broker(settings: Settings) -> str | None:
    """MELANOSCREEN_BROKER_URL, else the Redis that a running `up` recorded, else None."""
    if settings.broker_url:
        return settings.broker_url
    recorded = settings.data_path / BROKER_FILE
    return recorded.read_text().strip() if recorded.is_file() else None


def write_private(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only (0600), replacing it atomically."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
    os.replace(partial, path)


def make_private(settings: Settings) -> None:
    """Files we create are the owner's only (umask 0077); the data folder is 0700.

    A data folder left open by an older version is tightened, everything in it included.
    Children of `up` inherit the umask; each command sets it again when started alone.
    """
    os.umask(0o077)
    data = settings.data_path
    try:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(data.stat().st_mode) & 0o077:
            for root, dirs, files in os.walk(data):
                for name in (*dirs, *files):
                    entry = Path(root) / name
                    info = entry.lstat()
                    if not stat.S_ISLNK(info.st_mode):
                        entry.chmod(stat.S_IMODE(info.st_mode) & 0o700)
            data.chmod(0o700)
    except OSError as exc:
        fail(f"MELANOSCREEN_DATA_DIR: cannot use {data}: {exc.strerror or exc}")
    if not os.access(data, os.W_OK | os.X_OK):
        fail(f"MELANOSCREEN_DATA_DIR: {data} is not writable by this user")


def existing_data_folder(settings: Settings) -> Path:
    """The data folder that `status` and `results` read; one that is not there is never created
    (run from the wrong folder, they would show an empty new database instead)."""
    data = settings.data_path
    if not data.is_dir():
        fail(f"MELANOSCREEN_DATA_DIR: no data folder at {data} (run this where `melanoscreen up` "
             "runs, or set MELANOSCREEN_DATA_DIR)")
    if settings.database_url is None and not (data / "melanoscreen.db").is_file():
        fail(f"MELANOSCREEN_DATA_DIR: {data} holds no database (melanoscreen.db); is it the "
             "data folder of `melanoscreen up`?")
    return data


#: Held (flock) by the one watcher and the one beat of a data folder (`up` holds both for its
#: children): two watchers would race for files, two beats double the schedule. Each says who
#: holds it, for the one line a second start prints.
LOCK_FILES = {"watch": "watch.lock", "beat": "beat.lock"}
#: `up` tells its children its pid here: under `up`, whose lock covers them, they take none.
SUPERVISOR_PID = "MELANOSCREEN_UP_PID"


def hold_data_folder(settings: Settings, role: str) -> None:
    """Take the data folder's locks of `role` (`up`: the watcher's and beat's) for the life of
    this process (the descriptors stay open); a second one fails with one line naming the holder."""
    if os.environ.get(SUPERVISOR_PID) == str(os.getppid()):
        return  # a child of `up`, which holds the locks
    for part in (("watch", "beat") if role == "up" else (role,)):
        _hold(settings.data_path, LOCK_FILES[part], role)


def _hold(data: Path, name: str, role: str) -> int:
    import fcntl
    from datetime import UTC, datetime

    path = data / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        fail(f"MELANOSCREEN_DATA_DIR: cannot lock {path}: {exc.strerror or exc}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        fail(f"MELANOSCREEN_DATA_DIR: {data} is in use by {holder}; one instance per data "
             "folder (stop that one first)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"melanoscreen {role} (pid {os.getpid()}, started "
                  f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC)\n".encode(), 0)
    return fd


def upgrade_schema(settings: Settings) -> None:
    """Bring the schema to the latest revision, or fail with one line."""
    from db.migrate import upgrade

    make_private(settings)
    try:
        upgrade(settings.database)
    except Exception as exc:
        # Name what the user set: the URL, or (by default) the data folder holding the file.
        where = ("MELANOSCREEN_DATABASE_URL" if settings.database_url else
                 f"MELANOSCREEN_DATA_DIR: {settings.data_path / 'melanoscreen.db'}")
        fail(f"{where}: cannot open or upgrade the database: {str(exc).splitlines()[0]}")


def parse_option(option: str, value: str, parse: Callable[[str], T], what: str) -> T:
    """`parse(value)` for `option`, else one error line saying the value is not `what`."""
    try:
        return parse(value)
    except ValueError:
        fail(f"{option}: not {what}: {value!r}")


def parse_when(option: str, value: str | None) -> datetime | None:
    """An ISO date or time given to `option` (UTC unless it says otherwise), else one error line."""
    if value is None:
        return None
    when = parse_option(option, value, datetime.fromisoformat, "an ISO date or time")
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def broker_or_fail(settings: Settings) -> str:
    """The broker's URL (MELANOSCREEN_BROKER_URL or the running `up`'s), else one error line."""
    broker = known_broker(settings)
    if broker is None:
        fail("MELANOSCREEN_BROKER_URL: not set, and no `melanoscreen up` is running in "
             f"{settings.data_dir} (start one, or point this at your Redis)")
    return broker


def ping_broker(broker: str, timeout: float = 3.0) -> None:
    """A Redis broker must answer a ping within `timeout` seconds, else one error line."""
    if not broker.startswith(("redis://", "rediss://", "unix://")):
        return
    import redis

    try:
        redis.Redis.from_url(broker, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
    except (redis.RedisError, OSError) as exc:
        fail(f"MELANOSCREEN_BROKER_URL: the broker does not answer: {exc}")


def kept_secret(configured: SecretStr | None, path: Path, make: Callable[[], str]) -> tuple[str, bool]:
    """A secret: the configured one, else the one kept at `path` (0600), else a new one from
    `make`, kept there. Returns it and whether it was made just now."""
    if configured is not None:
        return configured.get_secret_value(), False
    if path.is_file():
        return path.read_text().strip(), False
    secret = make()
    write_private(path, secret + "\n")
    return secret, True


def flower_password(settings: Settings) -> tuple[str, bool]:
    """Flower's password: MELANOSCREEN_FLOWER_PASSWORD, else the one generated into the data
    folder on first start (0600). Returns it and whether it was generated just now."""
    return kept_secret(settings.flower.password, settings.flower_password_file,
                       lambda: secrets.token_urlsafe(24))


def web_secret(settings: Settings) -> str:
    """The key that signs session cookies: MELANOSCREEN_WEB_SECRET, else the one generated into
    the data folder on first start (0600)."""
    return kept_secret(settings.web.secret, settings.web_secret_file,
                       lambda: secrets.token_urlsafe(48))[0]


def web_address(settings: Settings) -> str:
    """Where the review app answers (what `up` and `web` print)."""
    return f"http://{settings.web.address}:{settings.web.port}"

"""One typed settings object, read from `MELANOSCREEN_*` variables and an optional `.env` file."""

from __future__ import annotations

import ipaddress
from datetime import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import EmailStr, Field, SecretStr, TypeAdapter, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from worker.mail import SmtpConfig

ENV_PREFIX = "MELANOSCREEN_"
_EMAIL = TypeAdapter(EmailStr)


class Settings(BaseSettings):
    """Everything the service can be told from outside; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore",
                                      validate_default=True)

    data_dir: Path = Path("./melanoscreen-data")
    inbox: Path | None = None
    database_url: str | None = None
    broker_url: str | None = None
    model: Path | None = None
    alert_threshold: float | None = None
    alert_recipients: Annotated[list[str], NoDecode] = Field(default_factory=list)

    smtp_host: str | None = None
    #: No port: 587 for starttls (the default), 465 for tls, 25 for none.
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: Literal["none", "starttls", "tls"] = "starttls"
    smtp_sender: str = "melanoscreen@localhost"
    #: An extra certificate (PEM) to trust, e.g. a private CA of the mail server.
    smtp_cafile: Path | None = None
    smtp_timeout: float = Field(default=30.0, gt=0.0)
    #: Delivery tries per message before it is marked `failed`, and the first retry's ceiling
    #: (seconds; it doubles per try, full jitter, capped at an hour).
    alert_max_attempts: int = Field(default=8, ge=1)
    alert_retry_base: float = Field(default=30.0, gt=0.0)

    digest_time: time = time(7, 0)
    timezone: str = "UTC"

    flower_address: str = "127.0.0.1"
    flower_port: int = Field(default=5555, ge=1, le=65535)
    flower_user: str | None = None
    flower_password: SecretStr | None = None

    #: Image ids per screening task, and how long (seconds) the watcher waits to fill a batch.
    batch_size: int = Field(default=16, ge=1, le=512)
    batch_delay: float = Field(default=0.5, ge=0.0, le=60.0)
    #: The sweep runs every `sweep_interval` seconds and re-enqueues images left `queued` or
    #: `screening` for longer than `sweep_limit` seconds.
    sweep_interval: float = Field(default=60.0, gt=0.0)
    sweep_limit: float = Field(default=600.0, gt=0.0)
    #: Screening attempts before an image is marked `failed`.
    max_attempts: int = Field(default=5, ge=1)
    #: The watcher's full rescan of the inbox (seconds), and how long a file's size and mtime
    #: must stay unchanged before it is taken without a close-after-write event.
    rescan_interval: float = Field(default=30.0, gt=0.0)
    stable_seconds: float = Field(default=2.0, ge=0.0)
    worker_concurrency: int | None = Field(default=None, ge=1)
    #: Redis visibility timeout (seconds): longer than the longest screening task.
    visibility_timeout: int = Field(default=3600, ge=60)
    #: Port of the embedded Redis that `up` starts (0: any free port).
    redis_port: int = Field(default=0, ge=0, le=65535)

    @field_validator("alert_threshold")
    @classmethod
    def _threshold_in_unit_interval(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError("must be between 0 and 1")
        return value

    @field_validator("alert_recipients", mode="before")
    @classmethod
    def _split_recipients(cls, value: object) -> list[str]:
        if value is None or value == "":
            return []
        items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        addresses = []
        for item in (str(i).strip() for i in items):
            if not item:
                continue
            try:
                addresses.append(_EMAIL.validate_python(item))
            except ValidationError:
                raise ValueError(f"not a valid email address: {item!r}") from None
        return addresses

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone: {value!r}") from None
        return value

    @property
    def inbox_dir(self) -> Path:
        """The watched folder."""
        return (self.inbox or self.data_dir / "inbox").absolute()

    @property
    def database(self) -> str:
        """The SQLAlchemy URL: the setting, else SQLite in the data folder."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'melanoscreen.db').absolute()}"

    @property
    def flower_is_loopback(self) -> bool:
        """Whether Flower binds only to this machine."""
        if self.flower_address == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.flower_address).is_loopback
        except ValueError:
            return False

    def smtp_config(self) -> SmtpConfig:
        """The mail settings as the delivery code takes them (no host: the outbox folder)."""
        from worker.mail import SmtpConfig

        return SmtpConfig(
            host=self.smtp_host or None, port=self.smtp_port, user=self.smtp_user or None,
            password=self.smtp_password.get_secret_value() if self.smtp_password else None,
            security=self.smtp_security, sender=self.smtp_sender, timeout=self.smtp_timeout,
            cafile=self.smtp_cafile.absolute() if self.smtp_cafile else None)

    def require_broker(self) -> str:
        """The broker URL; only `up` may run without one (it starts its own Redis)."""
        if not self.broker_url:
            raise ValueError("MELANOSCREEN_BROKER_URL: not set (melanoscreen up starts a Redis "
                             "and sets it for its children)")
        return self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings, read once per process."""
    return Settings()


def describe_error(error: ValidationError) -> str:
    """One line naming the variable: 'MELANOSCREEN_ALERT_THRESHOLD: must be between 0 and 1'."""
    first = error.errors()[0]
    name = str(first["loc"][0]).upper() if first.get("loc") else "SETTINGS"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{ENV_PREFIX}{name}: {message}"

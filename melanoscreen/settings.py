"""One typed settings object, read from `MELANOSCREEN_*` variables and an optional `.env` file.

Related variables form nested models (`MELANOSCREEN_SMTP_HOST` is `settings.smtp.host`), so each
side of the service is handed the part it needs. A leaf: it imports nothing of ours.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "MELANOSCREEN_"
#: An address's syntax (RFC 5322 dot-atom @ host name): nothing about deliverability, so
#: special-use domains (`derm@hospital.local`, `melanoscreen@localhost`) are accepted.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_EMAIL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*\.?")


def is_email_address(text: str) -> bool:
    """Whether `text` is an email address by its syntax alone (local part at most 64 bytes)."""
    local, _, domain = text.rpartition("@")
    return bool(_EMAIL.fullmatch(text)) and len(local) <= 64 and len(domain) <= 253
_DEFAULT_SMTP_PORTS = {"none": 25, "starttls": 587, "tls": 465}


class SmtpSettings(BaseModel):
    """`MELANOSCREEN_SMTP_*`: how to reach the mail server; no host: `.eml` files in outbox/."""

    host: str | None = None
    #: No port: 587 for starttls (the default), 465 for tls, 25 for none.
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = None
    password: SecretStr | None = None
    security: Literal["none", "starttls", "tls"] = "starttls"
    sender: str = "melanoscreen@localhost"
    #: An extra certificate (PEM) to trust, e.g. a private CA of the mail server.
    cafile: Path | None = None
    timeout: float = Field(default=30.0, gt=0.0)  # seconds per socket operation

    @property
    def effective_port(self) -> int:
        """The configured port, else the standard one for the security mode."""
        return self.port if self.port is not None else _DEFAULT_SMTP_PORTS[self.security]


class AlertSettings(BaseModel):
    """`MELANOSCREEN_ALERT_*`: who is told about a flagged image, and how hard delivery tries."""

    #: Melanoma probability at or above which an image is flagged; None: the model card's.
    threshold: float | None = None
    recipients: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Delivery tries per message before it is marked `failed`, and the first retry's ceiling
    #: (seconds; it doubles per try, full jitter, capped at an hour).
    max_attempts: int = Field(default=8, ge=1)
    retry_base: float = Field(default=30.0, gt=0.0)
    #: `MELANOSCREEN_ALERT_ROUTES`, `clinic-a/=a@x,b@x;clinic-b/=c@x`: an image whose source
    #: starts with a prefix alerts that prefix's recipients instead (longest prefix wins).
    routes: Annotated[dict[str, list[str]], NoDecode] = Field(default_factory=dict)

    @field_validator("threshold")
    @classmethod
    def _threshold_in_unit_interval(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError("must be between 0 and 1")
        return value

    @field_validator("recipients", mode="before")
    @classmethod
    def _split_recipients(cls, value: object) -> list[str]:
        if value is None or value == "":
            return []
        items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        addresses = []
        for item in (str(i).strip() for i in items):
            if not item:
                continue
            if not is_email_address(item):
                raise ValueError(f"not a valid email address: {item!r}")
            addresses.append(item)
        return addresses

    @field_validator("routes", mode="before")
    @classmethod
    def _split_routes(cls, value: object) -> dict[str, list[str]]:
        if value is None or value == "":
            return {}
        if isinstance(value, dict):
            return {str(k): cls._split_recipients(v) for k, v in value.items()}
        routes: dict[str, list[str]] = {}
        for part in (p.strip() for p in str(value).split(";")):
            if not part:
                continue
            prefix, equals, addresses = part.partition("=")
            prefix = prefix.strip()
            if not equals or not prefix:
                raise ValueError(f"a route is PREFIX=ADDRESS[,ADDRESS...], not {part!r}")
            if prefix in routes:
                raise ValueError(f"prefix {prefix!r} given twice")
            recipients = cls._split_recipients(addresses)
            if not recipients:
                raise ValueError(f"route {prefix!r} has no recipient")
            routes[prefix] = recipients
        return routes

    def route_for(self, source: str) -> str | None:
        """The longest route prefix that `source` (relative to the inbox) starts with, if any."""
        matching = [prefix for prefix in self.routes if source.startswith(prefix)]
        return max(matching, key=len) if matching else None

    def recipients_for(self, source: str) -> list[str]:
        """Who is alerted about an image at `source`: its route's recipients, else the global ones."""
        route = self.route_for(source)
        return self.routes[route] if route is not None else self.recipients

    @property
    def anyone(self) -> bool:
        """Whether any alert can go anywhere (global recipients or a route)."""
        return bool(self.recipients or self.routes)


class DigestSettings(BaseModel):
    """`MELANOSCREEN_DIGEST_TIME`: when the nightly digest is due (in `MELANOSCREEN_TIMEZONE`)."""

    time: dt.time = dt.time(7, 0)


class FlowerSettings(BaseModel):
    """`MELANOSCREEN_FLOWER_*`: the dashboard's address and basic auth (always on: with no
    password set, one is generated into the data folder)."""

    address: str = "127.0.0.1"
    port: int = Field(default=5555, ge=1, le=65535)
    user: str | None = None
    password: SecretStr | None = None

    @property
    def login(self) -> str:
        """The basic-auth user name."""
        return self.user or "melanoscreen"

    @property
    def is_loopback(self) -> bool:
        """Whether Flower binds only to this machine."""
        if self.address == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.address).is_loopback
        except ValueError:
            return False


class WebSettings(BaseModel):
    """`MELANOSCREEN_WEB_*`: the review app's address and the key that signs its session
    cookies (with no secret set, one is generated into the data folder)."""

    address: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    secret: SecretStr | None = None
    #: How long (seconds) a login lasts.
    session_hours: float = Field(default=12.0, gt=0.0)
    #: `open`: a reviewer's clinics (`users set-prefixes`) are the worklist's default filter and
    #: every reviewer may open every case; `enforced`: a reviewer with clinics sees, opens,
    #: downloads and reviews only their clinics' images, in pages, files and API alike.
    clinic_access: Literal["open", "enforced"] = "open"


#: An AE title (PS3.5 6.2): 1 to 16 characters of the default repertoire, no backslash or
#: control character, not only spaces.
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")


def _ae_title(text: str) -> str:
    title = text.strip()
    if not _AE_TITLE.fullmatch(title):
        raise ValueError(f"not an AE title (1 to 16 printable characters, no backslash): {text!r}")
    return title


class DicomPeer(BaseModel):
    """One allowed caller: its AE title and, optionally, the one address it may call from."""

    ae_title: str
    address: str | None = None

    def allows(self, ae_title: str, address: str) -> bool:
        """Whether a caller with this AE title, from this address, is this peer."""
        if ae_title.strip() != self.ae_title:
            return False
        if self.address is None:
            return True
        try:
            return ipaddress.ip_address(address) == ipaddress.ip_address(self.address)
        except ValueError:
            return False


class DicomSettings(BaseModel):
    """`MELANOSCREEN_DICOM_*`: the DICOM listener (a Storage SCP), off without a port.

    `peers` (`MODALITY1@10.0.0.5,PACS`) are the calling AE titles allowed, each optionally
    from one IP address; anyone else is refused at association. `pseudonymise` keeps only a
    keyed hash of the patient ID and drops names and birth dates at intake.
    """

    port: int | None = Field(default=None, ge=1, le=65535)
    address: str = "127.0.0.1"
    ae_title: str = "MELANOSCREEN"
    peers: Annotated[list[DicomPeer], NoDecode] = Field(default_factory=list)
    pseudonymise: bool = False

    @field_validator("port", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("address")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        if value == "localhost":
            return "127.0.0.1"
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"not an IP address: {value!r}") from None

    @field_validator("peers", mode="before")
    @classmethod
    def _split_peers(cls, value: object) -> list[DicomPeer]:
        if value is None or value == "":
            return []
        if isinstance(value, list):
            return [v if isinstance(v, DicomPeer) else DicomPeer.model_validate(v) for v in value]
        peers = []
        for item in (part.strip() for part in str(value).split(",")):
            if not item:
                continue
            title, at, address = item.rpartition("@") if "@" in item else (item, "", "")
            if at and not address.strip():
                raise ValueError(f"a peer is AE_TITLE or AE_TITLE@IP-ADDRESS, not {item!r}")
            peer_address = None
            if at:
                try:
                    peer_address = str(ipaddress.ip_address(address.strip()))
                except ValueError:
                    raise ValueError(f"peer {item!r}: not an IP address: {address!r}") from None
            peers.append(DicomPeer(ae_title=_ae_title(title), address=peer_address))
        return peers

    @property
    def enabled(self) -> bool:
        """Whether the listener runs (a port is set)."""
        return self.port is not None

    @property
    def is_loopback(self) -> bool:
        """Whether the listener binds only to this machine."""
        return ipaddress.ip_address(self.address).is_loopback

    def allows(self, ae_title: str, address: str) -> bool:
        """Whether a caller (its AE title, the address it calls from) may associate."""
        return any(peer.allows(ae_title, address) for peer in self.peers)


class BatchSettings(BaseModel):
    """`MELANOSCREEN_BATCH_*`: image ids per screening task, and how long (seconds) the watcher
    waits to fill a batch."""

    size: int = Field(default=16, ge=1, le=512)
    delay: float = Field(default=0.5, ge=0.0, le=60.0)


class SweepSettings(BaseModel):
    """`MELANOSCREEN_SWEEP_*`: the sweep runs every `interval` seconds and re-enqueues work left
    unfinished for longer than `limit` seconds; a worker's claim on a batch lasts `lease`
    seconds (about twice the longest batch), so a dead worker's batch is taken again within
    `lease + interval`, whatever the broker's visibility timeout."""

    interval: float = Field(default=15.0, gt=0.0)
    limit: float = Field(default=600.0, gt=0.0)
    lease: float = Field(default=40.0, gt=0.0)


class Settings(BaseSettings):
    """Everything the service can be told from outside; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore",
                                      validate_default=True, env_nested_delimiter="_",
                                      env_nested_max_split=1)

    data_dir: Path = Path("./melanoscreen-data")
    inbox: Path | None = None
    database_url: str | None = None
    broker_url: str | None = None
    model: Path | None = None
    timezone: str = "UTC"

    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    alert: AlertSettings = Field(default_factory=AlertSettings)
    digest: DigestSettings = Field(default_factory=DigestSettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    #: The review app's address as emails should link to it (e.g. https://melanoscreen.clinic.example).
    public_url: str | None = None

    #: Hours after screening before a flagged image still unreviewed sends one reminder alert
    #: (to its recipients and MELANOSCREEN_ESCALATE_TO); 0: never.
    escalate_after: float = Field(default=24.0, ge=0.0)
    escalate_to: Annotated[list[str], NoDecode] = Field(default_factory=list)

    #: Screening attempts before an image is marked `failed`.
    max_attempts: int = Field(default=5, ge=1)
    #: The watcher's full rescan of the inbox (seconds), and how long a file's size and mtime
    #: must stay unchanged before it is taken without a close-after-write event.
    rescan_interval: float = Field(default=30.0, gt=0.0)
    stable_seconds: float = Field(default=2.0, ge=0.0)
    #: The largest inbox file that is read (bytes), checked from its size before any byte is
    #: read or copied: dermoscopy images are a few megabytes; a shared inbox may hold anything.
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    worker_concurrency: int | None = Field(default=None, ge=1)
    #: How much the services log: INFO is what an operator reads (a line per batch and per
    #: message); DEBUG adds housekeeping (sweeps, digest checks) and Celery's per-task lines.
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"],
                         BeforeValidator(lambda value: str(value).strip().upper())] = "INFO"
    #: Redis visibility timeout (seconds): longer than the longest screening task.
    visibility_timeout: int = Field(default=3600, ge=60)
    #: Port of the embedded Redis that `up` starts (0: any free port).
    redis_port: int = Field(default=0, ge=0, le=65535)
    #: How often (seconds) `up` asks its worker, through the broker, which queues it consumes;
    #: a worker that does not answer or consumes nothing twice in a row is restarted.
    worker_check_interval: float = Field(default=30.0, gt=0.0)

    @field_validator("escalate_to", mode="before")
    @classmethod
    def _split_escalate_to(cls, value: object) -> list[str]:
        return AlertSettings._split_recipients(value)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone: {value!r}") from None
        return value

    @property
    def data_path(self) -> Path:
        """The data folder, absolute."""
        return self.data_dir.absolute()

    @property
    def inbox_dir(self) -> Path:
        """The watched folder."""
        return (self.inbox or self.data_dir / "inbox").absolute()

    @property
    def store_dir(self) -> Path:
        """Accepted images, one file per content: store/ab/<sha256>.<ext>."""
        return self.data_path / "store"

    @property
    def duplicates_dir(self) -> Path:
        """Later arrivals of a content already known."""
        return self.data_path / "duplicates"

    @property
    def quarantine_dir(self) -> Path:
        """Unreadable files, each with a `.reason.txt` beside it."""
        return self.data_path / "quarantine"

    @property
    def staging_dir(self) -> Path:
        """Private copies of inbox files being taken (hard-linked or another user's)."""
        return self.data_path / "incoming"

    @property
    def recipients_file(self) -> Path:
        """Who the running worker emails (JSON): `status` reads it, since its own shell's
        settings may differ from the service's."""
        return self.data_path / "recipients.json"

    @property
    def first_start_file(self) -> Path:
        """When the service first started on this data folder (no digest for days before it)."""
        return self.data_path / "first-start"

    @property
    def heartbeat_file(self) -> Path:
        """Touched by the running watcher every few seconds; its mtime says the watcher lives."""
        return self.data_path / "watch.heartbeat"

    @property
    def flower_password_file(self) -> Path:
        """Flower's generated password (0600), when MELANOSCREEN_FLOWER_PASSWORD is not set."""
        return self.data_path / "flower.password"

    @property
    def web_secret_file(self) -> Path:
        """The review app's generated cookie-signing key (0600), when MELANOSCREEN_WEB_SECRET is unset."""
        return self.data_path / "web.secret"

    @property
    def overlays_dir(self) -> Path:
        """Grad-CAM overlays (PNG) the worker made for alerts, one per image: overlays/<sha256>.png."""
        return self.data_path / "overlays"

    @property
    def thumbnails_dir(self) -> Path:
        """Thumbnails the worker made at screening time, one per image: thumbnails/<sha256>.jpg."""
        return self.data_path / "thumbnails"

    @property
    def previews_dir(self) -> Path:
        """JPEG pictures of screened DICOM images (browsers cannot show DICOM), made by the
        worker: previews/<sha256>.jpg."""
        return self.data_path / "previews"

    @property
    def dicom_key_file(self) -> Path:
        """The key (0600) of the patient ID's keyed hash in pseudonymised DICOM intake, made
        on first use and kept: the same patient keeps the same pseudonym across starts."""
        return self.data_path / "dicom.key"

    @property
    def outbox_dir(self) -> Path:
        """Where messages go as `.eml` files when no SMTP host is configured."""
        return self.data_path / "outbox"

    @property
    def database(self) -> str:
        """The SQLAlchemy URL: the setting, else SQLite in the data folder."""
        return self.database_url or f"sqlite:///{self.data_path / 'melanoscreen.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings, read once per process."""
    return Settings()


def describe_error(error: ValidationError) -> str:
    """One line naming the variable: 'MELANOSCREEN_ALERT_THRESHOLD: must be between 0 and 1'."""
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if isinstance(part, str)]
    name = "_".join(loc).upper() if loc else "SETTINGS"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{ENV_PREFIX}{name}: {message}"

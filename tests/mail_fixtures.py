"""Real SMTP servers on loopback (aiosmtpd), a self-signed certificate, synthetic lesion images.

Helpers for tests/test_mail.py and tests/test_digest.py; the pytest fixtures live in those files.
"""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import math
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from PIL import Image, ImageDraw, ImageFilter

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@dataclass
class Received:
    """One message as the server got it."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes  # the DATA as it arrived


@dataclass
class RecordingHandler:
    """aiosmtpd handler that keeps every message and refuses chosen recipients."""

    reject: dict[str, str] = field(default_factory=dict)  # address -> SMTP reply, e.g. "550 ..."
    messages: list[Received] = field(default_factory=list)
    auth_mechanisms: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        """Refuse the addresses in `reject`, accept the rest."""
        if address in self.reject:
            return self.reject[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Parse and keep the message."""
        parsed = BytesParser(policy=policy.default).parsebytes(envelope.original_content)
        assert isinstance(parsed, EmailMessage)
        with self.lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), parsed,
                                          envelope.original_content))
        return "250 Message accepted for delivery"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until `count` messages arrived; return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} message(s), got {len(self.messages)}")


def password_authenticator(handler: RecordingHandler, user: str, password: str) -> Any:
    """An aiosmtpd authenticator accepting exactly one user and password."""

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        handler.auth_mechanisms.append(mechanism)
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        return AuthResult(success=ok, handled=False)

    return authenticate


@contextmanager
def smtp_server(handler: RecordingHandler, port: int | None = None, **kwargs: Any) -> Iterator[Controller]:
    """Run an aiosmtpd server on loopback for the duration of the block."""
    controller = Controller(
        handler,
        hostname=LOOPBACK,
        port=port or free_port(),
        server_hostname="mail.test",
        ready_timeout=10.0,
        **kwargs,
    )
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for localhost and 127.0.0.1, as files."""

    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side TLS context using this certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_certificate(folder: Path) -> Certificate:
    """Generate a fresh self-signed certificate (EC P-256) into `folder`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file = folder / "smtp-cert.pem"
    key_file = folder / "smtp-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert_file, key_file)


def synthetic_lesion(seed: int, size: int = 600, fmt: str = "JPEG") -> bytes:
    """A made-up dermoscopy-like picture: a dark irregular blot on skin tones."""
    rng = random.Random(seed)
    skin = (rng.randint(200, 235), rng.randint(160, 190), rng.randint(130, 160))
    image = Image.new("RGB", (size, size), skin)
    draw = ImageDraw.Draw(image)
    centre = size / 2
    for ring in range(12, 0, -1):
        radius = size * 0.32 * ring / 12
        shade = 40 + ring * 12 + rng.randint(-10, 10)
        colour = (shade + 40, max(0, shade - 5), max(0, shade - 25))
        points = []
        for step in range(24):
            angle = 2 * math.pi * step / 24
            wobble = radius * (0.8 + 0.35 * rng.random())
            points.append((centre + wobble * math.cos(angle), centre + wobble * math.sin(angle)))
        draw.polygon(points, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(size / 120))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def synthetic_heatmap(seed: int, size: int = 300) -> bytes:
    """A made-up Grad-CAM-like overlay, PNG."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (20, 20, 120))
    draw = ImageDraw.Draw(image)
    cx, cy = size * (0.4 + 0.2 * rng.random()), size * (0.4 + 0.2 * rng.random())
    for ring in range(10, 0, -1):
        radius = size * 0.45 * ring / 10
        heat = 255 - ring * 20
        draw.ellipse(
            (cx - radius, cy - radius, cx + radius, cy + radius),
            fill=(heat, max(0, 200 - ring * 15), max(0, 120 - heat // 2)),
        )
    image = image.filter(ImageFilter.GaussianBlur(size / 60))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def image_parts(message: EmailMessage) -> list[EmailMessage]:
    """Every image/* part of a message."""
    return [part for part in message.walk() if part.get_content_maintype() == "image"]


def decoded_images(parts: Iterable[EmailMessage]) -> list[Image.Image]:
    """Decode the given image parts with Pillow (raises if one is not an image)."""
    images = []
    for part in parts:
        payload = part.get_content()
        with Image.open(io.BytesIO(payload)) as opened:
            opened.load()
            images.append(opened.copy())
    return images

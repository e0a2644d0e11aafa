"""Alert emails against a real SMTP server (aiosmtpd on loopback): content, TLS, login, failures."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from mail_fixtures import (
    LOOPBACK,
    Certificate,
    RecordingHandler,
    decoded_images,
    free_port,
    image_parts,
    make_certificate,
    password_authenticator,
    smtp_server,
    synthetic_heatmap,
    synthetic_lesion,
)

from model.data import ISIC_CLASSES as CLASSES
from worker.mail import (
    DISCLAIMER,
    AlertContent,
    FlaggedImage,
    PermanentMailError,
    SmtpConfig,
    TransientMailError,
    alert_message_id,
    backoff_delay,
    compose_alert,
    deliver,
    outbox_file_name,
)

DOCTORS = ["dr.a@clinic.test", "dr.b@clinic.test"]
SENDER = "melanoscreen@clinic.test"


def flagged(source: str, p: float, seed: int, *, gradcam: bool = True) -> FlaggedImage:
    """A flagged image whose nine probabilities sum to 1 with `p` on melanoma."""
    rest = (1.0 - p) / 8
    probabilities = {name: (p if name == "melanoma" else rest) for name in CLASSES}
    return FlaggedImage(
        source=source,
        melanoma_probability=p,
        probabilities=probabilities,
        predicted_class="melanoma",
        received_at=datetime(2026, 11, 24, 9, 15, tzinfo=UTC),
        image=synthetic_lesion(seed),
        gradcam_png=synthetic_heatmap(seed) if gradcam else None,
    )


def one_alert() -> AlertContent:
    return AlertContent(
        images=[flagged("clinic-a/patient-17/lesion2.jpg", 0.8712, 1)],
        model_version="dermnet-2026.11",
        threshold=0.35,
        timezone="Europe/Berlin",
    )


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def plain_server(handler: RecordingHandler) -> Iterator[SmtpConfig]:
    with smtp_server(handler) as controller:
        yield SmtpConfig(host=LOOPBACK, port=controller.port, sender=SENDER, timeout=5)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return make_certificate(tmp_path_factory.mktemp("tls"))


def test_an_alert_has_text_and_html_with_inline_lesion_and_gradcam_images(
    plain_server: SmtpConfig, handler: RecordingHandler, tmp_path: Path
) -> None:
    message = compose_alert(one_alert(), message_id="alert-42@melanoscreen.test")
    result = deliver(message, DOCTORS, plain_server, tmp_path)

    assert result.accepted == tuple(DOCTORS) and not result.rejected and result.complete
    [received] = handler.wait_for(1)
    got = received.message
    assert received.rcpt_tos == DOCTORS and received.mail_from == SENDER
    assert got["Subject"] == "Melanoma suspected (p=0.87): clinic-a/patient-17/lesion2.jpg"
    assert got["Message-ID"] == "<alert-42@melanoscreen.test>"
    assert got["From"] == SENDER and got["Date"] is not None
    assert got.get_content_type() == "multipart/alternative"

    text = got.get_body(preferencelist=("plain",))
    html_part = got.get_body(preferencelist=("html",))
    assert text is not None and html_part is not None
    plain = text.get_content()
    html = html_part.get_content()
    for body in (plain, html):
        assert "clinic-a/patient-17/lesion2.jpg" in body
        assert "dermnet-2026.11" in body and "0.35" in body
        assert "screening aid, not a diagnosis" in body
        assert all(name in body for name in CLASSES)
        assert "0.871" in body and "0.016" in body  # melanoma and one of the other eight
    assert DISCLAIMER in plain
    assert "2026-11-24 10:15 CET" in plain  # 09:15 UTC shown in the configured zone

    images = image_parts(got)
    assert len(images) == 2
    content_ids = {part["Content-ID"].strip("<>") for part in images}
    assert set(re.findall(r'src="cid:([^"]+)"', html)) == content_ids
    related = [p for p in got.walk() if p.get_content_type() == "multipart/related"]
    assert len(related) == 1
    for picture in decoded_images(images):
        assert max(picture.size) <= 512 and picture.size[0] > 16


def test_several_flagged_images_make_one_message_with_the_count_in_the_subject(
    plain_server: SmtpConfig, handler: RecordingHandler, tmp_path: Path
) -> None:
    alert = AlertContent(
        images=[
            flagged("clinic-b/p1/a.jpg", 0.52, 2, gradcam=False),
            flagged("clinic-b/p2/first.png", 0.91, 3),
            flagged("clinic-b/p3/c.jpg", 0.77, 4),
        ],
        model_version="v7",
        threshold=0.5,
    )
    deliver(compose_alert(alert, message_id=alert_message_id("batch-9")), DOCTORS, plain_server, tmp_path)

    [received] = handler.wait_for(1)
    got = received.message
    assert got["Subject"] == (
        "Melanoma suspected in 3 images (highest p=0.91): clinic-b/p2/first.png and 2 more"
    )
    plain = got.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    # Highest probability first.
    assert plain.index("first.png") < plain.index("p3/c.jpg") < plain.index("p1/a.jpg")
    assert len(decoded_images(image_parts(got))) == 5  # three lesions, two Grad-CAM overlays


def test_a_permanent_refusal_fails_only_that_address(tmp_path: Path) -> None:
    handler = RecordingHandler(reject={"gone@clinic.test": "550 5.1.1 No such user"})
    with smtp_server(handler) as controller:
        config = SmtpConfig(host=LOOPBACK, port=controller.port, sender=SENDER, timeout=5)
        result = deliver(
            compose_alert(one_alert(), message_id="a1@x.test"),
            [DOCTORS[0], "gone@clinic.test", DOCTORS[1]],
            config,
            tmp_path,
        )
        [received] = handler.wait_for(1)

    assert result.accepted == tuple(DOCTORS)
    assert list(result.rejected) == ["gone@clinic.test"]
    assert result.rejected["gone@clinic.test"].startswith("550")
    assert result.complete
    assert received.rcpt_tos == DOCTORS


def test_a_temporary_refusal_is_deferred_and_of_everyone_is_transient(tmp_path: Path) -> None:
    busy = "451 4.3.0 Mailbox busy, try later"
    handler = RecordingHandler(reject={DOCTORS[1]: busy})
    with smtp_server(handler) as controller:
        config = SmtpConfig(host=LOOPBACK, port=controller.port, sender=SENDER, timeout=5)
        partly = deliver(compose_alert(one_alert(), message_id="t1@x.test"), DOCTORS, config, tmp_path)
        handler.reject[DOCTORS[0]] = busy
        with pytest.raises(TransientMailError, match="deferred every recipient"):
            deliver(compose_alert(one_alert(), message_id="t2@x.test"), DOCTORS, config, tmp_path)

    assert partly.accepted == (DOCTORS[0],)
    assert list(partly.deferred) == [DOCTORS[1]] and not partly.complete


def test_a_server_that_is_down_is_transient_and_the_retry_delivers(tmp_path: Path) -> None:
    port = free_port()
    config = SmtpConfig(host=LOOPBACK, port=port, sender=SENDER, timeout=5)
    message = compose_alert(one_alert(), message_id=alert_message_id("17"))

    with pytest.raises(TransientMailError, match=f"{LOOPBACK}:{port}"):
        deliver(message, DOCTORS, config, tmp_path)

    handler = RecordingHandler()
    with smtp_server(handler, port=port):
        result = deliver(message, DOCTORS, config, tmp_path)
        [received] = handler.wait_for(1)
    assert result.accepted == tuple(DOCTORS)
    assert received.message["Message-ID"] == "<alert-17@melanoscreen.invalid>"


def require_tls_server(handler: RecordingHandler, certificate: Certificate) -> dict[str, Any]:
    return {
        "tls_context": certificate.server_context(),
        "require_starttls": True,
        "auth_require_tls": True,
        "auth_required": True,
        "authenticator": password_authenticator(handler, "screening", "s3cret"),
    }


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
def test_starttls_and_login_work_against_a_server_that_requires_them(
    mechanism: str, certificate: Certificate, tmp_path: Path
) -> None:
    handler = RecordingHandler()
    other = "PLAIN" if mechanism == "LOGIN" else "LOGIN"
    kwargs = require_tls_server(handler, certificate)
    with smtp_server(handler, auth_exclude_mechanism=[other], **kwargs) as controller:
        config = SmtpConfig(
            host=LOOPBACK,
            port=controller.port,
            security="starttls",
            user="screening",
            password="s3cret",
            sender=SENDER,
            timeout=5,
            cafile=certificate.cert_file,
        )
        result = deliver(compose_alert(one_alert(), message_id="s1@x.test"), DOCTORS, config, tmp_path)
        handler.wait_for(1)
    assert result.accepted == tuple(DOCTORS)
    assert handler.auth_mechanisms == [mechanism]


def test_a_wrong_password_fails_clearly_and_is_not_retried(certificate: Certificate, tmp_path: Path) -> None:
    handler = RecordingHandler()
    with smtp_server(handler, **require_tls_server(handler, certificate)) as controller:
        config = SmtpConfig(
            host=LOOPBACK,
            port=controller.port,
            security="starttls",
            user="screening",
            password="wrong",
            sender=SENDER,
            timeout=5,
            cafile=certificate.cert_file,
        )
        with pytest.raises(PermanentMailError, match=r"login as 'screening' .* refused: 535"):
            deliver(compose_alert(one_alert(), message_id="w1@x.test"), DOCTORS, config, tmp_path)
    assert handler.messages == []


def test_plain_smtp_to_a_server_requiring_starttls_is_refused_permanently(
    certificate: Certificate, tmp_path: Path
) -> None:
    handler = RecordingHandler()
    with smtp_server(handler, **require_tls_server(handler, certificate)) as controller:
        config = SmtpConfig(host=LOOPBACK, port=controller.port, sender=SENDER, timeout=5)
        with pytest.raises(PermanentMailError, match="530"):
            deliver(compose_alert(one_alert(), message_id="n1@x.test"), DOCTORS, config, tmp_path)


def test_an_untrusted_certificate_is_refused_permanently(certificate: Certificate, tmp_path: Path) -> None:
    handler = RecordingHandler()
    with smtp_server(handler, **require_tls_server(handler, certificate)) as controller:
        config = SmtpConfig(
            host=LOOPBACK,
            port=controller.port,
            security="starttls",
            user="screening",
            password="s3cret",
            sender=SENDER,
            timeout=5,  # no cafile: the system's CAs only
        )
        with pytest.raises(PermanentMailError, match="certificate"):
            deliver(compose_alert(one_alert(), message_id="c1@x.test"), DOCTORS, config, tmp_path)
    assert handler.messages == []


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_implicit_tls_delivers(certificate: Certificate, tmp_path: Path) -> None:
    handler = RecordingHandler()
    authenticator = password_authenticator(handler, "screening", "s3cret")
    with smtp_server(
        handler,
        ssl_context=certificate.server_context(),
        authenticator=authenticator,
        auth_required=True,
        # aiosmtpd only counts STARTTLS as TLS; here the whole connection is TLS already.
        auth_require_tls=False,
    ) as controller:
        config = SmtpConfig(
            host=LOOPBACK,
            port=controller.port,
            security="tls",
            user="screening",
            password="s3cret",
            sender=SENDER,
            timeout=5,
            cafile=certificate.cert_file,
        )
        result = deliver(compose_alert(one_alert(), message_id="i1@x.test"), DOCTORS, config, tmp_path)
        [received] = handler.wait_for(1)
    assert result.accepted == tuple(DOCTORS)
    assert len(handler.auth_mechanisms) == 1
    assert received.message["Message-ID"] == "<i1@x.test>"


def test_without_a_host_each_message_becomes_one_parseable_eml_file(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    config = SmtpConfig(host=None, sender=SENDER)
    message_id = alert_message_id("batch 3/7")

    first = deliver(compose_alert(one_alert(), message_id=message_id), DOCTORS, config, outbox)
    again = deliver(compose_alert(one_alert(), message_id=message_id), DOCTORS, config, outbox)

    assert first.accepted == tuple(DOCTORS) and first.outbox_path == again.outbox_path
    assert [p.name for p in outbox.iterdir()] == [outbox_file_name(message_id)]
    assert first.outbox_path is not None
    parsed = BytesParser(policy=policy.default).parsebytes(first.outbox_path.read_bytes())
    assert isinstance(parsed, EmailMessage)
    assert parsed["Message-ID"] == message_id
    assert parsed["To"] == ", ".join(DOCTORS) and parsed["From"] == SENDER
    assert parsed["Subject"].startswith("Melanoma suspected (p=0.87)")
    assert len(decoded_images(image_parts(parsed))) == 2


def test_an_unreadable_image_still_alerts_and_says_so(
    plain_server: SmtpConfig, handler: RecordingHandler, tmp_path: Path
) -> None:
    broken = flagged("clinic-c/odd\nname.jpg", 0.6, 5, gradcam=False)
    broken = FlaggedImage(**{**broken.__dict__, "image": b"not an image"})
    alert = AlertContent(images=[broken], model_version="v7", threshold=0.5)
    deliver(compose_alert(alert, message_id="u1@x.test"), DOCTORS, plain_server, tmp_path)

    got = handler.wait_for(1)[0].message
    assert got["Subject"] == "Melanoma suspected (p=0.60): clinic-c/odd name.jpg"
    assert image_parts(got) == []
    html = got.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    assert "could not be previewed" in html


def test_a_source_name_is_escaped_in_the_html(tmp_path: Path) -> None:
    alert = AlertContent(
        images=[flagged("clinic/<script>alert(1)</script>.jpg", 0.9, 6)],
        model_version="v",
        threshold=0.5,
    )
    html = (
        compose_alert(alert, message_id="e1@x.test")
        .get_body(  # type: ignore[union-attr]
            preferencelist=("html",)
        )
        .get_content()
    )
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_a_message_id_must_be_well_formed() -> None:
    with pytest.raises(ValueError, match="Message-ID"):
        compose_alert(one_alert(), message_id="no at sign")


def test_backoff_grows_exponentially_is_capped_and_fully_jittered() -> None:
    rng = random.Random(7)
    samples = {attempt: [backoff_delay(attempt, 10, 300, rng) for _ in range(400)] for attempt in range(8)}
    for attempt, values in samples.items():
        ceiling = min(300, 10 * 2**attempt)
        assert all(0 <= v <= ceiling for v in values)
        assert max(values) > 0.9 * ceiling and min(values) < 0.1 * ceiling  # full jitter
    assert backoff_delay(10_000, 10, 300, rng) <= 300
    with pytest.raises(ValueError):
        backoff_delay(-1)

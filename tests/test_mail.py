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
from pydantic import SecretStr

from melanoscreen.settings import SmtpSettings
from model.data import ISIC_CLASSES as CLASSES
from service.alert_message import AlertContent, FlaggedImage, compose_alert
from service.mail import (
    PermanentMailError,
    TransientMailError,
    backoff_delay,
    deliver,
    outbox_file_name,
)
from service.messages import DISCLAIMER, ComposedMessage, recipient_message_id

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


def alert_to(recipient: str, message_id: str = "alert-42@melanoscreen.test",
             alert: AlertContent | None = None) -> ComposedMessage:
    return compose_alert(alert or one_alert(), message_id=message_id, sender=SENDER,
                         recipient=recipient)


def parsed(message: ComposedMessage) -> EmailMessage:
    result = BytesParser(policy=policy.default).parsebytes(message.raw)
    assert isinstance(result, EmailMessage)
    return result


def html_of(message: ComposedMessage) -> str:
    return parsed(message).get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def plain_server(handler: RecordingHandler) -> Iterator[SmtpSettings]:
    with smtp_server(handler) as controller:
        yield SmtpSettings(host=LOOPBACK, port=controller.port, security="none", sender=SENDER,
                           timeout=5)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return make_certificate(tmp_path_factory.mktemp("tls"))


def test_an_alert_has_text_and_html_with_inline_lesion_and_gradcam_images(
    plain_server: SmtpSettings, handler: RecordingHandler, tmp_path: Path
) -> None:
    message = alert_to(DOCTORS[0])
    assert deliver(message, plain_server, tmp_path) is None  # sent, no file written

    [received] = handler.wait_for(1)
    got = received.message
    assert received.rcpt_tos == DOCTORS[:1] and received.mail_from == SENDER
    assert got["Subject"] == "Melanoma suspected (p=0.87): clinic-a/patient-17/lesion2.jpg"
    assert got["Subject"] == message.subject
    assert got["Message-ID"] == "<alert-42@melanoscreen.test>"
    assert got["From"] == SENDER and got["To"] == DOCTORS[0] and got["Date"] is not None
    assert got.get_content_type() == "multipart/alternative"
    # What the server received is the stored bytes, as they are.
    assert received.raw.rstrip(b"\r\n") == message.raw.rstrip(b"\r\n")

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
    plain_server: SmtpSettings, handler: RecordingHandler, tmp_path: Path
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
    deliver(alert_to(DOCTORS[0], recipient_message_id("alert-batch-9", DOCTORS[0]), alert),
            plain_server, tmp_path)

    [received] = handler.wait_for(1)
    got = received.message
    assert got["Subject"] == (
        "Melanoma suspected in 3 images (highest p=0.91): clinic-b/p2/first.png and 2 more"
    )
    plain = got.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    # Highest probability first.
    assert plain.index("first.png") < plain.index("p3/c.jpg") < plain.index("p1/a.jpg")
    assert len(decoded_images(image_parts(got))) == 5  # three lesions, two Grad-CAM overlays


def test_each_recipient_gets_a_copy_of_their_own_with_a_stable_message_id() -> None:
    ids = {doctor: recipient_message_id("alert-0123456789abcdef", doctor) for doctor in DOCTORS}
    assert len(set(ids.values())) == 2
    assert ids[DOCTORS[0]] == recipient_message_id("alert-0123456789abcdef", DOCTORS[0].upper())
    for doctor, message_id in ids.items():
        message = parsed(alert_to(doctor, message_id))
        assert message["To"] == doctor and message["Message-ID"] == message_id
        # Short enough that the header is never folded.
        assert len(f"Message-ID: {message_id}") <= 78


def test_a_permanent_refusal_fails_only_that_address(tmp_path: Path) -> None:
    handler = RecordingHandler(reject={"gone@clinic.test": "550 5.1.1 No such user"})
    with smtp_server(handler) as controller:
        config = SmtpSettings(host=LOOPBACK, port=controller.port, security="none",
                              sender=SENDER, timeout=5)
        deliver(alert_to(DOCTORS[0], "a1@x.test"), config, tmp_path)
        with pytest.raises(PermanentMailError, match=r"gone@clinic.test refused .*: 550"):
            deliver(alert_to("gone@clinic.test", "a2@x.test"), config, tmp_path)
        deliver(alert_to(DOCTORS[1], "a3@x.test"), config, tmp_path)
        received = handler.wait_for(2)

    assert [r.rcpt_tos for r in received] == [[DOCTORS[0]], [DOCTORS[1]]]


def test_a_temporary_refusal_is_transient(tmp_path: Path) -> None:
    handler = RecordingHandler(reject={DOCTORS[1]: "451 4.3.0 Mailbox busy, try later"})
    with smtp_server(handler) as controller:
        config = SmtpSettings(host=LOOPBACK, port=controller.port, security="none",
                              sender=SENDER, timeout=5)
        deliver(alert_to(DOCTORS[0], "t1@x.test"), config, tmp_path)
        with pytest.raises(TransientMailError, match="451"):
            deliver(alert_to(DOCTORS[1], "t2@x.test"), config, tmp_path)
        handler.reject.clear()
        deliver(alert_to(DOCTORS[1], "t2@x.test"), config, tmp_path)
        received = handler.wait_for(2)
    assert [r.rcpt_tos for r in received] == [[DOCTORS[0]], [DOCTORS[1]]]


def test_a_server_that_is_down_is_transient_and_the_retry_delivers(tmp_path: Path) -> None:
    port = free_port()
    config = SmtpSettings(host=LOOPBACK, port=port, security="none", sender=SENDER, timeout=5)
    message = alert_to(DOCTORS[0], recipient_message_id("alert-17", DOCTORS[0]))

    with pytest.raises(TransientMailError, match=f"{LOOPBACK}:{port}"):
        deliver(message, config, tmp_path)

    handler = RecordingHandler()
    with smtp_server(handler, port=port):
        deliver(message, config, tmp_path)
        [received] = handler.wait_for(1)
    assert received.rcpt_tos == DOCTORS[:1]
    assert received.message["Message-ID"] == message.message_id


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
        config = SmtpSettings(
            host=LOOPBACK,
            port=controller.port,
            security="starttls",
            user="screening",
            password=SecretStr("s3cret"),
            sender=SENDER,
            timeout=5,
            cafile=certificate.cert_file,
        )
        deliver(alert_to(DOCTORS[0], "s1@x.test"), config, tmp_path)
        [received] = handler.wait_for(1)
    assert received.rcpt_tos == DOCTORS[:1]
    assert handler.auth_mechanisms == [mechanism]


def test_a_wrong_password_fails_clearly_and_is_not_retried(certificate: Certificate, tmp_path: Path) -> None:
    handler = RecordingHandler()
    with smtp_server(handler, **require_tls_server(handler, certificate)) as controller:
        config = SmtpSettings(
            host=LOOPBACK,
            port=controller.port,
            security="starttls",
            user="screening",
            password=SecretStr("wrong"),
            sender=SENDER,
            timeout=5,
            cafile=certificate.cert_file,
        )
        with pytest.raises(PermanentMailError, match=r"login as 'screening' .* refused: 535"):
            deliver(alert_to(DOCTORS[0], "w1@x.test"), config, tmp_path)
    assert handler.messages == []


def test_plain_smtp_to_a_server_requiring_starttls_is_refused_permanently(
    certificate: Certificate, tmp_path: Path
) -> None:
    handler = RecordingHandler()
    with smtp_server(handler, **require_tls_server(handler, certificate)) as controller:
        config = SmtpSettings(host=LOOPBACK, port=controller.port, security="none", sender=SENDER,
                              timeout=5)
        with pytest.raises(PermanentMailError, match="530"):
            deliver(alert_to(DOCTORS[0], "n1@x.test"), config, tmp_path)


def test_an_untrusted_certificate_is_refused_permanently(certificate: Certificate, tmp_path: Path) -> None:
    handler = RecordingHandler()
    with smtp_server(handler, **require_tls_server(handler, certificate)) as controller:
        config = SmtpSettings(
            host=LOOPBACK,
            port=controller.port,
            security="starttls",
            user="screening",
            password=SecretStr("s3cret"),
            sender=SENDER,
            timeout=5,  # no cafile: the system's CAs only
        )
        with pytest.raises(PermanentMailError, match="certificate"):
            deliver(alert_to(DOCTORS[0], "c1@x.test"), config, tmp_path)
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
        config = SmtpSettings(
            host=LOOPBACK,
            port=controller.port,
            security="tls",
            user="screening",
            password=SecretStr("s3cret"),
            sender=SENDER,
            timeout=5,
            cafile=certificate.cert_file,
        )
        deliver(alert_to(DOCTORS[0], "i1@x.test"), config, tmp_path)
        [received] = handler.wait_for(1)
    assert received.rcpt_tos == DOCTORS[:1]
    assert len(handler.auth_mechanisms) == 1
    assert received.message["Message-ID"] == "<i1@x.test>"


def test_without_a_host_each_message_becomes_one_parseable_eml_file(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    config = SmtpSettings(host=None, sender=SENDER)
    message_id = recipient_message_id("alert-batch 3/7", DOCTORS[0])

    first = deliver(alert_to(DOCTORS[0], message_id), config, outbox)
    again = deliver(alert_to(DOCTORS[0], message_id), config, outbox)

    assert first is not None and first == again
    assert [p.name for p in outbox.iterdir()] == [outbox_file_name(message_id)]
    message = BytesParser(policy=policy.default).parsebytes(first.read_bytes())
    assert isinstance(message, EmailMessage)
    assert message["Message-ID"] == message_id
    assert message["To"] == DOCTORS[0] and message["From"] == SENDER
    assert message["Subject"].startswith("Melanoma suspected (p=0.87)")
    assert len(decoded_images(image_parts(message))) == 2


def test_an_unreadable_image_still_alerts_and_says_so(
    plain_server: SmtpSettings, handler: RecordingHandler, tmp_path: Path
) -> None:
    broken = flagged("clinic-c/odd\nname.jpg", 0.6, 5, gradcam=False)
    broken = FlaggedImage(**{**broken.__dict__, "image": b"not an image"})
    alert = AlertContent(images=[broken], model_version="v7", threshold=0.5)
    deliver(alert_to(DOCTORS[0], "u1@x.test", alert), plain_server, tmp_path)

    got = handler.wait_for(1)[0].message
    assert got["Subject"] == "Melanoma suspected (p=0.60): clinic-c/odd name.jpg"
    assert image_parts(got) == []
    html = got.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    assert "could not be previewed" in html


def test_a_source_name_is_escaped_in_the_html() -> None:
    alert = AlertContent(
        images=[flagged("clinic/<script>alert(1)</script>.jpg", 0.9, 6)],
        model_version="v",
        threshold=0.5,
    )
    html = html_of(alert_to(DOCTORS[0], "e1@x.test", alert))
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_a_message_id_must_be_well_formed() -> None:
    with pytest.raises(ValueError, match="Message-ID"):
        alert_to(DOCTORS[0], "no at sign")


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


def test_a_probability_just_above_the_threshold_never_reads_like_it(
    plain_server: SmtpSettings, handler: RecordingHandler, tmp_path: Path
) -> None:
    meaning = ("at this threshold the model caught 95% of melanomas in validation "
               "(images it had not been trained on)")
    alert = AlertContent(images=[flagged("clinic-d/close.jpg", 0.0503, 7)], model_version="v2",
                         threshold=0.05, threshold_meaning=meaning)
    deliver(alert_to(DOCTORS[0], "close-1@x.test", alert), plain_server, tmp_path)

    got = handler.wait_for(1)[0].message
    assert got["Subject"] == "Melanoma suspected (p=0.0503): clinic-d/close.jpg"
    plain = got.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    plain = plain.replace("\r\n", "\n")
    html = got.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    assert "Melanoma probability: 0.0503" in plain and "Alert threshold: 0.05\n" in plain
    assert re.search(r"melanoma\s+0\.0503", plain)  # the class table too
    assert "0.050\n" not in plain and "p=0.05)" not in str(got["Subject"])
    assert ">0.0503</strong>" in html and "alert threshold 0.05: at this threshold" in html
    assert "At this threshold the model caught 95% of melanomas in validation" in plain


def test_a_threshold_below_two_decimals_is_written_in_full() -> None:
    alert = AlertContent(images=[flagged("x.jpg", 0.0612, 8)], model_version="v2",
                         threshold=0.0538)
    message = parsed(alert_to(DOCTORS[0], "t-1@x.test", alert))
    plain = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "Alert threshold: 0.0538" in plain and "threshold (0.0538)" in plain
    assert message["Subject"] == "Melanoma suspected (p=0.06): x.jpg"


def test_the_threshold_sentence_claims_the_card_figure_only_for_the_card_threshold() -> None:
    from model.card import ModelCard
    from service.thresholds import describe_threshold

    card = ModelCard(version="v2", architecture="ensemble", classes=list(CLASSES),
                     input_size=[180, 180], alert_threshold=0.0538, target_sensitivity=0.95,
                     validation={"melanoma_same_source": {"sensitivity": 0.953}})
    assert describe_threshold(card, 0.0538, "v2") == (
        "at this threshold the model caught 95% of melanomas in validation "
        "(images it had not been trained on)")
    clinic = describe_threshold(card, 0.2, "v2")
    assert clinic is not None and "set by the clinic" in clinic and "caught" not in clinic
    assert "MELANOSCREEN_ALERT_THRESHOLD" in clinic and "0.0538" in clinic
    assert describe_threshold(card, 0.0538, "v1") is None  # another model's prediction

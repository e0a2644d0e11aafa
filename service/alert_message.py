"""What the alert email says: the flagged images of one batch, composed into the bytes that are
sent. Pure: plain data in, `ComposedMessage` out (the shared assembly is `service.messages`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from model.scores import probability_text
from service.colours import MELANOMA_COLOUR, class_colour
from service.flags import MELANOMA_SUSPECTED, UNUSUAL_CAVEAT, UNUSUAL_PICTURE
from service.messages import (
    ComposedMessage,
    InlineImage,
    assemble,
    clean_header_text,
    inline_image,
    local_time,
    normalise_message_id,
    render,
)

ALERT_IMAGE_PX = 512  # the alert carries the lesion large enough to judge


def new_alert_key() -> str:
    """A fresh key for one alert; each recipient's copy gets a Message-ID derived from it."""
    return f"alert-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class FlaggedImage:
    """One screened image whose melanoma probability reached the threshold."""

    source: str  # the name it arrived under, relative to the inbox
    melanoma_probability: float
    probabilities: Mapping[str, float]  # class name -> probability, in the model's class order
    predicted_class: str
    received_at: datetime  # aware; a naive value is taken as UTC
    image: bytes | None  # the lesion (any format Pillow reads; `service.pictures.shrunk_jpeg`
    # gives it at ALERT_IMAGE_PX from the decoded image, never the stored file's bytes)
    gradcam_png: bytes | None = None  # Grad-CAM overlay, PNG
    url: str | None = None  # its case page in the review app, when MELANOSCREEN_PUBLIC_URL is set


@dataclass(frozen=True)
class AlertContent:
    """Everything one alert email says: the flagged images of one batch and the model used."""

    images: Sequence[FlaggedImage]
    model_version: str
    threshold: float
    timezone: str = "UTC"  # the zone in which arrival times are shown
    #: What the threshold means ("at this threshold the model caught 95% of melanomas in
    #: validation ..."), or that the clinic set it; None: nothing is said.
    threshold_meaning: str | None = None
    #: 're-screen' (a new model version flags what the old did not) or 'reminder' (still
    #: unreviewed): shown in the subject and at the top; None: a first alert.
    label: str | None = None
    #: The images are unusual pictures (out of scope): the alert says their scores may be
    #: unreliable and that they need a look, never "melanoma suspected".
    unusual: bool = False
    #: Where the review app is and how to reach it, when the images carry no links (no
    #: MELANOSCREEN_PUBLIC_URL): shown under the opening line; None: nothing is said.
    review_hint: str | None = None
    #: How this model's earlier alerts turned out ("Of the 57 alerts ... 41 (72%, ...) were
    #: benign.") or that too few were reviewed to say; None: nothing is said.
    benign_record: str | None = None

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("an alert needs at least one flagged image")


def alert_subject(flagged: Sequence[tuple[str, float]], threshold: float | None = None,
                  label: str | None = None, *, unusual: bool = False) -> str:
    """The subject line from (source, melanoma probability) pairs: the highest and how many;
    p is written with enough digits that it never reads like the threshold; a label
    ('re-screen', 'reminder') goes first in brackets. An alert about `unusual` pictures (out of
    scope) never says "melanoma suspected": it says they need a look."""
    if not flagged:
        raise ValueError("an alert needs at least one flagged image")
    source, p = max(flagged, key=lambda pair: pair[1])
    name = clean_header_text(source)
    written = probability_text(p, threshold)
    mark = f"[{label}] " if label else ""
    what = UNUSUAL_PICTURE if unusual else MELANOMA_SUSPECTED
    if len(flagged) == 1:
        return f"{mark}{what} (p={written}): {name}"
    return (f"{mark}{what} in {len(flagged)} images (highest p={written}): {name} and "
            f"{len(flagged) - 1} more")


def compose_alert(alert: AlertContent, *, message_id: str, sender: str,
                  recipient: str) -> ComposedMessage:
    """The alert email: text and HTML, each image's lesion and Grad-CAM overlay inline."""
    message_id = normalise_message_id(message_id)
    ranked = sorted(alert.images, key=lambda item: item.melanoma_probability, reverse=True)
    images: list[InlineImage] = []
    rows = []
    for number, item in enumerate(ranked, start=1):
        lesion = inline_image(item.image, ALERT_IMAGE_PX, message_id, f"lesion{number}")
        cam = inline_image(item.gradcam_png, ALERT_IMAGE_PX, message_id, f"gradcam{number}")
        images += [picture for picture in (lesion, cam) if picture is not None]
        width = max((len(name) for name in item.probabilities), default=0)
        rows.append({
            "item": item, "lesion": lesion, "gradcam": cam,
            "received": local_time(item.received_at, alert.timezone),
            "classes": [{"name": name, "padded": name.ljust(width), "value": value,
                         "text": probability_text(
                             value, alert.threshold if name == "melanoma" else None, digits=3),
                         "strong": name in (item.predicted_class, "melanoma"),
                         "bar": max(1, round(value * 120)),
                         "colour": class_colour(name)}
                        for name, value in item.probabilities.items()],
        })
    context = {"alert": alert, "rows": rows, "caveat": UNUSUAL_CAVEAT,
               "melanoma_colour": MELANOMA_COLOUR,
               "heading": UNUSUAL_PICTURE if alert.unusual else MELANOMA_SUSPECTED}
    return assemble(
        subject=alert_subject([(i.source, i.melanoma_probability) for i in ranked], alert.threshold,
                              alert.label, unusual=alert.unusual),
        message_id=message_id, sender=sender, recipient=recipient,
        text=render("alert.txt", **context), html=render("alert.html", **context),
        images=images, headers={"Importance": "high"})

"""The colours that mean one thing wherever they appear: the alert and digest emails and the
review app's pages draw a class's probability bar in these. A leaf: imports nothing."""

from __future__ import annotations

#: Melanoma's bar and figures: the same red in an email and on the case page.
MELANOMA_COLOUR = "#b91c1c"
#: Every other class's bar.
OTHER_CLASS_COLOUR = "#6b7280"


def class_colour(name: str) -> str:
    """The bar colour of the class `name`."""
    return MELANOMA_COLOUR if name == "melanoma" else OTHER_CLASS_COLOUR

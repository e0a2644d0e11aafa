"""When an image is flagged, and what its alert calls it: the one rule that screening, the
`predict` command, alerts, the digest and the review app all use. TensorFlow-free.

Never silence a melanoma: an image is flagged exactly when its melanoma probability reaches the
threshold. A picture unlike the images the model learnt from (out of scope) is flagged all the
same; its alert says that the score may be unreliable and that a look is needed, instead of
"melanoma suspected".
"""

from __future__ import annotations

from dataclasses import dataclass

#: What an alert, the digest and the case page call a flagged image, by kind.
MELANOMA_SUSPECTED = "Melanoma suspected"
UNUSUAL_PICTURE = "Unusual picture: needs a look"
#: The caveat an out-of-scope flagged image carries wherever it is shown.
UNUSUAL_CAVEAT = ("This picture is unlike the images the model learnt from, so its melanoma "
                  "score may be unreliable: please look at it.")


@dataclass(frozen=True)
class Flag:
    """The screening rule's answer for one image."""

    flagged: bool  # alerted: the melanoma probability reached the threshold
    unusual: bool  # flagged, and the picture is out of scope: its score may be unreliable

    @property
    def label(self) -> str | None:
        """What the alert calls it; None when it is not flagged."""
        if not self.flagged:
            return None
        return UNUSUAL_PICTURE if self.unusual else MELANOMA_SUSPECTED


def flag_of(melanoma_probability: float, threshold: float, *, out_of_scope: bool) -> Flag:
    """Flagged exactly when `melanoma_probability` >= `threshold`, whatever `out_of_scope` says
    (the scope only changes the alert's words, never whether it goes out)."""
    flagged = melanoma_probability >= threshold
    return Flag(flagged=flagged, unusual=flagged and out_of_scope)

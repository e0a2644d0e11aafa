"""How a melanoma probability and the alert threshold are written for people: pure functions.

Emails, the digest, `results` and `predict` all print through these, so that a flagged image
never reads "p=0.05" beside "threshold 0.05" and every threshold says what it means.
"""

from __future__ import annotations

from typing import Any


def probability_text(probability: float, threshold: float | None = None, *, digits: int = 2) -> str:
    """`probability` with at least `digits` decimals, and as many more (up to 6) as it takes to
    read differently from `threshold` when the two differ."""
    if threshold is not None and probability != threshold:
        while digits < 6 and f"{probability:.{digits}f}" == f"{threshold:.{digits}f}":
            digits += 1
    return f"{probability:.{digits}f}"


def threshold_text(threshold: float, *, digits: int = 2) -> str:
    """The threshold with enough decimals that its own value is not rounded away (up to 6)."""
    text = f"{threshold:.{digits}f}"
    while digits < 6 and float(text) != round(threshold, 6):
        digits += 1
        text = f"{threshold:.{digits}f}"
    return text


def threshold_meaning(card_validation: dict[str, Any], target_sensitivity: float) -> str:
    """One sentence: what share of melanomas this threshold caught when it was set."""
    same = card_validation.get("melanoma_same_source") or {}
    caught = same.get("sensitivity")
    if caught is None:
        caught = (card_validation.get("melanoma") or {}).get("sensitivity")
    if caught is None:
        caught = target_sensitivity
    return (f"at this threshold the model caught {caught:.0%} of melanomas in validation "
            "(images it had not been trained on)")

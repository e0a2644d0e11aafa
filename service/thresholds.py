"""What the alert threshold means, in one sentence for the alert and the digest.

The card of the configured model says what share of melanomas its threshold caught in
validation; that sentence is true only of that model at that threshold. A threshold set by the
clinic (`MELANOSCREEN_ALERT_THRESHOLD`, stored with every prediction) gets a sentence that says
so instead, and a prediction made by another model version gets none.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from model.card import ModelCard, card_path_for, shipped_model_path
from model.scores import threshold_meaning, threshold_text

logger = logging.getLogger(__name__)


def describe_threshold(card: ModelCard, threshold: float, model_version: str) -> str | None:
    """The meaning of `threshold` for predictions of `model_version`, from `card`; None when the
    card is another model's (nothing can be claimed about a threshold it did not set)."""
    if model_version != card.version:
        return None
    if not math.isclose(threshold, float(card.alert_threshold), rel_tol=1e-9, abs_tol=1e-12):
        return (f"this threshold was set by the clinic (MELANOSCREEN_ALERT_THRESHOLD), not by the "
                f"model card, whose validation figures are for its own threshold "
                f"{threshold_text(float(card.alert_threshold))}")
    return threshold_meaning(card.validation, card.target_sensitivity)


def read_card(model_path: Path | None) -> ModelCard | None:
    """The card beside the configured model (the shipped one when None); None if unreadable.

    Only the JSON is read: no TensorFlow, so the digest job and commands can call it.
    """
    path = card_path_for(Path(model_path) if model_path else shipped_model_path())
    try:
        return ModelCard.read(path)
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("cannot read the model card %s: %s", path, exc)
        return None


def threshold_sentence(model_path: Path | None, threshold: float | None,
                       model_version: str | None) -> str | None:
    """`describe_threshold` with the configured model's card; None when nothing can be said."""
    if threshold is None or model_version is None:
        return None
    card = read_card(model_path)
    return describe_threshold(card, threshold, model_version) if card is not None else None

"""The shipped model and its card load with no network and agree on class order and input size."""

from __future__ import annotations

import numpy as np

from model.card import ModelCard, card_path_for, shipped_model_path
from model.data import ISIC_CLASSES
from model.inference import Classifier


def test_the_shipped_model_and_card_load_offline_and_agree() -> None:
    path = shipped_model_path()
    card = ModelCard.read(card_path_for(path))
    assert card.classes == list(ISIC_CLASSES)
    assert path.stat().st_size + card_path_for(path).stat().st_size < 10 * 1024 * 1024

    classifier = Classifier()  # the default path is the shipped model
    assert classifier.model.input_shape[1:3] == tuple(card.input_size)
    assert classifier.model.output_shape[-1] == len(card.classes)
    assert 0.0 < classifier.threshold < 1.0
    height, width = card.input_size
    probabilities = classifier.predict_arrays(np.full((2, height, width, 3), 128, np.float32))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_the_shipped_card_meets_the_validation_goals() -> None:
    card = ModelCard.read(card_path_for(shipped_model_path()))
    mel = card.validation["melanoma"]
    assert mel["sensitivity"] >= 0.90
    assert card.validation["n"] == card.training_set["validation"]

"""Evaluation figures on a hand-made prediction set equal values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from model.metrics import (
    crossfit_threshold,
    evaluate_predictions,
    roc_auc,
    threshold_for_sensitivity,
)

CLASSES = ["melanoma", "nevus", "vascular lesion"]


def test_hand_made_predictions_give_hand_computed_figures() -> None:
    # true:      mel mel mel nev nev vasc
    # predicted: mel mel nev nev mel vasc
    probabilities = np.array([
        [0.9, 0.1, 0.0],
        [0.6, 0.3, 0.1],
        [0.3, 0.6, 0.1],
        [0.2, 0.7, 0.1],
        [0.5, 0.4, 0.1],
        [0.1, 0.1, 0.8],
    ])
    y_true = np.array([0, 0, 0, 1, 1, 2])

    figures = evaluate_predictions(probabilities, y_true, CLASSES, threshold=0.5)

    assert figures["n"] == 6
    assert figures["accuracy"] == pytest.approx(4 / 6)
    # recalls: melanoma 2/3, nevus 1/2, vascular 1/1
    assert figures["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert figures["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    mel = figures["per_class"]["melanoma"]
    assert mel["precision"] == pytest.approx(2 / 3)
    assert mel["recall"] == pytest.approx(2 / 3)
    assert mel["f1"] == pytest.approx(2 / 3)
    assert mel["support"] == 3
    # melanoma scores: positives 0.9 0.6 0.3; negatives 0.2 0.5 0.1.
    # pairs where positive > negative: 0.9>all 3, 0.6>all 3, 0.3>0.2,0.1 -> 8 of 9
    assert figures["melanoma"]["auc"] == pytest.approx(8 / 9)
    # at 0.5: flagged 0.9, 0.6 (positives) and 0.5 (a nevus)
    assert figures["melanoma"]["sensitivity"] == pytest.approx(2 / 3)
    assert figures["melanoma"]["specificity"] == pytest.approx(2 / 3)
    # calibration: top confidence vs correctness, computed by hand over 10 bins
    conf = probabilities.max(axis=1)
    correct = np.array([1, 1, 0, 1, 0, 1])
    bins = {}
    for c, ok in zip(conf, correct, strict=True):
        bins.setdefault(int(np.ceil(c * 10) - 1), []).append((c, ok))
    ece = sum(len(v) / 6 * abs(np.mean([o for _, o in v]) - np.mean([c for c, _ in v]))
              for v in bins.values())
    assert figures["expected_calibration_error"] == pytest.approx(ece)


def test_a_class_absent_from_the_set_still_evaluates() -> None:
    probabilities = np.array([[0.8, 0.2, 0.0], [0.1, 0.9, 0.0]])
    figures = evaluate_predictions(probabilities, np.array([0, 1]), CLASSES, threshold=0.5)
    assert figures["per_class"]["vascular lesion"]["support"] == 0
    assert figures["per_class"]["vascular lesion"]["recall"] is None
    assert figures["balanced_accuracy"] == pytest.approx(1.0)


def test_auc_counts_ties_as_half_and_is_none_without_both_sides() -> None:
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([1, 1]), np.array([0.2, 0.3])) is None


def test_threshold_is_the_highest_that_reaches_the_target_sensitivity() -> None:
    positive = np.array([1, 1, 1, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.4, 0.2, 0.5, 0.1])
    assert threshold_for_sensitivity(positive, scores, 0.75) == pytest.approx(0.4)
    assert threshold_for_sensitivity(positive, scores, 0.95) == pytest.approx(0.2)
    assert threshold_for_sensitivity(positive, scores, 0.5) == pytest.approx(0.8)


def test_crossfit_threshold_measures_on_the_half_it_was_not_set_on() -> None:
    # Separable classes: every negative stays below a threshold set on either half, but the
    # lowest positive of one half is missed by the threshold the other half sets, sometimes.
    positive = np.array([1] * 10 + [0] * 10)
    scores = np.r_[np.linspace(0.6, 0.9, 10), np.linspace(0.0, 0.4, 10)]
    figures = crossfit_threshold(positive, scores, 0.95)
    assert figures["specificity"] == 1.0
    assert 0.7 <= figures["sensitivity"] <= 1.0  # type: ignore[operator]
    # In-sample, the same target is always met: crossfit is the stricter figure.
    assert threshold_for_sensitivity(positive, scores, 0.95) == pytest.approx(0.6)
    # Scores that carry no information cannot reach the target on unseen halves reliably.
    noise = np.random.default_rng(1).uniform(size=200)
    positive = np.random.default_rng(2).uniform(size=200) < 0.3
    figures = crossfit_threshold(positive, noise, 0.95)
    assert figures["specificity"] is not None and figures["specificity"] < 0.3


def test_crossfit_threshold_with_one_positive_gives_no_figure_instead_of_failing() -> None:
    figures = crossfit_threshold(np.array([1, 0, 0, 0]), np.array([0.9, 0.1, 0.2, 0.3]), 0.95)
    assert figures == {"sensitivity": None, "specificity": None}

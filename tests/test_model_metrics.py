"""Evaluation figures on a hand-made prediction set equal values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from model.metrics import (
    bootstrap_interval,
    crossfit_threshold,
    evaluate_predictions,
    melanoma_same_source,
    paired_difference,
    probe_auc,
    roc_auc,
    specificity_at_sensitivity,
    threshold_for_sensitivity,
    within_group_auc,
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
    bins: dict[int, list[tuple[float, int]]] = {}
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
    assert threshold_for_sensitivity(positive, scores, 0.75) == pytest.approx(0.4, rel=1e-4)
    assert threshold_for_sensitivity(positive, scores, 0.95) == pytest.approx(0.2, rel=1e-4)
    assert threshold_for_sensitivity(positive, scores, 0.5) == pytest.approx(0.8, rel=1e-4)


def test_the_positive_that_sets_the_threshold_reaches_it_when_scored_again_in_float32() -> None:
    """The held-out scores that set the threshold are float64; the service scores the same image
    in float32, which can round the deciding melanoma's score down past a threshold equal to it
    (seen: 0.0499016132 set the threshold, the service scored the image 0.0499016047)."""
    scores = np.array([0.9, 0.04990161319169971, 0.01, 0.3])
    positive = np.array([1, 1, 0, 0])
    threshold = threshold_for_sensitivity(positive, scores, 0.95)
    assert float(np.float32(scores[1])) < scores[1]  # float32 rounds this one down
    assert float(np.float32(scores[1])) >= threshold
    assert threshold > scores[2] and threshold == pytest.approx(scores[1], rel=1e-4)


def test_crossfit_threshold_measures_on_the_half_it_was_not_set_on() -> None:
    # Separable classes: every negative stays below a threshold set on either half, but the
    # lowest positive of one half is missed by the threshold the other half sets, sometimes.
    positive = np.array([1] * 10 + [0] * 10)
    scores = np.r_[np.linspace(0.6, 0.9, 10), np.linspace(0.0, 0.4, 10)]
    figures = crossfit_threshold(positive, scores, 0.95)
    assert figures["specificity"] == 1.0
    assert 0.7 <= figures["sensitivity"] <= 1.0  # type: ignore[operator]
    # In-sample, the same target is always met: crossfit is the stricter figure.
    assert threshold_for_sensitivity(positive, scores, 0.95) == pytest.approx(0.6, rel=1e-4)
    # Scores that carry no information cannot reach the target on unseen halves reliably.
    noise = np.random.default_rng(1).uniform(size=200)
    positive = np.random.default_rng(2).uniform(size=200) < 0.3
    figures = crossfit_threshold(positive, noise, 0.95)
    assert figures["specificity"] is not None and figures["specificity"] < 0.3


def test_crossfit_threshold_with_one_positive_gives_no_figure_instead_of_failing() -> None:
    figures = crossfit_threshold(np.array([1, 0, 0, 0]), np.array([0.9, 0.1, 0.2, 0.3]), 0.95)
    assert figures == {"sensitivity": None, "specificity": None}


def test_same_source_melanoma_figures_leave_other_sources_out_and_equal_hand_values() -> None:
    classes = ["melanoma", "nevus", "vascular lesion"]
    # archive: mel 0.9, 0.4, 0.3; nevus 0.5, 0.2.  ham: vascular 0.01, 0.02 (easy negatives that
    # would flatter a melanoma-vs-rest AUC) and a nevus at 0.95 (would hurt it).
    mel = np.array([0.9, 0.4, 0.3, 0.5, 0.2, 0.01, 0.02, 0.95])
    probabilities = np.stack([mel, (1 - mel) / 2, (1 - mel) / 2], axis=1)
    y = np.array([0, 0, 0, 1, 1, 2, 2, 1])
    sources = ["isic-archive"] * 5 + ["ham10000"] * 3

    same = melanoma_same_source(probabilities, y, sources, classes, threshold=0.35, bootstrap=200)

    assert same["sources"] == ["isic-archive"] and same["n"] == 5 and same["melanomas"] == 3
    # pairs (mel, benign): 0.9>0.5,0.2; 0.4>0.2 (not 0.5); 0.3>0.2 -> 4 of 6
    assert same["auc"] == pytest.approx(4 / 6)
    assert same["sensitivity"] == pytest.approx(2 / 3)  # 0.9 and 0.4 reach 0.35
    assert same["specificity"] == pytest.approx(1 / 2)  # 0.5 is flagged, 0.2 is not
    low, high = same["auc_interval"]
    assert 0.0 <= low <= 4 / 6 <= high <= 1.0 and high - low > 0.1
    assert same["sensitivity_interval"][0] <= 2 / 3 <= same["sensitivity_interval"][1]


def test_a_bootstrap_interval_covers_the_statistic_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        positive = np.r_[np.ones(n, bool), np.zeros(n, bool)]
        scores = np.r_[rng.normal(1, 1, n), rng.normal(0, 1, n)]
        low, high = bootstrap_interval(roc_auc, (positive, scores), strata=positive, rounds=300)  # type: ignore[misc]
        assert low <= roc_auc(positive, scores) <= high  # type: ignore[operator]
        return high - low

    assert width(400) < width(25)


def test_the_source_probe_finds_a_source_that_shows_and_not_one_that_does_not() -> None:
    rng = np.random.default_rng(0)
    target = np.r_[np.ones(60, bool), np.zeros(60, bool)]
    shows = rng.normal(0, 1, (120, 4)) + target[:, None] * 2.0
    hidden = rng.normal(0, 1, (120, 4))
    assert probe_auc(shows, target) > 0.9  # type: ignore[operator]
    assert 0.3 < probe_auc(hidden, target) < 0.7  # type: ignore[operator]
    assert probe_auc(hidden[:3], target[:3]) is None


def test_the_auc_within_groups_pairs_each_melanoma_only_with_its_own_groups_lesions() -> None:
    # group a: mel 0.6 vs benign 0.5 (1 of 1 pairs right); group b: mel 0.2 vs benign 0.1 (1 of 1).
    # Pooled, the b melanoma (0.2) would rank below the a benign (0.5): AUC 3/4, not 1.
    positive = np.array([True, False, True, False])
    scores = np.array([0.6, 0.5, 0.2, 0.1])
    groups = np.array(["a", "a", "b", "b"])
    assert roc_auc(positive, scores) == pytest.approx(3 / 4)
    assert within_group_auc(positive, scores, groups) == pytest.approx(1.0)
    classes = ["melanoma", "nevus"]
    probabilities = np.stack([scores, 1 - scores], axis=1)
    y = np.where(positive, 0, 1)
    # A group without enough benign lesions is left out.
    figures = melanoma_same_source(probabilities, y, list(groups), classes, 0.5, min_benign=2,
                                   bootstrap=0)
    assert figures["sources"] == [] and figures["auc"] is None


def test_specificity_at_a_sensitivity_is_read_where_that_share_of_positives_is_caught() -> None:
    positive = np.array([True, True, True, True, False, False, False, False, False])
    scores = np.array([0.9, 0.8, 0.5, 0.2, 0.7, 0.4, 0.3, 0.1, 0.05])
    # 3 of 4 caught from 0.5 down: only 0.7 of the five benign is flagged.
    assert specificity_at_sensitivity(positive, scores, 0.75) == pytest.approx(4 / 5)
    # All 4 need 0.2: 0.7, 0.4 and 0.3 flagged.
    assert specificity_at_sensitivity(positive, scores, 1.0) == pytest.approx(2 / 5)
    assert specificity_at_sensitivity(positive[:4], scores[:4], 0.95) is None


def test_a_paired_difference_sees_a_small_gain_that_separate_intervals_miss() -> None:
    """Two models scoring the same images alike, the second a little better on every melanoma:
    the images' own spread is shared, so the paired interval excludes 0 while each model's own
    interval holds the other's AUC; models that score identically differ by exactly 0."""
    rng = np.random.default_rng(3)
    positive = np.r_[np.ones(150, bool), np.zeros(600, bool)]
    first = np.r_[rng.normal(1.2, 1, 150), rng.normal(0, 1, 600)]
    second = first + np.where(positive, 0.15, 0.0)
    paired = paired_difference(roc_auc, positive, first, second, rounds=400)
    assert paired["first"] == roc_auc(positive, first)
    assert paired["difference"] == pytest.approx(roc_auc(positive, second) - paired["first"])
    low, high = paired["difference_interval"]
    assert 0 < low <= paired["difference"] <= high
    alone = bootstrap_interval(roc_auc, (positive, first), strata=positive, rounds=400)
    assert alone is not None and alone[0] <= paired["second"] <= alone[1]

    same = paired_difference(roc_auc, positive, first, first.copy(), rounds=50)
    assert same["difference"] == 0 and same["difference_interval"] == (0.0, 0.0)
    spec = paired_difference(lambda p, s: specificity_at_sensitivity(p, s, 0.95), positive,
                             first, second, rounds=200)
    assert spec["difference"] > 0

"""Evaluation figures that fit an imbalanced screening problem (NumPy only)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, shape (num_classes, num_classes): rows are the true class, columns the predicted."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return matrix


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None when one side is empty."""
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, float)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U with average ranks for ties.
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=float)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score, from (0, 0) to (1, 1)."""
    positive = np.asarray(positive, bool)
    thresholds = np.unique(np.asarray(scores, float))[::-1]
    n_pos, n_neg = max(int(positive.sum()), 1), max(int((~positive).sum()), 1)
    fpr, tpr = [0.0], [0.0]
    for t in thresholds:
        flagged = scores >= t
        tpr.append(float((flagged & positive).sum() / n_pos))
        fpr.append(float((flagged & ~positive).sum() / n_neg))
    return np.array(fpr), np.array(tpr)


def sensitivity_specificity(positive: np.ndarray, scores: np.ndarray,
                            threshold: float) -> tuple[float | None, float | None]:
    """Sensitivity and specificity when `scores >= threshold` flags an image."""
    positive = np.asarray(positive, bool)
    flagged = np.asarray(scores, float) >= threshold
    sens = float((flagged & positive).sum() / positive.sum()) if positive.any() else None
    spec = float((~flagged & ~positive).sum() / (~positive).sum()) if (~positive).any() else None
    return sens, spec


def threshold_for_sensitivity(positive: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (flagged if score >= threshold) reaches `target`."""
    positive_scores = np.sort(np.asarray(scores, float)[np.asarray(positive, bool)])[::-1]
    if len(positive_scores) == 0:
        raise ValueError("no positive examples to set a threshold on")
    needed = int(np.ceil(target * len(positive_scores) - 1e-9))
    needed = min(max(needed, 1), len(positive_scores))
    return float(positive_scores[needed - 1])


def expected_calibration_error(probabilities: np.ndarray, y_true: np.ndarray,
                               bins: int = 10) -> tuple[float, list[dict[str, float]]]:
    """ECE of the top-class confidence over equal-width bins, and the per-bin table."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, table = 0.0, []
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence <= hi)
        if not inside.any():
            continue
        acc, conf = float(correct[inside].mean()), float(confidence[inside].mean())
        ece += inside.mean() * abs(acc - conf)
        table.append({"low": float(lo), "high": float(hi), "accuracy": acc,
                      "confidence": conf, "count": int(inside.sum())})
    return float(ece), table


def evaluate_predictions(probabilities: np.ndarray, y_true: np.ndarray, classes: list[str],
                         threshold: float, melanoma: str = "melanoma") -> dict[str, Any]:
    """The contract's evaluation object for probabilities, shape (n, classes), and true labels.

    Classes absent from `y_true` get support 0 and are left out of the balanced accuracy.
    """
    probabilities = np.asarray(probabilities, float)
    y_true = np.asarray(y_true, int)
    y_pred = probabilities.argmax(axis=1)
    k = len(classes)
    matrix = confusion_matrix(y_true, y_pred, k)
    per_class: dict[str, dict[str, float | int | None]] = {}
    recalls = []
    for i, name in enumerate(classes):
        tp = int(matrix[i, i])
        support = int(matrix[i].sum())
        predicted = int(matrix[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else None
        if recall is not None:
            recalls.append(recall)
        r = recall or 0.0
        f1 = 2 * precision * r / (precision + r) if precision + r else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    m = classes.index(melanoma)
    is_melanoma = y_true == m
    sens, spec = sensitivity_specificity(is_melanoma, probabilities[:, m], threshold)
    ece, bins = expected_calibration_error(probabilities, y_true)
    return {
        "n": len(y_true),
        "classes": list(classes),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "melanoma": {
            "auc": roc_auc(is_melanoma, probabilities[:, m]),
            "threshold": float(threshold),
            "sensitivity": sens,
            "specificity": spec,
        },
        "expected_calibration_error": ece,
        "calibration_bins": bins,
    }


def crossfit_threshold(positive: np.ndarray, scores: np.ndarray, target: float,
                       seed: int = 0) -> dict[str, float | None]:
    """Honest figures for a threshold set on validation: set it on one half, measure the other.

    Splits the set in two stratified halves, sets the threshold on each half and measures
    sensitivity and specificity on the other, and averages the two. Figures measured on the
    same images the threshold was set on are optimistic by construction; these are not.
    """
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, float)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(scores), bool)
    for group in (np.flatnonzero(positive), np.flatnonzero(~positive)):
        chosen = rng.permutation(group)[: len(group) // 2]
        half[chosen] = True
    sens, spec = [], []
    for fit, held in ((half, ~half), (~half, half)):
        if not positive[fit].any():
            continue  # too few positives to split: no honest figure from this half
        threshold = threshold_for_sensitivity(positive[fit], scores[fit], target)
        s, p = sensitivity_specificity(positive[held], scores[held], threshold)
        if s is not None and p is not None:
            sens.append(s)
            spec.append(p)
    return {"sensitivity": float(np.mean(sens)) if sens else None,
            "specificity": float(np.mean(spec)) if spec else None}

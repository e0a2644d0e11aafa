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
    # Just under the score that sets it: the service computes that image's score again in
    # float32 (the temperature inside the model), which can come out a unit in the last place
    # lower, and the threshold must not then miss the very melanoma that set it.
    return float(positive_scores[needed - 1]) * (1.0 - THRESHOLD_MARGIN)


#: How far below the deciding positive's score a threshold sits, relatively: about 80 units in
#: the last place of a float32, far less than any two images' scores differ by.
THRESHOLD_MARGIN = 1e-5


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


def bootstrap_interval(statistic: Any, arrays: tuple[np.ndarray, ...], *, strata: np.ndarray,
                       rounds: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(*arrays)`, resampling within each stratum.

    Resampling melanomas and benign lesions separately keeps both in every round, so AUC,
    sensitivity and specificity are defined in each. None when no round gives a value.
    """
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == value) for value in np.unique(strata)]
    values = []
    for _ in range(rounds):
        index = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        value = statistic(*(a[index] for a in arrays))
        if value is not None:
            values.append(value)
    if not values:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    return float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))


def specificity_at_sensitivity(positive: np.ndarray, scores: np.ndarray,
                               target: float) -> float | None:
    """Specificity at the highest threshold that reaches sensitivity `target` on these very
    images: an operating point that needs no threshold of the model's own, so that two models
    can be compared where both catch the same share of melanomas. None without both classes."""
    positive = np.asarray(positive, bool)
    if not positive.any() or positive.all():
        return None
    threshold = threshold_for_sensitivity(positive, scores, target)
    return sensitivity_specificity(positive, scores, threshold)[1]


def paired_difference(statistic: Any, positive: np.ndarray, first: np.ndarray,
                      second: np.ndarray, *, rounds: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """`statistic(positive, second) - statistic(positive, first)`: two models' scores on the
    same images, with a paired bootstrap 95% interval (each round resamples the images once,
    melanomas and benign lesions apart, and measures both models on that one resample). The
    pairing removes what the images themselves contribute to each figure's spread, so an
    interval that excludes 0 says the models differ, where two separate intervals that overlap
    say little. Keys: `first`, `second`, `difference`, `difference_interval` (None when no
    round gives a value)."""
    positive = np.asarray(positive, bool)
    first, second = np.asarray(first, float), np.asarray(second, float)

    def difference(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float | None:
        one, two = statistic(p, a), statistic(p, b)
        return None if one is None or two is None else float(two - one)

    one, two = statistic(positive, first), statistic(positive, second)
    return {"first": one, "second": two, "difference": difference(positive, first, second),
            "difference_interval": bootstrap_interval(
                difference, (positive, first, second), strata=positive, rounds=rounds,
                seed=seed)}


def within_group_auc(positive: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float | None:
    """AUC over (positive, negative) pairs of the same group only: sum of U over groups, divided
    by the number of such pairs. With one group it is the plain AUC."""
    u_sum, pairs = 0.0, 0
    for group in np.unique(groups):
        inside = groups == group
        n_pos, n_neg = int(positive[inside].sum()), int((~positive[inside]).sum())
        auc = roc_auc(positive[inside], scores[inside])
        if auc is not None:
            u_sum += auc * n_pos * n_neg
            pairs += n_pos * n_neg
    return u_sum / pairs if pairs else None


def melanoma_same_source(probabilities: np.ndarray, y_true: np.ndarray, sources: list[str],
                         classes: list[str], threshold: float, *, melanoma: str = "melanoma",
                         min_benign: int = 1, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Melanoma against benign lesions of the melanomas' own source only, with 95% intervals.

    Only sources that have melanomas and at least `min_benign` benign lesions count, and the
    AUC pairs each melanoma only with benign lesions of its own source, so recognising the
    source gives nothing away. Keys: `sources`, `n`, `melanomas`, `auc`, `sensitivity`,
    `specificity` (at `threshold`), and `*_interval` ([low, high], bootstrap resampling within
    each source and class) unless `bootstrap` is 0.
    """
    m = classes.index(melanoma)
    y_true = np.asarray(y_true, int)
    source_array = np.asarray(sources)
    positive = y_true == m
    kept = sorted(source for source in set(source_array[positive].tolist())
                  if int(((source_array == source) & ~positive).sum()) >= min_benign)
    inside = np.isin(source_array, kept)
    pos, scores, groups = positive[inside], np.asarray(probabilities, float)[inside, m], source_array[inside]
    sens, spec = sensitivity_specificity(pos, scores, threshold)
    result: dict[str, Any] = {
        "sources": kept, "n": int(inside.sum()), "melanomas": int(pos.sum()),
        "auc": within_group_auc(pos, scores, groups), "threshold": float(threshold),
        "sensitivity": sens, "specificity": spec,
    }
    if bootstrap and pos.any() and (~pos).any():
        strata = np.asarray([f"{g}/{p}" for g, p in zip(groups, pos, strict=True)])
        result["auc_interval"] = bootstrap_interval(
            within_group_auc, (pos, scores, groups), strata=strata, rounds=bootstrap, seed=seed)
        result["sensitivity_interval"] = bootstrap_interval(
            lambda p, s: sensitivity_specificity(p, s, threshold)[0], (pos, scores),
            strata=strata, rounds=bootstrap, seed=seed)
        result["specificity_interval"] = bootstrap_interval(
            lambda p, s: sensitivity_specificity(p, s, threshold)[1], (pos, scores),
            strata=strata, rounds=bootstrap, seed=seed)
    return result


def by_source_figures(probabilities: np.ndarray, labels: np.ndarray, sources: list[str],
                      classes: list[str]) -> dict[str, dict[str, Any]]:
    """Per source: n, accuracy, balanced accuracy over the classes it has, and its class counts."""
    out: dict[str, dict[str, Any]] = {}
    source_array = np.asarray(sources)
    labels = np.asarray(labels, int)
    for source in sorted(set(sources)):
        inside = source_array == source
        figures = evaluate_predictions(probabilities[inside], labels[inside], classes, 0.5)
        counts = np.bincount(labels[inside], minlength=len(classes))
        out[source] = {"n": int(inside.sum()), "accuracy": figures["accuracy"],
                       "balanced_accuracy": figures["balanced_accuracy"],
                       "classes": {classes[i]: int(c) for i, c in enumerate(counts) if c}}
    return out


def _logistic_fit(x: np.ndarray, y: np.ndarray, steps: int = 500, l2: float = 1e-2) -> np.ndarray:
    """Weights (d + 1,) of an L2-regularised logistic regression, by gradient descent."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30, 30)))
        w -= 0.5 * (xb.T @ (p - y) / len(y) + l2 * np.r_[w[:-1], 0.0])
    return w


def probe_auc(features: np.ndarray, target: np.ndarray, folds: int = 5, seed: int = 0) -> float | None:
    """Cross-validated AUC of a logistic regression predicting a binary `target` from features.

    The source probe: if a small linear classifier can tell the source from what the network
    outputs (or from plain image statistics), the source is there to be used as a shortcut.
    None when either side has fewer than `folds` members.
    """
    target = np.asarray(target, bool)
    if min(target.sum(), (~target).sum()) < folds:
        return None
    x = np.asarray(features, float)
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-9)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(x), int)
    for group in (np.flatnonzero(target), np.flatnonzero(~target)):
        assignment[rng.permutation(group)] = np.arange(len(group)) % folds
    scores = np.empty(len(x))
    for fold in range(folds):
        held = assignment == fold
        w = _logistic_fit(x[~held], target[~held].astype(float))
        scores[held] = np.hstack([x[held], np.ones((held.sum(), 1))]) @ w
    return roc_auc(target, scores)


def image_statistics(images: np.ndarray) -> np.ndarray:
    """Acquisition cues, shape (n, 24): per-channel mean, spread and percentiles of the whole
    image and of its border, and the darkness of the corners. Images (n, H, W, 3), 0..255."""
    x = np.asarray(images, np.float32) / 255.0
    n, h, w, _ = x.shape
    bh, bw = max(h // 8, 1), max(w // 8, 1)  # border strips
    ch, cw = max(h // 10, 1), max(w // 10, 1)  # corner squares
    border = np.concatenate([x[:, :bh].reshape(n, -1, 3), x[:, h - bh :].reshape(n, -1, 3),
                             x[:, :, :bw].reshape(n, -1, 3), x[:, :, w - bw :].reshape(n, -1, 3)],
                            axis=1)
    flat = x.reshape(n, -1, 3)
    corners = np.stack([x[:, :ch, :cw], x[:, :ch, w - cw :],
                        x[:, h - ch :, :cw], x[:, h - ch :, w - cw :]], axis=1)
    return np.hstack([flat.mean(1), flat.std(1), np.percentile(flat, 5, axis=1),
                      np.percentile(flat, 95, axis=1), border.mean(1), border.std(1),
                      corners.reshape(n, -1, 3).mean(1), corners.reshape(n, -1, 3).min(1)])

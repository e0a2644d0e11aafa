"""Temperature scaling (Guo et al., 2017) on probabilities: NumPy only."""

from __future__ import annotations

import numpy as np

from model.data import MELANOMA
from model.metrics import threshold_for_sensitivity


def temperature_scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T), row by row; shape (n, classes) in and out.

    Given several members' probabilities, shape (members, n, classes), each is scaled and the
    results averaged, as the shipped ensemble does (`model.architectures.build_ensemble`).
    """
    probabilities = np.asarray(probabilities, np.float64)
    if probabilities.ndim == 3:
        return np.mean([temperature_scale(p, temperature) for p in probabilities], axis=0)
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class)."""
    picked = np.asarray(probabilities)[np.arange(len(labels)), np.asarray(labels, int)]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray,
                    low: float = 0.05, high: float = 20.0) -> float:
    """The T that minimises the negative log-likelihood of held-out predictions, shape
    (n, classes), or of several members' averaged after scaling, shape (members, n, classes).

    A golden-section search on log T (the likelihood is unimodal in T); 1.0 when there is
    nothing to fit.
    """
    if len(labels) == 0:
        return 1.0
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t: float) -> float:
        return negative_log_likelihood(temperature_scale(probabilities, float(np.exp(log_t))),
                                       labels)

    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2.0))


def calibrate(held_out: np.ndarray, labels: np.ndarray, sources: list[str], batches: list[str],
              classes: list[str], target_sensitivity: float) -> tuple[float, float, np.ndarray]:
    """Temperature on held-out probabilities, then the threshold on same-source melanomas.

    `held_out` has shape (n, classes), or (members, n, classes) for several members per image
    (averaged after scaling, as the ensemble does). Returns (temperature, threshold, the scaled
    probabilities). The threshold is the highest that reaches the target sensitivity both on
    every melanoma against the benign lesions of its own source, and on the melanomas of each
    acquisition batch against that batch's benign lesions (`model.data.batch_of`): the groups in
    which the source cannot give the answer away.
    A set without ISIC ids is one source.
    """
    temperature = fit_temperature(held_out, labels)
    scaled = temperature_scale(held_out, temperature)
    m = classes.index(MELANOMA)
    is_mel = np.asarray(labels) == m
    return temperature, threshold_within_groups(scaled[:, m], is_mel, [sources, batches],
                                                target_sensitivity), scaled


def threshold_within_groups(melanoma_scores: np.ndarray, is_melanoma: np.ndarray,
                            groupings: list[list[str]], target_sensitivity: float) -> float:
    """The highest threshold that reaches the target sensitivity within every group, of every
    grouping, that has melanomas and at least 10 benign lesions; over all images when none has.

    `melanoma_scores` and `is_melanoma` have shape (n,); each grouping names every image's group.
    """
    thresholds = []
    for groups in groupings:
        group_array = np.asarray(groups)
        for group in sorted(set(group_array[is_melanoma].tolist())):
            inside = group_array == group
            if (~is_melanoma[inside]).sum() >= 10:  # a group with benign lesions to tell apart
                thresholds.append(threshold_for_sensitivity(
                    is_melanoma[inside], melanoma_scores[inside], target_sensitivity))
    if not thresholds:
        thresholds.append(threshold_for_sensitivity(is_melanoma, melanoma_scores,
                                                    target_sensitivity))
    return min(thresholds)

"""Evaluating a trained model on any folder-per-class set, with optional report figures."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model.data import scan_folder
from model.imaging import DecodeError
from model.inference import Classifier
from model.metrics import evaluate_predictions, roc_curve

logger = logging.getLogger(__name__)


def evaluate_folder(classifier: Classifier, data_dir: Path, *, only_sha256: set[str] | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    batch_size: int = 64) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Predict every unique image of a folder-per-class set; return (figures, probs, labels).

    `only_sha256` restricts the set (for instance to a card's validation split).
    """
    dataset = scan_folder(Path(data_dir), tuple(classifier.classes))
    samples = [s for s in dataset.samples if only_sha256 is None or s.sha256 in only_sha256]
    if not samples:
        raise ValueError(f"no labelled images found under {data_dir}")
    probabilities, labels, unreadable = [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        arrays = []
        for sample in chunk:
            try:
                arrays.append(classifier.decode(sample.path))
                labels.append(sample.label)
            except DecodeError as exc:
                unreadable.append({"path": str(sample.path), "reason": exc.reason})
        if arrays:
            probabilities.append(classifier.predict_arrays(np.stack(arrays)))
        if progress:
            progress(min(start + batch_size, len(samples)), len(samples))
    probs = np.concatenate(probabilities)
    y = np.asarray(labels)
    figures = evaluate_predictions(probs, y, classifier.classes, classifier.threshold)
    figures["model_version"] = classifier.version
    figures["dropped"] = [{"path": str(d.path), "reason": d.reason} for d in dataset.dropped]
    figures["unreadable"] = unreadable
    return figures, probs, y


def write_report(figures: dict[str, Any], probabilities: np.ndarray, labels: np.ndarray,
                 out_dir: Path) -> list[Path]:
    """PNG figures: confusion matrix, melanoma ROC with the threshold marked, reliability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = figures["classes"]
    written = []

    matrix = np.asarray(figures["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (n={figures['n']}, "
                 f"balanced accuracy {figures['balanced_accuracy']:.3f})")
    fig.tight_layout()
    written.append(out_dir / "confusion_matrix.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    m = classes.index("melanoma")
    positive = labels == m
    fpr, tpr = roc_curve(positive, probabilities[:, m])
    mel = figures["melanoma"]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot(fpr, tpr, label=f"melanoma vs rest (AUC {mel['auc'] or float('nan'):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey")
    if mel["sensitivity"] is not None and mel["specificity"] is not None:
        ax.plot(1 - mel["specificity"], mel["sensitivity"], "o", color="crimson",
                label=f"alert threshold {mel['threshold']:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right")
    ax.set_title("Melanoma ROC")
    fig.tight_layout()
    written.append(out_dir / "melanoma_roc.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    bins = figures["calibration_bins"]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
            label=f"model (ECE {figures['expected_calibration_error']:.3f})")
    ax.set_xlabel("confidence of the top class")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    ax.set_title("Calibration")
    fig.tight_layout()
    written.append(out_dir / "calibration.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written

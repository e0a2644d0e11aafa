"""Evaluating a trained model on any folder-per-class set, with optional report figures."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model.calibration import threshold_within_groups
from model.data import HAM10000, ISIC_ARCHIVE, UNKNOWN_SOURCE, batch_of, scan_folder, source_of
from model.imaging import DecodeError
from model.inference import Classifier
from model.labels import TEST_DATASET, read_labels, source_group
from model.metrics import (
    by_source_figures,
    evaluate_predictions,
    expected_calibration_error,
    image_statistics,
    melanoma_same_source,
    probe_auc,
    roc_curve,
    sensitivity_specificity,
)

logger = logging.getLogger(__name__)


#: The ISIC 2017 challenge (Part 3, melanoma), on its test set: the best entry's AUC, about 0.87,
#: an ensemble of ImageNet-pretrained networks (Codella et al., 2018).
ISIC2017_CHALLENGE_BEST_AUC = 0.87


def selected_samples(data_dir: Path, classes: tuple[str, ...],
                     only_sha256: set[str] | None = None) -> tuple[Any, list[Any]]:
    """The labelled set under `data_dir` (a folder per class, or a `.csv` table of labels) and
    the samples `evaluate_folder` predicts, in its order: those in `only_sha256` (all without
    it) and, from a table, the ISIC 2017 test set always."""
    table = data_dir.suffix == ".csv"
    dataset = read_labels(data_dir, classes) if table else scan_folder(data_dir, classes)
    samples = [s for s in dataset.samples if only_sha256 is None or s.sha256 in only_sha256
               or (table and s.dataset == TEST_DATASET)]
    if not samples:
        raise ValueError(f"no labelled images found under {data_dir}")
    return dataset, samples


def evaluate_folder(classifier: Classifier, data_dir: Path, *, only_sha256: set[str] | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    batch_size: int = 64, seed: int = 0) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Predict every unique image of a labelled set; return (figures, probs, labels).

    The set is a folder-per-class set or a table of labels (a `.csv`, `model.labels`); with a
    table, each image's source is its dataset, and `by_dataset` and `isic2017_test` are added.
    `only_sha256` restricts the set (for instance to a card's validation split). Beside the
    contract's figures: `by_source` (per source, and a probe of how well the source can be told
    from the network's outputs and from plain image statistics), `melanoma_same_source`
    (melanoma against benign lesions of its own source, with bootstrap 95% intervals) and
    `out_of_scope` (how many images the model marks as not dermoscopic).
    """
    table = Path(data_dir).suffix == ".csv"
    dataset, samples = selected_samples(Path(data_dir), tuple(classifier.classes), only_sha256)
    probabilities, distances, statistics, labels, sources, batches, unreadable = (
        [], [], [], [], [], [], [])
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        arrays = []
        for sample in chunk:
            try:
                arrays.append(classifier.decode(sample.path))
                labels.append(sample.label)
                sources.append(source_group(sample) if table else source_of(sample.path))
                batches.append(source_group(sample) if table else batch_of(sample.path))
            except DecodeError as exc:
                unreadable.append({"path": str(sample.path), "reason": exc.reason})
        if arrays:
            batch = np.stack(arrays)
            probs, dist = classifier.predict_arrays_scoped(batch)
            probabilities.append(probs)
            distances.append(dist)
            statistics.append(image_statistics(batch))
        if progress:
            progress(min(start + batch_size, len(samples)), len(samples))
    probs = np.concatenate(probabilities)
    dist = np.concatenate(distances)
    y = np.asarray(labels)
    classes = classifier.classes
    figures = evaluate_predictions(probs, y, classes, classifier.threshold)
    figures["by_source"] = by_source_figures(probs, y, sources, classes)
    known = [s != UNKNOWN_SOURCE for s in sources]
    if len({s for s, k in zip(sources, known, strict=True) if k}) == 2:
        inside = np.asarray(known)
        is_ham = np.asarray(sources)[inside] == HAM10000
        figures["by_source"]["probe"] = {
            "target": f"{HAM10000} vs {ISIC_ARCHIVE}",
            "network_outputs_auc": probe_auc(np.log(np.clip(probs[inside], 1e-9, 1)), is_ham,
                                             seed=seed),
            "image_statistics_auc": probe_auc(np.concatenate(statistics)[inside], is_ham, seed=seed),
        }
    figures["melanoma_same_source"] = melanoma_same_source(probs, y, sources, classes,
                                                           classifier.threshold, seed=seed)
    figures["melanoma_same_batch"] = melanoma_same_source(probs, y, batches, classes,
                                                          classifier.threshold, min_benign=10,
                                                          seed=seed)
    scoped = classifier.card.out_of_scope_distance is not None
    outside = np.asarray([classifier.is_out_of_scope(float(d)) for d in dist], bool)
    melanoma = y == classes.index("melanoma")
    figures["out_of_scope"] = {
        "distance_limit": classifier.card.out_of_scope_distance,
        "count": int(outside.sum()) if scoped else None,
        # Alerted all the same when they reach the threshold, with a caveat in the alert.
        "melanomas": int((outside & melanoma).sum()) if scoped else None,
    }
    if table:
        figures["by_dataset"] = by_dataset_figures(probs, y, sources, outside, classes,
                                                   classifier.threshold, seed=seed)
        if only_sha256 is not None:  # images the model never trained on: thresholds mean something
            figures["new_source"] = new_source_figures(
                probs, y, sources, classes, classifier.card.training.get("hold_out_datasets", []),
                classifier.card.target_sensitivity, seed=seed)
            fitting = np.asarray(sources) != TEST_DATASET
            if melanoma[fitting].any() and (~melanoma[fitting]).any():
                figures["threshold_stability"] = threshold_stability(
                    probs[fitting, classes.index("melanoma")], melanoma[fitting],
                    [list(np.asarray(sources)[fitting]), list(np.asarray(batches)[fitting])],
                    classifier.card.target_sensitivity, seed=seed)
        test = figures["by_dataset"].get(TEST_DATASET)
        if test is not None:
            figures["isic2017_test"] = {**test, "challenge_best_auc": ISIC2017_CHALLENGE_BEST_AUC}
    figures["model_version"] = classifier.version
    figures["dropped"] = [{"path": str(d.path), "reason": d.reason} for d in dataset.dropped]
    figures["unreadable"] = unreadable
    return figures, probs, y


def by_dataset_figures(probabilities: np.ndarray, labels: np.ndarray, datasets: list[str],
                       out_of_scope: np.ndarray, classes: list[str], threshold: float, *,
                       seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per dataset: melanoma against that dataset's benign lesions (AUC, and sensitivity and
    specificity at `threshold`, each with a bootstrap 95% interval), how many of its images
    would be emailed, its calibration error, and how many of its images are out of scope."""
    m = classes.index("melanoma")
    names = np.asarray(datasets)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(datasets)):
        inside = names == name
        figures = melanoma_same_source(probabilities[inside], labels[inside],
                                       [name] * int(inside.sum()), classes, threshold, seed=seed)
        figures.pop("sources")
        out[name] = {
            **figures,
            "emailed": int((probabilities[inside, m] >= threshold).sum()),
            "melanomas_emailed": int(((probabilities[inside, m] >= threshold)
                                      & (labels[inside] == m)).sum()),
            "expected_calibration_error": expected_calibration_error(probabilities[inside],
                                                                     labels[inside])[0],
            "out_of_scope": int(out_of_scope[inside].sum()),
        }
    return out


def new_source_figures(probabilities: np.ndarray, labels: np.ndarray, datasets: list[str],
                       classes: list[str], held_out_whole: list[str], target_sensitivity: float, *,
                       bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The threshold rule checked where the source gives nothing away: for each dataset that
    training held out whole, the threshold that the other datasets' held-out images set (the
    rule `model.calibration.calibrate` uses), and the sensitivity and specificity it reaches on
    the held-out dataset, with 95% intervals. The test set sets nothing."""
    m = classes.index("melanoma")
    names = np.asarray(datasets)
    melanoma = np.asarray(labels) == m
    out: dict[str, dict[str, Any]] = {}
    for name in held_out_whole:
        inside = names == name
        others = ~inside & (names != TEST_DATASET)
        if not (melanoma[inside].any() and melanoma[others].any()):
            continue
        threshold = threshold_within_groups(probabilities[others, m], melanoma[others],
                                            [list(names[others])], target_sensitivity)
        figures = melanoma_same_source(probabilities[inside], labels[inside],
                                       [name] * int(inside.sum()), classes, threshold,
                                       bootstrap=bootstrap, seed=seed)
        figures.pop("sources")
        out[name] = {"threshold_from_other_datasets": threshold, **figures}
    return out


def threshold_stability(melanoma_scores: np.ndarray, is_melanoma: np.ndarray,
                        groupings: list[list[str]], target_sensitivity: float, *,
                        bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """How far the alert threshold rests on a few melanomas: the threshold that training's rule
    (`threshold_within_groups`) sets on these images, and again on each of `bootstrap` redraws of
    them (within each group of the first grouping and class), with the 95% interval of those
    thresholds and of the sensitivity and specificity each reaches on all of these images.
    Call it with the held-out images the threshold was set on (never the test set)."""
    scores = np.asarray(melanoma_scores, float)
    positive = np.asarray(is_melanoma, bool)
    group_arrays = [np.asarray(groups) for groups in groupings]
    strata = np.asarray([f"{g}/{p}" for g, p in zip(group_arrays[0], positive, strict=True)])
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(strata == value) for value in np.unique(strata)]
    drawn = []
    for _ in range(bootstrap):
        index = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        drawn.append(threshold_within_groups(scores[index], positive[index],
                                             [list(g[index]) for g in group_arrays],
                                             target_sensitivity))
    thresholds = np.asarray(drawn)
    at = [sensitivity_specificity(positive, scores, t) for t in thresholds]

    def interval(values: Any) -> list[float]:
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]

    return {
        "n": len(scores), "melanomas": int(positive.sum()), "bootstrap": bootstrap,
        "threshold": threshold_within_groups(scores, positive, groupings, target_sensitivity),
        "threshold_interval": interval(thresholds),
        "sensitivity_interval": interval([sens for sens, _ in at]),
        "specificity_interval": interval([spec for _, spec in at]),
    }


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

"""Models side by side on the same unseen images, per dataset, with 95% intervals.

The images: those the shipped model's card holds out (its validation fold, which holds the
ISIC 2018 test set whole) and the ISIC 2017 test set, less every image that any compared model
trained on, so that no model is measured on what it learnt. Per dataset and model: melanoma
against that dataset's benign lesions (AUC; sensitivity and specificity at the model's own alert
threshold), how many images would be emailed, the calibration error and how many are out of
scope. Then the generated non-lesion pictures (frames, documents, faces, scenes, patterns): how
many are out of scope, and how many would read "Melanoma suspected" (in scope and at or above
the threshold), which must be none. Last, each model paired with the first on the very same
images: the difference in AUC and in specificity where both catch 95 % of that dataset's
melanomas, each with a paired bootstrap interval (an interval that excludes 0 says the two
differ; two separate intervals that overlap do not say they do not).

    python benchmarks/model_comparison.py [--labels ../shared/data/labels.csv] \
        [--model PATH ...] [--json figures.json]

Without --model: v1 and v2 (benchmarks/baseline/) and the shipped model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.card import shipped_model_path
from model.evaluate import evaluate_folder, selected_samples
from model.inference import Classifier, Prediction
from model.labels import source_group
from model.metrics import paired_difference, roc_auc, specificity_at_sensitivity
from tests.test_model_shipped import _non_lesion_pictures

BASELINES = Path(__file__).resolve().parent / "baseline"
DEFAULT_MODELS = [BASELINES / "melanoscreen-v1.keras", BASELINES / "melanoscreen-v2.keras",
                  shipped_model_path()]


def trained_on(classifier: Classifier) -> set[str]:
    """The images a model's members trained on, as its card records them."""
    training = classifier.card.training_set
    folds = training.get("fold_sha256", {})
    held = set(training.get("validation_sha256", []))
    if not held:  # cross-validated: every image was trained on by some member
        return set(folds)
    return set(folds) - held


def unseen_pool(classifiers: list[Classifier]) -> set[str]:
    """The shipped model's held-out images, less what any compared model trained on."""
    shipped = classifiers[-1].card.training_set.get("validation_sha256", [])
    seen = set().union(*(trained_on(c) for c in classifiers))
    return set(shipped) - seen


def interval(row: dict[str, Any], key: str) -> str:
    value, bounds = row.get(key), row.get(f"{key}_interval")
    if value is None:
        return "n/a"
    return f"{value:.3f} [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else f"{value:.3f}"


def non_lesion_figures(classifier: Classifier) -> dict[str, dict[str, int]]:
    """Per kind of generated non-lesion picture: how many, out of scope, read as melanoma."""
    with tempfile.TemporaryDirectory() as folder:
        pictures = _non_lesion_pictures(Path(folder))
        out = {}
        for kind, paths in pictures.items():
            answers = [a for a in classifier.predict(paths) if isinstance(a, Prediction)]
            reached = [a.melanoma_probability >= classifier.threshold for a in answers]
            out[kind] = {
                "pictures": len(answers),
                "out_of_scope": sum(a.out_of_scope for a in answers),
                "emailed": sum(reached),
                "melanoma_suspected": sum(r and not a.out_of_scope
                                          for r, a in zip(reached, answers, strict=True)),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=Path, default=Path("../shared/data/labels.csv"))
    parser.add_argument("--model", type=Path, action="append",
                        help="a .keras file (repeat; the last one's held-out fold is the pool)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    classifiers = [Classifier(path) for path in (args.model or DEFAULT_MODELS)]
    pool = unseen_pool(classifiers)
    print(f"{len(pool)} held-out images none of the {len(classifiers)} models trained on, "
          f"and the ISIC 2017 test set\n")
    results: dict[str, Any] = {}
    melanoma_scores = []
    for classifier in classifiers:
        figures, probabilities, labels = evaluate_folder(classifier, args.labels,
                                                         only_sha256=pool)
        if figures["unreadable"]:
            sys.exit(f"unreadable images: {figures['unreadable'][:3]}")
        melanoma_scores.append(probabilities[:, classifier.classes.index("melanoma")])
        results[classifier.version] = {
            "threshold": classifier.threshold, "by_dataset": figures["by_dataset"],
            "non_lesion_pictures": non_lesion_figures(classifier)}
    datasets = sorted({name for r in results.values() for name in r["by_dataset"]})
    for name in datasets:
        print(f"## {name}")
        print("| model | images | melanomas | AUC [95% CI] | threshold | sensitivity [95% CI] "
              "| specificity [95% CI] | emailed | ECE | out of scope |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for version, result in results.items():
            row = result["by_dataset"].get(name)
            if row is None:
                continue
            print(f"| {version} | {row['n']} | {row['melanomas']} | {interval(row, 'auc')} | "
                  f"{result['threshold']:.4f} | {interval(row, 'sensitivity')} | "
                  f"{interval(row, 'specificity')} | {row['emailed']} | "
                  f"{row['expected_calibration_error']:.3f} | {row['out_of_scope']} |")
        print()
    print("## Generated non-lesion pictures")
    print("| model | kind | pictures | out of scope | emailed | read as melanoma suspected |")
    print("| --- | --- | --- | --- | --- | --- |")
    for version, result in results.items():
        for kind, row in result["non_lesion_pictures"].items():
            print(f"| {version} | {kind} | {row['pictures']} | {row['out_of_scope']} | "
                  f"{row['emailed']} | {row['melanoma_suspected']} |")
    if len(classifiers) > 1:
        first = classifiers[0]
        _, samples = selected_samples(args.labels, tuple(first.classes), pool)
        datasets = [source_group(sample) for sample in samples]
        # Every model predicted the same images in the same order: any model's labels serve.
        positive = labels == first.classes.index("melanoma")
        paired = paired_figures(positive, datasets, melanoma_scores)
        print(f"\n## Paired with {first.version}: the difference on the same images "
              "[paired 95% CI]")
        print("| dataset | model | AUC | AUC difference | specificity at sensitivity 0.95 "
              "| difference |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, rows in paired.items():
            for classifier, row in zip(classifiers[1:], rows, strict=True):
                print(f"| {name} | {classifier.version} | {row['auc']['second']:.3f} | "
                      f"{difference(row['auc'])} | "
                      f"{row['specificity_at_sensitivity_0.95']['second']:.3f} | "
                      f"{difference(row['specificity_at_sensitivity_0.95'])} |")
        for index, classifier in enumerate(classifiers[1:]):
            results[classifier.version][f"paired_with_{first.version}"] = {
                name: rows[index] for name, rows in paired.items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def paired_figures(positive: Any, datasets: list[str],
                   scores: list[Any]) -> dict[str, list[dict[str, Any]]]:
    """Per dataset, each model after the first against the first, on the same images."""
    names = np.asarray(datasets)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(set(datasets)):
        inside = names == name
        if not positive[inside].any() or positive[inside].all():
            continue
        out[name] = [{
            "auc": paired_difference(roc_auc, positive[inside], scores[0][inside],
                                     other[inside]),
            "specificity_at_sensitivity_0.95": paired_difference(
                lambda p, s: specificity_at_sensitivity(p, s, 0.95), positive[inside],
                scores[0][inside], other[inside]),
        } for other in scores[1:]]
    return out


def difference(row: dict[str, Any]) -> str:
    bounds = row["difference_interval"]
    return (f"{row['difference']:+.3f} [{bounds[0]:+.3f}, {bounds[1]:+.3f}]" if bounds
            else f"{row['difference']:+.3f}")


if __name__ == "__main__":
    main()

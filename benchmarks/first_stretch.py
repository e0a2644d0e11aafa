"""Models on the older archive's first acquisition stretch, on those of its images they never saw.

The course's kept-aside test set most likely comes from the older archive's first stretch (ISIC
ids below 200; see `benchmarks/held_out_mix.py`), so the stretch is where the course bar (15 of 16
melanomas emailed, AUC 0.80) can be estimated. A network trained with `--hold-out-chunk` never
saw any of it, so all of the stretch's melanomas and benign images are measured; a network
without it only on the few in its held-out fold (the script says how many). Per model:

- melanoma AUC against the stretch's benign images, with a bootstrap 95% interval;
- the melanomas reaching the card's threshold, with a Wilson 95% interval, and the specificity;
- the same at a threshold set without the stretch: the card's threshold is set on the held-out
  fold, which holds the stretch, so it is partly tuned on these very melanomas. This one is set
  by the training's own rule (`model.calibration.threshold_within_groups`: the card's target
  sensitivity within every dataset) on the held-out images outside the stretch.

    python benchmarks/first_stretch.py [--labels ../shared/data/labels.csv] [MODEL ...]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from held_out_mix import held_out_predictions  # beside this script

from model.calibration import threshold_within_groups
from model.card import shipped_model_path
from model.data import in_first_chunk
from model.labels import source_group
from model.metrics import bootstrap_interval, roc_auc

#: The course bar: 15 of 16 melanomas emailed, melanoma AUC 0.80.
BAR_SENSITIVITY = 15 / 16
BAR_AUC = 0.80


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound near 0 and 1, where the normal one is not)."""
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def describe(name: str, scores: np.ndarray, is_melanoma: np.ndarray, threshold: float) -> str:
    """One line: melanomas caught of all, with their interval, and the benign images' specificity."""
    caught = int(np.sum(scores[is_melanoma] >= threshold))
    total = int(is_melanoma.sum())
    low, high = wilson_interval(caught, total)
    specificity = float(np.mean(scores[~is_melanoma] < threshold))
    verdict = "meets" if total and caught / total >= BAR_SENSITIVITY else "below"
    return (f"  {name:<42} {threshold:.4f}: {caught} of {total} melanomas "
            f"({caught / max(total, 1):.3f} [{low:.3f}, {high:.3f}], {verdict} 15 of 16), "
            f"specificity {specificity:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", type=Path, help="default: the shipped model")
    parser.add_argument("--labels", type=Path, default=Path("../shared/data/labels.csv"))
    args = parser.parse_args()

    for path in args.models or [shipped_model_path()]:
        classifier, samples, probs = held_out_predictions(path, args.labels)
        m = list(classifier.classes).index("melanoma")
        scores = probs[:, m]
        is_melanoma = np.asarray([s.label == m for s in samples])
        stretch = np.asarray([in_first_chunk(s.path) for s in samples])
        held_whole = bool(classifier.card.training.get("hold_out_chunk"))

        print(f"\n{classifier.version}: {len(samples)} held-out images; the first stretch "
              f"{'held out whole' if held_whole else 'partly trained on'}: "
              f"{int((stretch & is_melanoma).sum())} melanomas and "
              f"{int((stretch & ~is_melanoma).sum())} benign images held out")
        inside_scores, inside_melanoma = scores[stretch], is_melanoma[stretch]
        auc = roc_auc(inside_melanoma, inside_scores)
        interval = bootstrap_interval(roc_auc, (inside_melanoma, inside_scores),
                                      strata=inside_melanoma)
        if auc is None or interval is None:
            print("  no melanoma or no benign image of the stretch held out: nothing to measure")
            continue
        print(f"  melanoma AUC against the stretch's benign images {auc:.3f} "
              f"[{interval[0]:.3f}, {interval[1]:.3f}] "
              f"({'meets' if auc >= BAR_AUC else 'below'} {BAR_AUC})")
        print("  melanoma probabilities: " + ", ".join(
            f"{p:.3f}" for p in sorted(inside_scores[inside_melanoma])))
        print(describe("at the card's threshold", inside_scores, inside_melanoma,
                       classifier.threshold))
        outside = ~stretch
        groups = [source_group(s) for s, o in zip(samples, outside, strict=True) if o]
        untuned = threshold_within_groups(scores[outside], is_melanoma[outside], [groups],
                                          classifier.card.target_sensitivity)
        print(describe("at a threshold set without the stretch", inside_scores, inside_melanoma,
                       untuned))


if __name__ == "__main__":
    main()

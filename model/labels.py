"""A table of labels (`labels.csv`): one sample per distinct content, its dataset and its lesion,
and folds that never split a lesion.

The table has one row per file: `file` (path under the table's folder), `label`, `dataset`,
`lesion_id` (may be empty) and `sha256`. Byte-identical files are one sample. The test dataset
(`TEST_DATASET`) is kept apart: its images, and every image of a lesion it shows, are never in a
training fold, nor used for the temperature, the threshold or the choice of a model.
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from model.data import ISIC_CLASSES, LabelledSet, Sample, source_of

#: The ISIC 2017 challenge's test set: reported, never trained or tuned on.
TEST_DATASET = "ISIC2017-test"
#: `grouped_folds`' fold for the images that no fold may hold.
TEST_FOLD = -1
#: Datasets reported and calibrated as one: ISIC 2017's validation set is its training set's
#: small sibling (30 melanomas), too few to set a threshold on alone.
DATASET_GROUPS = {"ISIC2017-train": "ISIC2017", "ISIC2017-val": "ISIC2017"}
_REQUIRED = ("file", "label", "dataset", "lesion_id", "sha256")


class LabelsError(ValueError):
    """The table is unreadable or names a class or file that is not there."""


def read_labels(table: Path, classes: tuple[str, ...] = ISIC_CLASSES) -> LabelledSet:
    """One `Sample` per distinct sha256, with its dataset and lesion; paths under the table's folder.

    A content listed under several datasets counts as the test dataset when any copy is in it
    (it must never be trained on), else as the first listed. A content listed under two labels
    is refused: the table must agree with itself.
    """
    table = Path(table)
    root = table.parent
    index = {name: i for i, name in enumerate(classes)}
    try:
        with table.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"cannot read {table}: {exc}") from exc
    missing = [name for name in _REQUIRED if rows and name not in rows[0]]
    if not rows or missing:
        raise LabelsError(f"{table}: no rows, or no column {', '.join(missing)}")
    by_hash: dict[str, list[dict[str, str]]] = defaultdict(list)
    for number, row in enumerate(rows, start=2):
        if row["label"] not in index:
            raise LabelsError(f"{table} line {number}: unknown class {row['label']!r}")
        by_hash[row["sha256"]].append(row)
    samples = []
    for digest, copies in by_hash.items():
        labels = {row["label"] for row in copies}
        if len(labels) > 1:
            raise LabelsError(f"{table}: {copies[0]['file']} is labelled {sorted(labels)}")
        datasets = [row["dataset"] for row in copies]
        dataset = TEST_DATASET if TEST_DATASET in datasets else datasets[0]
        lesions = sorted({row["lesion_id"] for row in copies if row["lesion_id"]})
        path = root / copies[0]["file"]
        samples.append(Sample(path, index[copies[0]["label"]], digest, dataset=dataset,
                              lesions=tuple(lesions)))
    samples.sort(key=lambda s: str(s.path))
    return LabelledSet(root, classes, samples)


def _lesion_groups(samples: Sequence[Sample]) -> list[list[int]]:
    """Indices of the samples that share a lesion, transitively (union-find); one group each."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, sample in enumerate(samples):
        for lesion in sample.lesions:
            if lesion in first:
                parent[find(i)] = find(first[lesion])
            else:
                first[lesion] = i
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(samples)):
        groups[find(i)].append(i)
    return sorted(groups.values(), key=lambda members: min(samples[m].sha256 for m in members))


def grouped_folds(samples: Sequence[Sample], k: int, seed: int,
                  hold_out: Iterable[str] = ()) -> list[int]:
    """Each sample's fold in 0..k-1, or `TEST_FOLD`; a lesion's images always share one.

    Lesions are dealt to folds round-robin within (dataset, class) strata, shuffled by `seed`.
    A lesion with an image of the test dataset is in `TEST_FOLD` whole; a lesion with an image of
    a dataset in `hold_out` is in fold 0 whole, with the rest of that dataset (beside its share of
    the others), so fold 0's member is measured there as on a new clinic's images.
    """
    if k < 2:
        raise ValueError("k must be at least 2")
    held = set(hold_out)
    folds = [0] * len(samples)
    strata: dict[tuple[str, int], list[list[int]]] = defaultdict(list)
    for group in _lesion_groups(samples):
        datasets = {samples[i].dataset for i in group}
        if TEST_DATASET in datasets:
            for i in group:
                folds[i] = TEST_FOLD
        elif datasets & held:
            for i in group:
                folds[i] = 0
        else:
            label = Counter(samples[i].label for i in group).most_common(1)[0][0]
            strata[(sorted(datasets)[0], label)].append(group)
    rng = random.Random(seed)
    offset = 0
    for key in sorted(strata):
        groups = strata[key]
        rng.shuffle(groups)
        for position, group in enumerate(groups):
            # Round-robin, continuing where the last stratum stopped, so fold sizes stay even.
            for i in group:
                folds[i] = (offset + position) % k
        offset += len(groups)
    return folds


def source_group(sample: Sample) -> str:
    """Where an image came from, for per-source figures: its dataset (grouped by
    `DATASET_GROUPS`), else the archive its ISIC id names (`model.data.source_of`)."""
    if sample.dataset:
        return DATASET_GROUPS.get(sample.dataset, sample.dataset)
    return source_of(sample.path)

"""Folder-per-class image sets: scanning, SHA-256 de-duplication, and a leak-free stratified split."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

#: The nine ISIC classes, sorted: this order is the model's output order.
ISIC_CLASSES: tuple[str, ...] = (
    "actinic keratosis",
    "basal cell carcinoma",
    "dermatofibroma",
    "melanoma",
    "nevus",
    "pigmented benign keratosis",
    "seborrheic keratosis",
    "squamous cell carcinoma",
    "vascular lesion",
)
MELANOMA = "melanoma"

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)


@dataclass(frozen=True)
class Sample:
    """One image file of a labelled set."""

    path: Path
    label: int
    sha256: str


@dataclass(frozen=True)
class Dropped:
    """A file left out of a set, and why."""

    path: Path
    reason: str


@dataclass
class LabelledSet:
    """The unique, consistently labelled images of a folder-per-class set."""

    root: Path
    classes: tuple[str, ...]
    samples: list[Sample]
    dropped: list[Dropped] = field(default_factory=list)
    unknown_folders: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Images per class name, in class order."""
        counts = dict.fromkeys(self.classes, 0)
        for sample in self.samples:
            counts[self.classes[sample.label]] += 1
        return counts

    def fingerprint(self) -> str:
        """SHA-256 over the sorted file hashes: names the set's content, not its paths."""
        return fingerprint_of(s.sha256 for s in self.samples)


def fingerprint_of(hashes: object) -> str:
    """SHA-256 of the sorted, newline-joined hex digests."""
    joined = "\n".join(sorted(hashes))  # type: ignore[call-overload]
    return hashlib.sha256(joined.encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def scan_folder(root: Path, classes: tuple[str, ...] = ISIC_CLASSES) -> LabelledSet:
    """Read a folder-per-class set; keep one copy of duplicates and drop conflicting labels.

    Folders whose name is not one of `classes` are reported and skipped; a set lacking some
    classes is fine (it still evaluates).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such data folder: {root}")
    index = {name: i for i, name in enumerate(classes)}
    by_hash: dict[str, list[tuple[Path, int]]] = defaultdict(list)
    unknown: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in index:
            unknown.append(folder.name)
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                by_hash[sha256_file(path)].append((path, index[folder.name]))

    samples: list[Sample] = []
    dropped: list[Dropped] = []
    for digest, copies in sorted(by_hash.items(), key=lambda item: str(item[1][0][0])):
        labels = {label for _, label in copies}
        if len(labels) > 1:
            names = ", ".join(sorted(classes[label] for label in labels))
            for path, _ in copies:
                dropped.append(Dropped(path, f"identical content under different labels ({names})"))
            continue
        keep, *extra = copies
        samples.append(Sample(keep[0], keep[1], digest))
        for path, _ in extra:
            dropped.append(Dropped(path, f"exact duplicate of {keep[0].relative_to(root)}"))
    samples.sort(key=lambda s: str(s.path))
    return LabelledSet(root, classes, samples, dropped, unknown)


def stratified_split(
    samples: list[Sample], validation_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split per class with a fixed seed; every class with >= 2 images gets >= 1 validation image.

    The samples are unique by content (see `scan_folder`), so no image and no exact duplicate of
    one can land on both sides.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError("validation_fraction must be in (0, 1)")
    rng = random.Random(seed)
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: s.sha256):
        by_label[sample.label].append(sample)
    train: list[Sample] = []
    validation: list[Sample] = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_val = round(len(group) * validation_fraction)
        n_val = min(max(n_val, 1), len(group) - 1) if len(group) >= 2 else 0
        validation.extend(group[:n_val])
        train.extend(group[n_val:])
    return train, validation

"""Folder-per-class image sets: scanning, SHA-256 de-duplication, and a leak-free stratified split."""

from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
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
    #: The data set it belongs to (`labels.csv`'s `dataset`); "" for a folder-per-class set.
    dataset: str = ""
    #: The lesions it shows (`labels.csv`'s `lesion_id`): images of one lesion share a fold.
    lesions: tuple[str, ...] = ()


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


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


#: Image sources, read from the ISIC id in a file name (see `source_of`).
HAM10000 = "ham10000"
ISIC_ARCHIVE = "isic-archive"
UNKNOWN_SOURCE = "unknown"
SOURCES: tuple[str, ...] = (ISIC_ARCHIVE, HAM10000, UNKNOWN_SOURCE)
#: HAM10000's images carry ISIC ids 24306..34320; lower ids are the older archive (ISIC 2016-17).
HAM10000_IDS = range(24306, 34321)
_ISIC_ID = re.compile(r"ISIC_(\d{7})(?!\d)")


def _isic_id(name: str | Path) -> int | None:
    match = _ISIC_ID.search(Path(name).name)
    return int(match.group(1)) if match else None


def source_of(name: str | Path) -> str:
    """The archive an image came from, by the ISIC id in its file name; "unknown" without one.

    Any ISIC id outside HAM10000's range counts as the ISIC archive.
    """
    number = _isic_id(name)
    if number is None:
        return UNKNOWN_SOURCE
    return HAM10000 if number in HAM10000_IDS else ISIC_ARCHIVE


#: The older archive's images here come in two batches with different class mixes: ids below
#: 2,000 (the ISIC 2016 challenge's images: melanomas and nevi) and ids from 9,000 (added for
#: the 2017 challenge: melanomas and seborrheic keratoses, almost no nevus). The batch is a
#: second, finer shortcut; the figures within one batch are the strictest same-source figures.
ARCHIVE_EARLY_IDS = range(0, 2000)


#: The early batch's first 200 ids, one stretch of acquisition (here: nevi below 100, melanomas
#: from 100). Training can hold it out whole (`TrainConfig.hold_out_chunk`): a model that never
#: saw any of it is measured there as on a new camera, where neither the batch nor the chunk
#: gives the answer away.
FIRST_CHUNK_IDS = range(0, 200)


def in_first_chunk(name: str | Path) -> bool:
    """Whether an image's ISIC id lies in `FIRST_CHUNK_IDS`; False without an id."""
    number = _isic_id(name)
    return number is not None and number in FIRST_CHUNK_IDS


def batch_of(name: str | Path) -> str:
    """`source_of`, with the older archive split into its early and later batch."""
    source = source_of(name)
    if source != ISIC_ARCHIVE:
        return source
    number = _isic_id(name)
    return f"{ISIC_ARCHIVE}-early" if number in ARCHIVE_EARLY_IDS else f"{ISIC_ARCHIVE}-later"


def scan_folder(root: Path, classes: tuple[str, ...] = ISIC_CLASSES,
                aliases: Mapping[str, str] | None = None) -> LabelledSet:
    """Read a folder-per-class set; keep one copy of duplicates and drop conflicting labels.

    Folders whose name is not one of `classes` (nor a key of `aliases`, folder name -> class
    name, e.g. melanoma-suspected -> melanoma) are reported and skipped; a set lacking some
    classes is fine (it still evaluates).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such data folder: {root}")
    index = {name: i for i, name in enumerate(classes)}
    index.update({folder: index[name] for folder, name in (aliases or {}).items()
                  if name in index})
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


def merge_sets(sets: Sequence[LabelledSet]) -> LabelledSet:
    """Several labelled sets as one (rooted at the first): an image in more than one keeps its
    first copy, or is dropped everywhere when the sets label it differently."""
    if not sets:
        raise ValueError("no data folder given")
    classes = sets[0].classes
    if any(s.classes != classes for s in sets):
        raise ValueError("the data folders do not share one class list")
    by_hash: dict[str, list[Sample]] = defaultdict(list)
    for labelled in sets:
        for sample in labelled.samples:
            by_hash[sample.sha256].append(sample)
    samples: list[Sample] = []
    dropped = [item for labelled in sets for item in labelled.dropped]
    for copies in by_hash.values():
        if len({s.label for s in copies}) > 1:
            names = ", ".join(sorted({classes[s.label] for s in copies}))
            dropped += [Dropped(s.path, f"identical content under different labels ({names})")
                        for s in copies]
            continue
        samples.append(copies[0])
        dropped += [Dropped(s.path, f"exact duplicate of {copies[0].path}") for s in copies[1:]]
    samples.sort(key=lambda s: str(s.path))
    unknown = sorted({name for labelled in sets for name in labelled.unknown_folders})
    return LabelledSet(sets[0].root, classes, samples, dropped, unknown)


def stratified_folds(samples: list[Sample], k: int, seed: int) -> list[int]:
    """Assign each sample a fold in 0..k-1, stratified by (source, class), with a fixed seed.

    Every image serves once as validation; the samples are unique by content, so no copy of an
    image can sit in two folds.
    """
    if k < 2:
        raise ValueError("k must be at least 2")
    rng = random.Random(seed)
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for index in sorted(range(len(samples)), key=lambda i: samples[i].sha256):
        groups[(source_of(samples[index].path), samples[index].label)].append(index)
    folds = [0] * len(samples)
    offset = 0
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        for position, index in enumerate(members):
            # Deal round-robin, continuing where the last group stopped, so fold sizes stay even.
            folds[index] = (offset + position) % k
        offset += len(members)
    return folds
